"""merge → predict → score on the tiny model: what a user runs after training."""

import json

import pytest
import torch

from medtune.evaluate.score.promptcblue import score_files
from medtune.infer.generation import GenerationSettings
from medtune.infer.merge import merge
from medtune.infer.predict import predict


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory):
    result, _, _ = trained
    out = tmp_path_factory.mktemp("merge") / "merged"
    summary = merge(str(result.run.root), out, [])
    return result, out, summary


def test_merge_parity_and_plain_transformers_load(merged, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, out, summary = merged
    assert summary["parity_max_abs_logit_diff"] <= 1e-4
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    base_plus_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(summary["merged_from"]["base"]), str(result.run.adapter_dir)
    ).eval()
    ids = torch.tensor([tokenizer.encode("问：\n胃痛怎么办？\n答：\n")])
    with torch.no_grad():
        gap = (plain(input_ids=ids).logits - base_plus_adapter(input_ids=ids).logits).abs().max().item()
    assert gap <= 1e-4
    assert (out / "generation_config.json").is_file() and "问：" in (out / "chat_template.jinja").read_text()


def test_merge_refuses_a_quantized_base(trained, tmp_path):
    result, _, tiny_base = trained
    fake = tmp_path / "quantized-base"
    fake.mkdir()
    config = json.loads((tiny_base / "config.json").read_text())
    config["quantization_config"] = {"load_in_4bit": True}
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rounds the LoRA update away"):
        merge(str(result.run.root), tmp_path / "out", [], base=str(fake))


def test_chained_adapters_apply_in_order(merged, tmp_path):
    result, _, summary = merged
    out = tmp_path / "twice"
    twice = merge(str(result.run.adapter_dir), out, [str(result.run.adapter_dir)])
    assert (
        twice["merged_from"]["adapters"] == [str(result.run.adapter_dir)] * 2
        and twice["parity_max_abs_logit_diff"] <= 1e-4
    )


PROMPTS = [
    {
        "input": "判断意图：\n发烧三天怎么办\n答：",
        "target": "治疗方案",
        "answer_choices": ["治疗方案", "病因分析"],
        "task_type": "cls",
        "task_dataset": "KUAKE-QIC",
        "sample_id": "t1",
    },
    {
        "input": "医生应该如何回复：\n患者：胃痛，吃什么药比较好？想知道原因\n答：",
        "target": "建议先做胃镜。",
        "answer_choices": None,
        "task_type": "response_generation",
        "task_dataset": "MedDG",
        "sample_id": "t2",
    },
    {
        "input": "判断意图：\n高血压的病因\n答：",
        "target": "病因分析",
        "answer_choices": ["治疗方案", "病因分析"],
        "task_type": "cls",
        "task_dataset": "KUAKE-QIC",
        "sample_id": "t3",
    },
]


def test_predict_batched_equals_single_resumes_and_scores(merged, tmp_path):
    _, out, _ = merged
    data = tmp_path / "test.json"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PROMPTS), encoding="utf-8")
    batched, single = tmp_path / "batched.jsonl", tmp_path / "single.jsonl"
    assert predict(str(out), data, batched, GenerationSettings(max_new_tokens=12, batch_size=3), progress=False) == 3
    assert predict(str(out), data, single, GenerationSettings(max_new_tokens=12, batch_size=1), progress=False) == 3
    rows = [json.loads(item) for item in batched.read_text().splitlines()]
    assert [r["sample_id"] for r in rows] == ["t1", "t2", "t3"]  # input order, official format
    assert [r["target"] for r in rows] == [json.loads(item)["target"] for item in single.read_text().splitlines()]
    assert all(
        r["input"] == p["input"] and r["answer_choices"] == p["answer_choices"]
        for r, p in zip(rows, PROMPTS, strict=True)
    )
    # Resume: keep one finished line and a torn one; only the other two are generated again.
    lines = batched.read_text().splitlines(keepends=True)
    batched.write_text(lines[0] + lines[1][:20], encoding="utf-8")
    assert predict(str(out), data, batched, GenerationSettings(max_new_tokens=12, batch_size=2), progress=False) == 2
    assert batched.read_text().splitlines() == [item.rstrip("\n") for item in lines]
    report = score_files(batched, data)
    assert set(report.per_task) == {"KUAKE-QIC", "MedDG"} and not report.problems.counts


def test_predict_from_run_dir_uses_the_training_template(trained, tmp_path):
    result, _, _ = trained
    data = tmp_path / "records.jsonl"
    data.write_text(
        json.dumps(
            {"id": "r1", "source": "x", "messages": [{"role": "user", "content": "头痛怎么办？"}], "meta": {}},
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "pred.jsonl"
    assert predict(str(result.run.root), data, out, GenerationSettings(max_new_tokens=8), progress=False) == 1
    row = json.loads(out.read_text())
    assert row["id"] == "r1" and row["messages"] == [{"role": "user", "content": "头痛怎么办？"}]
    # the prompt it generated from is the training format: chatmed, BOS, '问：\n…\n答：\n', nothing after
    from medtune.data.templates import encode_conversation, get_template
    from medtune.infer.generation import load_model_for_inference

    loaded = load_model_for_inference(str(result.run.root), "fp32", None)
    prompt = loaded.prompt_ids(row["messages"])
    tokenizer = loaded.tokenizer
    assert (
        prompt
        == [tokenizer.bos_token_id] + tokenizer("问：\n头痛怎么办？\n答：\n", add_special_tokens=False)["input_ids"]
    )
    training, _ = encode_conversation(
        tokenizer, get_template("chatmed"), row["messages"] + [{"role": "assistant", "content": "多休息。"}]
    )
    assert training[: len(prompt)] == prompt


def test_extended_vocabulary_trains_and_merges(tiny_base, tmp_path):
    import shutil

    from helpers import SMALL_RECIPE, write_recipe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.recipe import RecipeError, load_recipe
    from medtune.train import train

    base = tmp_path / "base-extended-vocab"
    shutil.copytree(tiny_base, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight.shape[0]
    tokenizer.add_tokens([f"医学词{i}" for i in range(rows - len(tokenizer) + 100)])
    tokenizer.save_pretrained(base)
    path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE.replace("base: tiny-llama", f"base: {base}"))
    with pytest.raises(RecipeError, match="embed_tokens, lm_head"):
        train(load_recipe(path, [f"output.dir={tmp_path / 'no'}"]))
    recipe = load_recipe(
        path,
        [
            f"output.dir={tmp_path / 'run'}",
            "train.max_steps=3",
            "train.save_steps=0",
            "lora.modules_to_save=[embed_tokens, lm_head]",
        ],
    )
    run = train(recipe).run
    summary = merge(str(run.root), tmp_path / "merged", [])
    assert summary["parity_max_abs_logit_diff"] <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.get_input_embeddings().weight.shape[0] >= len(tokenizer) > rows
    data = tmp_path / "prompt.jsonl"  # predict straight from the run directory applies the adapter the same way
    data.write_text(
        json.dumps(
            {"id": "x", "source": "t", "messages": [{"role": "user", "content": "医学词3"}]}, ensure_ascii=False
        )
        + "\n",
        encoding="utf-8",
    )
    assert (
        predict(str(run.root), data, tmp_path / "pred.jsonl", GenerationSettings(max_new_tokens=4), progress=False)
        == 1
    )
