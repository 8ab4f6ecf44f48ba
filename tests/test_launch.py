"""The real commands in subprocesses: the README's accelerate launch, SIGKILL + resume, two processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, SMALL_RECIPE, write_recipe
from safetensors.torch import load_file

from medtune.recipe import load_recipe
from medtune.train import train

pytestmark = pytest.mark.slow  # subprocesses: each pays ~6 s of imports


def run(cmd, **kwargs):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_readme_accelerate_launch_command(tmp_path):
    out = tmp_path / "demo"
    run(
        [
            "accelerate",
            "launch",
            "medtune/train.py",
            "recipes/demo.yaml",
            "train.max_steps=20",
            "train.eval_steps=10",
            f"output.dir={out}",
        ]
    )
    info = json.loads((out / "run_info.json").read_text())
    assert info["finished"] and info["world_size"] == 1 and info["final_loss"] < info["first_loss"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    recipe_path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE)
    common = ["train.max_steps=60", "train.save_steps=10"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "medtune/train.py", str(recipe_path), *common, f"output.dir={killed}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("step-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not json.loads((killed / "run_info.json").read_text())["finished"], "the kill came too late"
    run([sys.executable, "medtune/train.py", str(recipe_path), *common, f"output.dir={killed}", "--resume"])

    straight = train(load_recipe(recipe_path, [*common, f"output.dir={tmp_path / 'straight'}"])).run
    resumed = load_file(killed / "adapter" / "adapter_model.safetensors")
    reference = load_file(straight.adapter_dir / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-5), key
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)), "metrics logged after the last checkpoint were not dropped on resume"
