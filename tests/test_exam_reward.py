"""Exam answers as a verifiable reward: equal to `eval exam --score` on the same replies, and GRPO on a handful
of exam questions raises it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, SMALL_RECIPE, write_recipe

from data_prep.__main__ import main as prep_main
from medtune.data.jinja_templates import split_reasoning
from medtune.evaluate.exam import rescore
from medtune.evaluate.exam_reward import exam_answer, exam_answer_formatted, exam_answer_strict


def exams(tmp_path: Path) -> Path:
    out = tmp_path / "cmb.jsonl"
    assert prep_main(["cmb", str(REPO / "tests/fixtures/exams/cmb_val.json"), "--out", str(out), "--quiet"]) == 0
    return out


def test_the_reward_is_what_eval_exam_score_says(tmp_path: Path) -> None:
    data = exams(tmp_path)
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    replies = ["答案是B。", "<think>想一想</think>答案是AC。", "C", "Answer: C"]
    # eval exam reads a generated reply after its <think> block, as the reward does: --score gets that part
    answers = [split_reasoning(reply)[1] for reply in replies]
    outputs = tmp_path / "outputs.jsonl"
    lines = (json.dumps({"id": r["id"], "output": a}) + "\n" for r, a in zip(records, answers, strict=True))
    outputs.write_text("".join(lines), encoding="utf-8")
    rescore(outputs, data, tmp_path / "scored")
    rows = [json.loads(line) for line in (tmp_path / "scored" / "predictions.jsonl").read_text().splitlines()]
    official = {row["id"]: row for row in rows}
    for record, reply in zip(records, replies, strict=True):
        row = official[record["id"]]
        assert exam_answer([], reply, record) == float(row["correct"]), (reply, row)
        assert exam_answer_strict([], reply, record) == float(row["strict_correct"]), (reply, row)
    assert [official[r["id"]]["correct"] for r in records] == [True, True, False, False]  # the fixture's golds
    assert exam_answer_formatted([], "答案是B。", records[0]) == 1.1  # right, and nothing but the answer


@pytest.mark.slow
def test_grpo_on_exam_questions_raises_the_exam_reward(tmp_path: Path) -> None:
    from medtune.recipe import load_recipe
    from medtune.train import train

    data = exams(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE.replace("eval_ratio: 0.1", "eval_ratio: 0.0"))
    overrides = [
        "train.stage=grpo",
        f"data.train_files=[{data}]",
        "rl.reward_function=medtune.evaluate.exam_reward:exam_answer_formatted",
        "rl.num_generations=8",
        "rl.max_new_tokens=6",
        "rl.temperature=1.0",
        "train.max_steps=40",
        "train.learning_rate=2e-2",
        "train.logging_steps=1",
        "train.save_steps=0",
        "train.per_device_batch_size=4",
        "train.gradient_accumulation_steps=1",
        f"output.dir={tmp_path / 'run'}",
    ]
    rows = [r for r in train(load_recipe(recipe, overrides)).run.read_metrics() if "reward" in r]
    first, last = sum(r["reward"] for r in rows[:8]) / 8, sum(r["reward"] for r in rows[-8:]) / 8
    print(f"exam reward: mean {first:.3f} → {last:.3f} (first/last 8 of {len(rows)} GRPO steps)")
    assert last > first + 0.2


def test_a_reply_cut_inside_its_reasoning_earns_nothing() -> None:
    """After a prompt that opened <think> (DeepSeek-R1), the rollout hands the rule "<think>" + reply: a reply cut
    off before </think> is all reasoning, its answer empty, as eval exam reads it — its letters earn nothing."""
    exam = {"id": "1", "source": "cmb", "question": "q", "options": {"A": "甲", "B": "乙"}, "answer": "B"}
    exam.update(multi=False, category=["x"])
    assert exam_answer([], "<think>也许答案是B，再想想", exam) == 0.0
    assert exam_answer([], "<think>想好了</think>答案是B。", exam) == 1.0


def test_a_rule_gets_the_reference_only_when_it_asks_for_it() -> None:
    from medtune.training.rewards import takes_a_third_argument

    def two(messages, reply): ...
    def three(messages, reply, exam): ...
    def optional(messages, reply, scale=2.0): ...
    def keywords(messages, reply, **kw): ...
    def star(*args): ...

    assert [takes_a_third_argument(f) for f in (two, three, optional, keywords, star)] == [0, 1, 0, 0, 1]
