"""Training tells the truth and destroys nothing: driven through `medtune train`'s main(argv), as a user meets it.

Each test asserts the exit code, the one-line message, and that files medtune did not write are untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from helpers import SMALL_RECIPE, write_recipe


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_train(argv: list[str], capsys, stdout: bool = False) -> tuple[int, str]:
    """Exit code and what it printed on stderr (and stdout, when asked)."""
    from medtune.train import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err + (captured.out if stdout else "")


@pytest.fixture
def recipe(tmp_path) -> Path:
    return write_recipe(tmp_path / "r.yaml", SMALL_RECIPE)


def test_fresh_run_never_deletes_an_existing_directory(recipe, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "keep.bin").write_bytes(b"x")
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(folder)
    for extra in ([], ["--resume"]):
        code, err = run_train([str(recipe), f"output.dir={folder}", *extra], capsys)
        assert code == 2 and "it is not empty" in err and "never deletes" in err and err.count("\n") == 1, err
        assert snapshot(folder) == before


def test_resume_refuses_changed_settings_and_allows_more_steps(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    base = [str(recipe), f"output.dir={run}", "train.max_steps=4", "train.save_steps=2", "train.eval_steps=0"]
    assert run_train(base, capsys)[0] == 0
    code, err = run_train(base + ["--resume", "train.learning_rate=1e-3"], capsys)
    assert code == 2 and "finished with other settings (train.learning_rate: 0.003 → 0.001)" in err
    code, out = run_train(base + ["--resume"], capsys, stdout=True)
    assert code == 0 and "already finished with these settings" in out
    # an unfinished run: kill it in spirit by marking it unfinished and keeping its step-2 checkpoint
    info = json.loads((run / "run_info.json").read_text())
    (run / "run_info.json").write_text(json.dumps({**info, "finished": False}))
    code, err = run_train(base + ["--resume", "lora.r=8"], capsys)
    assert code == 2 and "cannot resume with changed settings: lora.r: 4 → 8" in err
    code, err = run_train([*base, "--resume", "train.max_steps=1"], capsys)
    assert code == 2 and "train.max_steps: 4 → 1" in err and "and train.max_steps only grow" in err
    code, err = run_train(base[:-2] + ["train.max_steps=6", "train.save_steps=2", "--resume"], capsys)
    assert code == 0
    assert json.loads((run / "run_info.json").read_text())["steps"] == 6


def test_save_total_limit_zero_and_other_silently_ignored_options_are_refused(recipe, tmp_path, capsys):
    cases = {
        "train.save_total_limit=0": "train.save_total_limit: must be at least 1",
        "train.eval_steps=-1": "train.eval_steps: must be 0 (off) or positive",
        "lora.modules_to_save=[lm_haed]": "lora.modules_to_save: 'lm_haed' matches no module of this model; did you mean lm_head?",  # noqa: E501
        "lora.target_modules=[q_proj,v_prj]": "lora.target_modules: 'v_prj' matches no module",
        "train.max_steps=[": "command line: override 'train.max_steps=[': the value is not valid YAML",
        "data.eval_ratio=null": "command line: data.eval_ratio: expected float, got None",
    }
    for override, message in cases.items():
        code, err = run_train([str(recipe), f"output.dir={tmp_path / 'x'}", override], capsys)
        assert code == 2 and err == f"error: {err[7:]}" and message in err and err.count("\n") == 1, (override, err)
    dpo = write_recipe(tmp_path / "dpo.yaml", SMALL_RECIPE + "  stage: dpo\n")
    code, err = run_train([str(dpo), "data.packing=true"], capsys)
    assert code == 2 and "data.packing: train.stage dpo does not pack samples" in err
    assert not (tmp_path / "x").exists()


def test_missing_local_base_fails_fast_with_one_line(recipe, tmp_path, capsys):
    import time

    start = time.perf_counter()
    code, err = run_train([str(recipe), "model.base=models/llama-7b", f"output.dir={tmp_path / 'x'}"], capsys)
    assert code == 2 and time.perf_counter() - start < 5
    assert err.startswith("error: model.base: models/llama-7b: no such model directory, and HF_HUB_OFFLINE is set")
    code, err = run_train([str(recipe), "model.base=./llama-7b", f"output.dir={tmp_path / 'x'}"], capsys)
    assert err == "error: model.base: ./llama-7b: no such model directory; a hub id looks like org/name\n"


def test_raw_corpus_file_gets_a_conversion_hint(recipe, tmp_path, capsys):
    raw = tmp_path / "alpaca.json"
    raw.write_text(json.dumps([{"instruction": "头痛", "input": "", "output": "休息"}], ensure_ascii=False))
    code, err = run_train([str(recipe), f"data.train_files=[{raw}]", f"output.dir={tmp_path / 'x'}"], capsys)
    assert code == 2 and "python -m data_prep alpaca" in err and err.count("\n") == 1
    lines = tmp_path / "alpaca.jsonl"
    lines.write_text(json.dumps({"instruction": "头痛", "output": "休息"}, ensure_ascii=False) + "\n")
    code, err = run_train([str(recipe), f"data.train_files=[{lines}]", f"output.dir={tmp_path / 'y'}"], capsys)
    assert code == 2 and f"{lines}:1:" in err and "python -m data_prep alpaca" in err


def test_wandb_without_a_key_is_refused_before_loading(recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    code, err = run_train([str(recipe), "train.report_to=wandb", f"output.dir={tmp_path / 'x'}"], capsys)
    assert code == 2 and "WANDB_API_KEY" in err and not (tmp_path / "x").exists()


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_loads_no_pickle_falls_back_from_a_damaged_checkpoint_and_reads_torn_metrics(recipe, tmp_path, capsys):
    import pickle

    import torch

    run = tmp_path / "run"
    argv = [str(recipe), f"output.dir={run}", "train.max_steps=6", "train.save_steps=2", "train.save_total_limit=3"]
    assert run_train(argv, capsys)[0] == 0
    reference = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    # Make it an unfinished run at step 4 with planted payloads and a damaged newest checkpoint.
    info = json.loads((run / "run_info.json").read_text())
    (run / "run_info.json").write_text(json.dumps({**info, "finished": False}))
    marker = tmp_path / "payload-ran"
    for step in (2, 4):
        with open(run / "checkpoints" / f"step-{step}" / "custom_checkpoint_0.pkl", "wb") as handle:
            pickle.dump(Payload(marker), handle)
    torch.save({"state": Payload(marker)}, run / "checkpoints" / "step-4" / "optimizer.bin")
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "lo')  # torn by a kill
    code, err = run_train(argv + ["--resume"], capsys, stdout=True)
    assert code == 0 and not marker.exists(), err
    assert "step-4 is damaged" in err and "resuming" in err and "from step-2" in err
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == reference  # bit-identical from step 2


def test_a_run_killed_in_its_first_checkpoint_starts_again_from_step_0(recipe, tmp_path, capsys):
    """Killed while writing its first checkpoint, a run has metrics but only a temp dir: --resume says so, removes
    that partial dir (medtune's own) and trains from step 0 in the same directory, to the same adapter."""
    run = tmp_path / "run"
    argv = [str(recipe), f"output.dir={run}", "train.max_steps=4", "train.save_steps=2"]
    assert run_train(argv, capsys)[0] == 0
    reference = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    info = json.loads((run / "run_info.json").read_text())
    (run / "run_info.json").write_text(json.dumps({**info, "finished": False}))
    partial = run / "checkpoints" / ".tmp-step-2"
    (run / "checkpoints" / "step-2").rename(partial)
    (partial / "trainer_state.json").unlink()
    (run / "notes.txt").write_text("mine")
    code, out = run_train(argv + ["--resume"], capsys, stdout=True)
    assert code == 0, out
    assert "no complete checkpoint (the run had logged step 4) (removed the partial .tmp-step-2); starting" in out
    assert not partial.exists() and (run / "notes.txt").read_text() == "mine"
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == reference
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())].count(2) == 1


