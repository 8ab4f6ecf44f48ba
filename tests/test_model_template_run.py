"""End to end on CPU with a tiny random model that carries the real Qwen2.5 vocabulary and its published chat
template (``data.template: model``): trains, merges, predicts and serves on the training ids, stops at
<|im_end|>; the template command writes the ids training uses; medical-o1 reasoning records train with Qwen3's
template and predict returns reasoning and answer apart."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from helpers import random_tiny_llama
from references import DATA, chatmed_texts

from medtune.infer.generation import GenerationSettings

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is needed")]


def tiny_qwen(out, tokenizer) -> None:
    """A random 2-layer LlamaForCausalLM over the tokenizer's whole vocabulary, saved with the tokenizer and
    Qwen2.5-Instruct's generation_config stops (<|im_end|>, <|endoftext|>)."""
    from transformers import GenerationConfig

    vocab = tokenizer.get_vocab()
    model = random_tiny_llama(len(tokenizer))
    model.generation_config = GenerationConfig(eos_token_id=[vocab["<|im_end|>"], vocab["<|endoftext|>"]])
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def qwen_home(tmp_path_factory):
    from real_vocab import template_text, vocab_tokenizer_dir
    from transformers import AutoTokenizer

    home = tmp_path_factory.mktemp("qwen")
    tokenizer = AutoTokenizer.from_pretrained(vocab_tokenizer_dir("qwen2"))
    tokenizer.add_tokens(["<think>", "</think>"])  # Qwen3's reasoning markers, plain added tokens
    tokenizer.chat_template = template_text("Qwen-Qwen2.5-7B-Instruct")
    tiny_qwen(home / "base", tokenizer)
    pairs = chatmed_texts(6)
    with (home / "train.jsonl").open("w", encoding="utf-8") as handle:
        for i, (q, a) in enumerate(pairs):
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            handle.write(json.dumps({"id": f"r{i}", "source": "t", "messages": messages}, ensure_ascii=False) + "\n")
    return home, pairs


def recipe_text(template: str, data: str = "train.jsonl") -> str:
    return (
        "model: {base: base, dtype: fp32}\nlora: {r: 4, alpha: 8}\n"
        f"data: {{train_files: [{data}], template: {template}, max_length: 256}}\n"
        "train: {max_steps: 2, per_device_batch_size: 2, logging_steps: 1, save_steps: 0}\noutput: {dir: run}\n"
    )


def train_in(directory):
    """Train directory/r.yaml from that directory (its relative paths are taken from there); its recipe."""
    from medtune.recipe import load_recipe
    from medtune.train import train

    cwd = os.getcwd()
    try:
        os.chdir(directory)
        recipe = load_recipe("r.yaml")
        train(recipe)
    finally:
        os.chdir(cwd)
    return recipe


def test_model_template_trains_merges_predicts_and_serves_on_one_set_of_ids(qwen_home, tmp_path):
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from medtune.data.templates import IGNORE_INDEX
    from medtune.data.token_cache import build_sft_rows
    from medtune.data.tokenizer import load_tokenizer
    from medtune.infer.generation import load_model_for_inference
    from medtune.infer.merge import merge
    from medtune.infer.predict import predict
    from medtune.infer.serving import build, parser

    home, pairs = qwen_home
    (home / "r.yaml").write_text(recipe_text("model"), encoding="utf-8")
    recipe = train_in(home)
    merge(str(home / "run"), tmp_path / "merged", [])
    published = AutoTokenizer.from_pretrained(home / "base")
    data = dataclasses.replace(recipe.data, train_files=[str(home / "train.jsonl")])
    rows, _, _ = build_sft_rows(data, recipe.train.seed, load_tokenizer(str(home / "base")))
    from_run = load_model_for_inference(str(home / "run"), "fp32", None)
    from_merged = load_model_for_inference(str(tmp_path / "merged"), "fp32", None)
    im_end = published.convert_tokens_to_ids("<|im_end|>")
    for (q, a), row in zip(pairs, rows, strict=True):
        conversation = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        assert row["input_ids"] == published.apply_chat_template(conversation, tokenize=True)["input_ids"]
        prompt = published.apply_chat_template(conversation[:1], tokenize=True, add_generation_prompt=True)
        first_trained = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
        assert row["input_ids"][:first_trained] == prompt["input_ids"]
        assert from_run.prompt_ids(conversation[:1]) == prompt["input_ids"]
        assert from_merged.prompt_ids(conversation[:1]) == prompt["input_ids"]
    assert im_end in from_run.stop_ids and im_end in from_merged.stop_ids
    saved = json.loads((home / "run" / "adapter" / "generation_config.json").read_text())
    assert im_end in saved["eos_token_id"]
    merged_config = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert im_end in merged_config["eos_token_id"]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "p0", "source": "t", "messages": [{"role": "user", "content": pairs[0][0]}]}) + "\n",
        encoding="utf-8",
    )
    assert (
        predict(
            str(tmp_path / "merged"),
            prompts,
            tmp_path / "pred.jsonl",
            GenerationSettings(max_new_tokens=8),
            progress=False,
        )
        == 1
    )
    prediction = json.loads((tmp_path / "pred.jsonl").read_text(encoding="utf-8"))["prediction"]
    assert "<|im_end|>" not in prediction and "reasoning" not in prediction

    args = parser().parse_args([str(home / "run"), "--max-new-tokens", "8"])
    app, loaded, engine = build(args)
    assert loaded.prompt_ids([{"role": "user", "content": pairs[0][0]}]) == from_run.prompt_ids(
        [{"role": "user", "content": pairs[0][0]}]
    )
    assert im_end in engine.stop_ids
    question = [{"role": "user", "content": pairs[0][0]}]
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json={"messages": question, "max_tokens": 8, "temperature": 0})
        assert reply.status_code == 200 and "<|im_end|>" not in reply.json()["choices"][0]["message"]["content"]
        # Make <|im_end|> the model's first choice after this prompt: generation must stop there, in predict's
        # generate and in serve's engine, and nowhere else (without it as a stop id the reply runs on).
        make_first_token(loaded, question, im_end)
        reply = client.post("/v1/chat/completions", json={"messages": question, "max_tokens": 8, "temperature": 0})
    choice = reply.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("", "stop")
    assert reply.json()["usage"]["completion_tokens"] == 1
    make_first_token(from_merged, question, im_end)
    prompt = torch.tensor([from_merged.prompt_ids(question)])
    stopped = from_merged.model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=from_merged.stop_ids)
    assert stopped[0, prompt.shape[1] :].tolist() == [im_end]
    endoftext = published.convert_tokens_to_ids("<|endoftext|>")
    runs_on = from_merged.model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=[endoftext])
    assert runs_on.shape[1] > prompt.shape[1] + 1


