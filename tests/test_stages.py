"""The Zhongjing stages on the shared loop: continued pre-training, SFT, reward model, DPO."""

import json
import math

import pytest
from helpers import DEMO_DATA, SMALL_RECIPE, write_recipe

from medtune.merge import merge
from medtune.recipe import load_recipe
from medtune.train import train


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Text and preference records made from the demo conversations."""
    tmp = tmp_path_factory.mktemp("stages")
    records = [json.loads(item) for item in DEMO_DATA.read_text(encoding="utf-8").splitlines()]
    texts, pairs = [], []
    for i, r in enumerate(records):
        answer = r["messages"][1]["content"]
        texts.append({"id": f"t{i}", "source": "test", "text": r["messages"][0]["content"] + answer})
        # the rejected reply is a careless non-answer (what Zhongjing's preference data ranks low), alternating
        # with another question's answer: a preference a tiny random model can learn in a few steps
        careless = "不清楚，你自己查吧。"
        other = careless if i % 2 else records[(i + 7) % len(records)]["messages"][1]["content"]
        pairs.append(
            {
                "id": f"p{i}",
                "source": "test",
                "messages": r["messages"][:1],
                "chosen": answer,
                "rejected": other,
                "meta": {},
            }
        )
    text_file, pair_file = tmp / "text.jsonl", tmp / "pairs.jsonl"
    text_file.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    pair_file.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return text_file, pair_file


def run_stage(tmp_path, name, stage, data, base="tiny-llama", steps=8, extra=()):
    path = write_recipe(tmp_path / f"{name}.yaml", SMALL_RECIPE.replace("base: tiny-llama", f"base: {base}"))
    recipe = load_recipe(
        path,
        [
            f"train.stage={stage}",
            f"data.train_files=[{data}]",
            f"output.dir={tmp_path / name}",
            f"train.max_steps={steps}",
            "train.save_steps=0",
            *extra,
        ],
    )
    return train(recipe)


def test_pretraining_on_text_blocks(tmp_path, corpora):
    text_file, _ = corpora
    result = run_stage(tmp_path, "pt", "pt", text_file, extra=["data.max_length=64"])
    info = result.run.read_info()
    assert info["finished"] and info["final_loss"] < info["first_loss"]


def test_dpo_starts_at_log2_and_learns_the_preference(tmp_path, corpora):
    _, pair_file = corpora
    result = run_stage(tmp_path, "dpo", "dpo", pair_file, steps=12, extra=["train.dpo_beta=0.5"])
    rows = [r for r in result.run.read_metrics() if "loss" in r]
    # The adapter starts as a no-op (LoRA B = 0, lm_head copied), so policy == reference: loss = log 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.05)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05


def test_reward_model_trains_and_merges(tmp_path, corpora, tokenizer):
    from transformers import AutoModelForSequenceClassification

    _, pair_file = corpora
    # a reward model has a score head, no lm_head: nothing else to train in full
    extra = ["train.learning_rate=1e-2", "lora.modules_to_save=[]"]
    result = run_stage(tmp_path, "rm", "rm", pair_file, steps=20, extra=extra)
    info = result.run.read_info()
    print(f"reward model loss {info['first_loss']} → {info['final_loss']}")
    assert info["finished"] and info["final_loss"] < info["first_loss"] - 0.05
    summary = merge(str(result.run.root), tmp_path / "rm-merged", [])
    assert summary["parity_max_abs_logit_diff"] <= 1e-4
    scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm-merged").eval()
    assert scorer.config.num_labels == 1 and scorer.config.pad_token_id == tokenizer.pad_token_id


def test_zhongjing_chain_pt_sft_dpo(tmp_path, corpora):
    """Each stage trains on the previous stage's merged model, as the Zhongjing recipe does."""
    text_file, pair_file = corpora
    pt = run_stage(tmp_path, "pt", "pt", text_file, steps=4, extra=["data.max_length=64"]).run
    merge(str(pt.root), tmp_path / "pt-merged", [])
    sft = run_stage(tmp_path, "sft", "sft", DEMO_DATA, base=tmp_path / "pt-merged", steps=4).run
    merge(str(sft.root), tmp_path / "sft-merged", [])
    dpo = run_stage(tmp_path, "dpo", "dpo", pair_file, base=tmp_path / "sft-merged", steps=4).run
    assert dpo.read_info()["base_model"] == str(tmp_path / "sft-merged") and dpo.read_info()["finished"]


def test_wrong_record_kind_for_the_stage_is_named(tmp_path, corpora):
    from medtune.records import RecordError

    text_file, _ = corpora
    with pytest.raises(RecordError, match="train.stage dpo needs preference records"):
        run_stage(tmp_path, "bad", "dpo", text_file)