def test_a_second_process_on_the_same_run_is_refused(recipe, tmp_path, capsys):
    from medtune.rundir import RunLock

    run = tmp_path / "run"
    lock = RunLock(run)
    lock.acquire()
    try:
        code, err = run_train([str(recipe), f"output.dir={run}", "train.max_steps=2", "--resume"], capsys)
    finally:
        lock.release()
    assert code == 2 and f"another medtune process (pid {os.getpid()}) is training" in err


def test_ctrl_c_says_where_the_run_stands(recipe, tmp_path, capsys, monkeypatch):
    import medtune.train as train_module

    def interrupted(s):
        s.step = 3
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "fit", interrupted)
    code, err = run_train([str(recipe), f"output.dir={tmp_path / 'run'}"], capsys)
    assert code == 130 and err == "interrupted at step 3; no checkpoint yet: --resume starts again\n"


def test_a_full_disk_is_one_line(recipe, tmp_path, capsys, monkeypatch):
    import errno

    from medtune.rundir import RunDir

    def full(self, info):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.info_file))

    monkeypatch.setattr(RunDir, "write_info", full)
    code, err = run_train([str(recipe), f"output.dir={tmp_path / 'run'}", "train.max_steps=2"], capsys)
    assert code == 2 and err.startswith("error: no space left on the device writing ") and err.count("\n") == 1


