"""merge, apply-delta, reward and score on damaged or wrong inputs: one `error:` line, exit 2, nothing written,
no payload run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import DEMO_DATA
from test_checkpoints import Payload

from medtune.evaluate.score.promptcblue import main as score_main
from medtune.infer.apply_delta import main as apply_delta_main
from medtune.infer.merge import main as merge_main
from medtune.infer.reward import main as reward_main
from medtune.rundir import MERGE_INFO


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A copy of the shared trained run, to damage."""
    result, _, _ = trained
    return Path(shutil.copytree(result.run.root, tmp_path / "run"))


def test_merge_names_a_truncated_adapter(run_copy, tmp_path, capsys) -> None:
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert merge_main([str(run_copy), "--out", str(tmp_path / "merged")]) == 2
    assert f"error: {weights}: damaged or truncated (" in one_error_line(capsys)
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_a_pickled_adapter_in_one_line_and_runs_nothing(run_copy, tmp_path, capsys) -> None:
    adapter = run_copy / "adapter"
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({"base_model.model.lm_head.weight": Payload(marker)}, adapter / "adapter_model.bin")
    assert merge_main([str(run_copy), "--out", str(tmp_path / "merged")]) == 2
    assert f"error: {adapter}: refused to load the adapter (" in one_error_line(capsys)
    assert not marker.exists() and not (tmp_path / "merged").exists()


def test_merge_names_a_damaged_run_description(run_copy, tmp_path, capsys) -> None:
    (run_copy / "run_info.json").write_text('{"base_model": "/x",\n', encoding="utf-8")
    assert merge_main([str(run_copy), "--out", str(tmp_path / "merged")]) == 2
    assert f"error: {run_copy / 'run_info.json'}:2:1: damaged (" in one_error_line(capsys)


def test_apply_delta_refuses_a_delta_with_fewer_layers(tiny_base, tmp_path, capsys) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_base)
    config.num_hidden_layers = 1
    delta = tmp_path / "delta"
    AutoModelForCausalLM.from_config(config).save_pretrained(delta)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_base / name).is_file():
            shutil.copy(tiny_base / name, delta / name)
    out = tmp_path / "out"
    assert apply_delta_main(["--base", str(tiny_base), "--delta", str(delta), "--out", str(out)]) == 2
    assert "error: the delta has no tensor for 9 of the base's" in one_error_line(capsys)
    assert not out.exists()


def broken_reward_model(tiny_base: Path, out: Path) -> Path:
    """A medtune-merged reward model whose score head gives NaN."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_base / name).is_file():
            shutil.copy(tiny_base / name, out / name)
    source = {"stage": "rm", "template": "chatmed", "dtype": "fp32"}
    (out / MERGE_INFO).write_text(json.dumps({"source": source}), encoding="utf-8")
    return out


def test_reward_refuses_nan_scores_and_a_zero_batch(tiny_base, tmp_path, capsys) -> None:
    model = broken_reward_model(tiny_base, tmp_path / "rm")
    record = json.loads(DEMO_DATA.read_text(encoding="utf-8").splitlines()[0])
    data = tmp_path / "replies.jsonl"
    data.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "scores.jsonl"
    assert reward_main([str(model), "--data", str(data), "--out", str(out), "--batch-size", "0"]) == 2
    assert "error: --batch-size 0: must be at least 1" in one_error_line(capsys)
    assert reward_main([str(model), "--data", str(data), "--out", str(out)]) == 2
    assert f"the reward model scored record {record['id']!r} nan; its score head is broken" in one_error_line(capsys)
    assert not out.exists()


def test_score_names_a_gold_line_whose_choices_are_not_strings(tmp_path, capsys) -> None:
    gold = {"input": "x\n答：", "target": "发烧", "answer_choices": 3, "task_dataset": "CHIP-CDN", "sample_id": "t1"}
    gold_file, pred_file = tmp_path / "gold.json", tmp_path / "pred.json"
    for path in (gold_file, pred_file):
        path.write_text(json.dumps(gold, ensure_ascii=False) + "\n", encoding="utf-8")
    assert score_main(["--pred", str(pred_file), "--gold", str(gold_file)]) == 2
    line = one_error_line(capsys)
    assert f"{gold_file}:1: answer_choices neither null nor a list of strings" in line


def test_predict_names_a_truncated_base_model(tiny_base, tmp_path, capsys) -> None:
    from medtune.infer.predict import main as predict_main

    model = Path(shutil.copytree(tiny_base, tmp_path / "model"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    record = json.loads(DEMO_DATA.read_text(encoding="utf-8").splitlines()[0])
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({**record, "messages": record["messages"][:1]}, ensure_ascii=False) + "\n", "utf-8")
    out = tmp_path / "pred.jsonl"
    assert predict_main([str(model), "--template", "chatmed", "--data", str(data), "--out", str(out)]) == 2
    assert f"error: {weights}: damaged or truncated (" in one_error_line(capsys)
    assert not out.exists()