def make_first_token(loaded, messages, token: int) -> None:
    """Point the LM head's row of ``token`` along the prompt's last hidden state: a logit of 50, the rest ~0."""
    model = loaded.model
    with torch.no_grad():
        hidden = model.model(torch.tensor([loaded.prompt_ids(messages)])).last_hidden_state[0, -1]
        model.lm_head.weight[token] = hidden * (50 / hidden.norm() ** 2)


def test_template_show_writes_the_ids_training_uses_and_check_compares(qwen_home, tmp_path, capsys):
    from transformers import AutoTokenizer

    from medtune.infer.inspect_template import main

    home, pairs = qwen_home
    messages = tmp_path / "m.jsonl"
    messages.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in pairs[:3]
        ),
        encoding="utf-8",
    )
    out = tmp_path / "ids.jsonl"
    assert (
        main(["show", "model", "--tokenizer", str(home / "base"), "--messages", str(messages), "--json", str(out)])
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    published = AutoTokenizer.from_pretrained(home / "base")
    assert len(rows) == 3
    for (q, a), row in zip(pairs, rows, strict=False):
        conversation = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        assert row["ids"] == published.apply_chat_template(conversation, tokenize=True)["input_ids"]
        assert len(row["labels"]) == len(row["ids"])
        prompt = published.apply_chat_template(conversation[:1], tokenize=True, add_generation_prompt=True)
        assert row["prompt_ids"] == prompt["input_ids"]
    capsys.readouterr()
    assert main(["check", str(home / "base")]) == 0
    assert "5 of 5 identical" in capsys.readouterr().out  # its two reasoning samples: this template has none
    assert main(["check", str(home / "base"), "--template", "qwen3"]) == 1
    assert "ids differ at token" in capsys.readouterr().out
    assert main(["show", "model", "--tokenizer", str(tmp_path)]) == 2  # no tokenizer there: one error line


def test_medical_o1_reasoning_trains_with_qwen3_and_predict_returns_it_apart(qwen_home, tmp_path):
    from data_prep.__main__ import main as prep
    from medtune.data.templates import IGNORE_INDEX
    from medtune.data.token_cache import build_sft_rows
    from medtune.data.tokenizer import load_tokenizer
    from medtune.infer.generation import load_model_for_inference

    home, pairs = qwen_home
    o1 = [{"Question": q, "Complex_CoT": "先考虑常见病因。" + a[:20], "Response": a} for q, a in pairs]
    (tmp_path / "o1.json").write_text(json.dumps(o1, ensure_ascii=False), encoding="utf-8")
    assert prep(["medical-o1", str(tmp_path / "o1.json"), "--out", str(tmp_path / "o1.jsonl"), "--quiet"]) == 0
    (tmp_path / "base").symlink_to(home / "base")
    (tmp_path / "r.yaml").write_text(recipe_text("qwen3", str(tmp_path / "o1.jsonl")), encoding="utf-8")
    recipe = train_in(tmp_path)
    tokenizer = load_tokenizer(str(home / "base"))
    rows, _, _ = build_sft_rows(recipe.data, recipe.train.seed, tokenizer)
    for row, item in zip(rows, o1, strict=True):
        trained = tokenizer.decode(
            [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
        )
        assert trained == f"<think>\n{item['Complex_CoT']}\n</think>\n\n{item['Response']}<|im_end|>\n"
    loaded = load_model_for_inference(str(tmp_path / "run"), "fp32", None)
    assert loaded.thinks and not loaded.prompt_opens_think
    assert loaded.split("<think>\n鉴别诊断。\n</think>\n\n建议就医。") == ("鉴别诊断。", "建议就医。")