def test_a_disk_that_fills_during_a_checkpoint_keeps_the_last_one(recipe, tmp_path, capsys, monkeypatch):
    """torch reports a full disk as "RuntimeError: ... unexpected pos": one line, the partial checkpoint gone, the
    complete one before it kept, and --resume (with room again) ends with the uninterrupted run's adapter."""
    import shutil
    from collections import namedtuple

    from accelerate import Accelerator

    argv = [str(recipe), "train.max_steps=6", "train.save_steps=2", "train.save_total_limit=3"]
    assert run_train([*argv, f"output.dir={tmp_path / 'reference'}"], capsys)[0] == 0
    run = tmp_path / "run"
    save_state, disk_usage = Accelerator.save_state, shutil.disk_usage

    def fills_at_step_4(self, output_dir=None, **kwargs):
        if str(output_dir).endswith(".tmp-step-4"):
            monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("U", "total used free")(9, 9, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 157056 vs 156948")
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", fills_at_step_4)
    code, err = run_train([*argv, f"output.dir={run}"], capsys)
    assert code == 2 and err == (
        f"error: no space left on the device writing {run / 'checkpoints'}; free some space and run the same "
        "command again (written files are complete or absent)\n"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    code, out = run_train([*argv, f"output.dir={run}", "--resume"], capsys, stdout=True)
    assert code == 0 and "from step-2" in out
    reference = tmp_path / "reference" / "adapter" / "adapter_model.safetensors"
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == reference.read_bytes()


def train_in_a_fresh_process(argv: list[str], cwd: Path):
    """`medtune train ARGV` as a user runs it: its own process, stdout/stderr not a terminal; must succeed."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "medtune.cli", "train", *argv], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_deepspeed_without_a_launcher_runs(recipe, tmp_path):
    """`medtune train` with train.deepspeed and no launcher: one process, rank 0 of 1 (a fresh process, as a
    user runs it: accelerate's process-wide state cannot switch to DeepSpeed inside a test process)."""

    from helpers import REPO

    zero2 = REPO / "ds_configs" / "zero2.json"
    argv = [
        str(recipe),
        f"output.dir={tmp_path / 'run'}",
        "train.max_steps=2",
        "train.save_steps=0",
        f"train.deepspeed={zero2}",
    ]
    train_in_a_fresh_process(argv, tmp_path)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_command_prints_its_own_lines_only(recipe, tmp_path):
    """No library chatter from `medtune train` (stderr not a terminal: no progress bars either)."""

    argv = [str(recipe), f"output.dir={tmp_path / 'run'}", "train.max_steps=2", "train.save_steps=0"]
    proc = train_in_a_fresh_process(argv, tmp_path)
    for chatter in (
        "Setting accelerator to CPU",
        "kernels-community",
        "Loading weights",
        "FutureWarning",
        "Saving the dataset",
        "it/s]",
    ):
        assert chatter not in proc.stderr + proc.stdout, chatter
    assert "done: adapter in" in proc.stdout
