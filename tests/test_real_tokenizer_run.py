"""A whole run on a tiny random LLaMA that carries the real Chinese-LLaMA-2 tokenizer: the ids trained on are
the ids predicted and served with, from another directory too."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import tiny_llama_with_tokenizer
from references import ALPACA2_PROMPT, DATA, TOKENIZERS, LegacyLlamaTokenizer, chatmed_texts

from medtune.infer.generation import GenerationSettings

pytestmark = pytest.mark.skipif(
    not (TOKENIZERS / "chinese_llama2").is_dir() or not DATA.is_dir(),
    reason="../shared/tokenizers and ../shared/data are needed",
)
SYSTEM = "你是一名经验丰富的全科医生。"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """Train 2 steps from a relative model.base, with data.system_prompt set; merge from another directory."""
    import os

    from medtune.infer.merge import merge
    from medtune.recipe import load_recipe
    from medtune.train import train

    home = tmp_path_factory.mktemp("real")
    tiny_llama_with_tokenizer(home / "base", TOKENIZERS / "chinese_llama2")
    pairs = chatmed_texts(8)
    with (home / "train.jsonl").open("w", encoding="utf-8") as handle:
        for i, (q, a) in enumerate(pairs):
            record = {
                "id": f"r{i}",
                "source": "chatmed-consult",
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    (home / "r.yaml").write_text(
        "model: {base: base, dtype: fp32}\nlora: {r: 4, alpha: 8}\n"
        f"data: {{train_files: [train.jsonl], template: llama2_zh, system_prompt: {SYSTEM}, max_length: 256}}\n"
        "train: {max_steps: 2, per_device_batch_size: 2, logging_steps: 1}\noutput: {dir: run}\n",
        encoding="utf-8",
    )
    cwd = os.getcwd()
    try:
        os.chdir(home)
        recipe = load_recipe("r.yaml")
        train(recipe)
        elsewhere = tmp_path_factory.mktemp("elsewhere")
        os.chdir(elsewhere)  # the run directory must work from anywhere: its base path is absolute
        merge(str(home / "run"), elsewhere / "merged", [])
    finally:
        os.chdir(cwd)
    return home, recipe, pairs, elsewhere / "merged"


def test_train_predict_serve_ids_agree_with_the_slow_tokenizer(real_run):
    from transformers import AutoTokenizer

    from medtune.data.templates import IGNORE_INDEX
    from medtune.data.token_cache import build_sft_rows
    from medtune.data.tokenizer import load_tokenizer
    from medtune.infer.generation import load_model_for_inference

    home, recipe, pairs, merged = real_run
    info = json.loads((home / "run" / "run_info.json").read_text())
    assert info["system_prompt"] == SYSTEM and info["tokenizer_kind"] == "sentencepiece"
    assert info["base_model"] == str((home / "base").resolve())
    data = dataclasses.replace(recipe.data, train_files=[str(home / "train.jsonl")])
    rows, _, _ = build_sft_rows(data, recipe.train.seed, load_tokenizer(str(home / "base")))
    from_run = load_model_for_inference(str(home / "run"), "fp32", None)
    from_merged = load_model_for_inference(str(merged), "fp32", None)
    served = AutoTokenizer.from_pretrained(merged)
    slow = LegacyLlamaTokenizer(TOKENIZERS / "chinese_llama2" / "tokenizer.model")
    for (q, _), row in zip(pairs, rows, strict=True):
        messages = [{"role": "user", "content": q}]
        trained_prompt = row["input_ids"][: next(i for i, item in enumerate(row["labels"]) if item != IGNORE_INDEX)]
        reference = slow(ALPACA2_PROMPT.format(system=SYSTEM, instruction=q))
        assert trained_prompt == reference
        assert from_run.prompt_ids(messages) == reference
        assert from_merged.prompt_ids(messages) == reference
        chat = served.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert chat["input_ids"] == reference


def test_predict_from_the_merged_model_decodes(real_run, tmp_path):
    from medtune.infer.predict import predict

    home, _, pairs, merged = real_run
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"id": f"p{i}", "source": "t", "messages": [{"role": "user", "content": q}]}, ensure_ascii=False
            )
            + "\n"
            for i, (q, _) in enumerate(pairs[:3])
        ),
        encoding="utf-8",
    )
    out = tmp_path / "pred.jsonl"
    assert predict(str(merged), data, out, GenerationSettings(max_new_tokens=4, batch_size=2), progress=False) == 3
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["p0", "p1", "p2"]
    assert all("<0x" not in r["prediction"] for r in rows)  # byte-fallback pieces decoded to characters
