"""The Zhongjing stages on the shared loop: continued pre-training, SFT, reward model, DPO."""

import json
import math

import pytest
from helpers import DEMO_DATA, SMALL_RECIPE, write_recipe

from medtune.infer.merge import merge
from medtune.recipe import RecipeError, load_recipe
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
    # The preference figures people read, per pair; the implicit rewards start at 0 and part as it learns.
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"} <= set(rows[-1])
    assert rows[-1]["rewards/margin"] > rows[0]["rewards/margin"] and 0 <= rows[-1]["rewards/accuracy"] <= 1
    assert dropouts(result.model) == {0.0}  # off by default in a preference stage (lora.dropout is 0.1)


def dropouts(model) -> set[float]:
    import torch

    return {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}


def test_dropout_stays_where_asked(tmp_path, corpora):
    _, pair_file = corpora
    kept = run_stage(tmp_path, "dpo-dropout", "dpo", pair_file, steps=1, extra=["train.disable_dropout=false"])
    assert dropouts(kept.model) == {0.1}
    sft = run_stage(tmp_path, "sft", "sft", DEMO_DATA, steps=1)
    assert dropouts(sft.model) == {0.1}


def test_reward_model_trains_and_merges(tmp_path, corpora, tokenizer, capfd):
    from transformers import AutoModelForSequenceClassification

    _, pair_file = corpora
    # a reward model has a score head, no lm_head: nothing else to train in full
    extra = ["train.learning_rate=1e-2", "lora.modules_to_save=[]"]
    result = run_stage(tmp_path, "rm", "rm", pair_file, steps=20, extra=extra)
    info = result.run.read_info()
    print(f"reward model loss {info['first_loss']} → {info['final_loss']}")
    last = [r for r in result.run.read_metrics() if "loss" in r][-1]
    assert last["rewards/accuracy"] > 0.5 and last["rewards/margin"] > 0
    assert info["finished"] and info["final_loss"] < info["first_loss"] - 0.05
    summary = merge(str(result.run.root), tmp_path / "rm-merged", [])
    assert summary["parity_max_abs_logit_diff"] <= 1e-4
    scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm-merged").eval()
    assert scorer.config.num_labels == 1 and scorer.config.pad_token_id == tokenizer.pad_token_id
    check_reward_command(result.run.root, tmp_path / "rm-merged", pair_file, tmp_path, scorer, capfd)
    # The RM scores GRPO's rollouts (its own tokenizer and template: replies go to it as text), merged or as a run.
    for name, rm in (("grpo-merged-rm", tmp_path / "rm-merged"), ("grpo-rm-run", result.run.root)):
        extra = [f"rl.reward_model={rm}", "rl.max_new_tokens=8", "train.logging_steps=1", "data.eval_ratio=0"]
        rows = [r for r in run_stage(tmp_path, name, "grpo", DEMO_DATA, steps=2, extra=extra).run.read_metrics()]
        assert len(rows) == 2 and all(math.isfinite(r["reward"]) for r in rows)
    check_shared_reward_adapter(result.run, tmp_path, pair_file)


def check_shared_reward_adapter(rm_run, tmp_path, pair_file):
    """An RM trained on the policy's own base joins the policy as a second adapter: its scores are the RM's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medtune.model.reward_model import load_reward_model, score_conversations
    from medtune.rundir import describe_source
    from medtune.training.rewards import shared_reward_adapter

    base = rm_run.read_info()["base_model"]
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear"))
    shared = shared_reward_adapter(policy, describe_source(str(rm_run.root)))
    pairs = [json.loads(line) for line in pair_file.read_text(encoding="utf-8").splitlines()[:6]]
    prompts, texts = [p["messages"] for p in pairs], [p["chosen"] for p in pairs]
    model, tokenizer, info = load_reward_model(str(rm_run.root), "fp32")
    conversations = [m + [{"role": "assistant", "content": t}] for m, t in zip(prompts, texts, strict=True)]
    expected = score_conversations(model, tokenizer, info.template, info.system_prompt, conversations, 4)
    got = shared.score(prompts, texts, [None] * len(texts))
    gap = max(abs(a - b) for a, b in zip(got, expected, strict=True))
    print(f"shared reward adapter vs the RM itself: max |Δ score| {gap:.2e}")
    assert got == pytest.approx(expected, abs=1e-4)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)  # only the policy's adapter trains
    run = run_stage(
        tmp_path, "grpo-shared-rm", "grpo", DEMO_DATA, base=base, steps=2,
        extra=[f"rl.reward_model={rm_run.root}", "rl.max_new_tokens=8", "data.eval_ratio=0"],
    ).run  # fmt: skip
    assert list((run.adapter_dir).glob("reward")) == [] and json.loads(run.info_file.read_text())["finished"]


def check_reward_command(run_dir, merged, pair_file, tmp_path, scorer, capfd):
    """medtune reward on the RM's own pairs: above chance, each score the merged model's own, and only its own
    lines printed (no transformers LOAD REPORT of the score head the adapter brings)."""
    import torch

    from medtune.data.templates import encode_conversation, get_template
    from medtune.data.tokenizer import load_tokenizer
    from medtune.infer.reward import main as reward_main

    out = tmp_path / "scores.jsonl"
    capfd.readouterr()
    assert reward_main([str(run_dir), "--data", str(pair_file), "--out", str(out)]) == 0
    printed = capfd.readouterr()
    assert "LOAD REPORT" not in printed.err + printed.out and "\x1b[" not in printed.err + printed.out
    assert printed.out.startswith('{"pairs": 40') and printed.out.splitlines()[1] == "scores:"
    assert printed.out.splitlines()[-1] == f"per-record scores: {out}" and "not sharded" not in printed.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    print(
        f"medtune reward on its training pairs: accuracy {accuracy:.3f}, mean margin "
        f"{sum(r['margin'] for r in rows) / len(rows):.3f}"
    )
    assert len(rows) == 40 and accuracy > 0.75
    record = json.loads(pair_file.read_text(encoding="utf-8").splitlines()[3])
    tokenizer = load_tokenizer(str(merged))  # the run's own (its tiny base was built from the pairs)
    ids, _ = encode_conversation(
        tokenizer, get_template("chatmed"), record["messages"] + [{"role": "assistant", "content": record["chosen"]}]
    )
    with torch.no_grad():
        direct = scorer(input_ids=torch.tensor([ids])).logits.item()
    assert rows[3]["chosen_score"] == pytest.approx(direct, abs=1e-4)
    merged_out = tmp_path / "scores-merged.jsonl"
    assert reward_main([str(merged), "--data", str(pair_file), "--out", str(merged_out)]) == 0
    again = [json.loads(line) for line in merged_out.read_text().splitlines()]
    assert [r["correct"] for r in again] == [r["correct"] for r in rows]
    assert reward_main([str(run_dir), "--data", str(DEMO_DATA), "--out", str(tmp_path / "replies.jsonl")]) == 0
    assert len((tmp_path / "replies.jsonl").read_text().splitlines()) == 40


def test_zhongjing_chain_pt_sft_dpo(tmp_path, corpora):
    """Each stage trains on the previous stage's merged model, as the Zhongjing recipe does."""
    text_file, pair_file = corpora
    pt = run_stage(tmp_path, "pt", "pt", text_file, steps=4, extra=["data.max_length=64"]).run
    merge(str(pt.root), tmp_path / "pt-merged", [])
    sft = run_stage(tmp_path, "sft", "sft", DEMO_DATA, base=tmp_path / "pt-merged", steps=4).run
    merge(str(sft.root), tmp_path / "sft-merged", [])
    dpo = run_stage(tmp_path, "dpo", "dpo", pair_file, base=tmp_path / "sft-merged", steps=4).run
    assert dpo.read_info()["base_model"] == str(tmp_path / "sft-merged") and dpo.read_info()["finished"]
    with pytest.raises(RecipeError, match="a medtune merge of a pt run"):  # DPO straight on the pre-trained model
        run_stage(
            tmp_path, "dpo-on-pt", "dpo", pair_file, base=tmp_path / "pt-merged", extra=["train.require_sft_base=true"]
        )


def test_wrong_record_kind_for_the_stage_is_named(tmp_path, corpora):
    from medtune.data.records import RecordError

    text_file, _ = corpora
    with pytest.raises(RecordError, match="train.stage dpo needs preference records"):
        run_stage(tmp_path, "bad", "dpo", text_file)


@pytest.mark.slow
def test_zhongjing_script_runs_all_five_stages_on_cpu(tmp_path, corpora):
    """PT → SFT → RM → PPO (and DPO) through scripts/zhongjing.sh, with the tiny model, from another directory."""
    import os
    import subprocess

    from helpers import REPO

    text_file, pair_file = corpora
    work, elsewhere = tmp_path / "zhongjing", tmp_path / "elsewhere"
    elsewhere.mkdir()
    overrides = [
        "model.base=tiny-llama", "model.quantization=null", "model.dtype=fp32", "data.template=chatmed",
        "data.max_length=128", "train.max_steps=2", "train.per_device_batch_size=2",
        "train.gradient_accumulation_steps=1", "train.gradient_checkpointing=false", "train.save_steps=0",
        "train.logging_steps=1", "rl.max_new_tokens=8", "rl.num_generations=2", "rl.ppo_epochs=2",
    ]  # fmt: skip
    command = ["bash", str(REPO / "scripts" / "zhongjing.sh"), str(text_file), str(DEMO_DATA), str(pair_file)]
    proc = subprocess.run(
        [*command, str(work), *overrides],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "LAUNCH": "python"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("pt", "sft", "rm", "ppo", "dpo"):
        assert json.loads((work / stage / "run_info.json").read_text())["finished"], stage
    ppo = [json.loads(line) for line in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward" in row and "kl" in row for row in ppo)
    assert json.loads((work / "ppo" / "run_info.json").read_text())["base_model"] == str(work / "sft-merged")
    assert (work / "zhongjing" / "config.json").is_file() and (work / "zhongjing-dpo" / "config.json").is_file()
    assert "final model (PPO)" in proc.stdout and len((work / "rm-scores.jsonl").read_text().splitlines()) == 40
    assert "a second adapter on the policy" in proc.stdout + proc.stderr
