"""`medtune eval dialogue`: reference metrics, the LLM judge (a fake one on 127.0.0.1), the safety subset."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fake_judge import FakeJudge, is_malformed
from helpers import DEMO_DATA, REPO

from data_prep.__main__ import main as prep_main
from medtune.evaluate import dialogue
from medtune.evaluate.judge import pairwise_outcome, parse_axes, parse_winner
from medtune.evaluate.text_metrics import distinct, reference_metrics

CMTMEDQA = REPO.parent / "shared" / "data" / "cmtmedqa_test_full.json"


def test_judge_replies_are_parsed_or_counted_malformed() -> None:
    assert parse_axes('```json\n{"safety": 5, "professionalism": 4, "fluency": 3}\n```') == {
        "safety": 5,
        "professionalism": 4,
        "fluency": 3,
    }
    assert parse_axes('分数：{"safety": 6, "professionalism": 4, "fluency": 3}') is None  # out of the 1–5 scale
    assert parse_axes('{"safety": true, "professionalism": 4, "fluency": 3}') is None
    assert parse_axes('{"safety": 4, "fluency": 3}') is None
    assert parse_axes("安全性 5 分，专业性 4 分") is None
    assert parse_axes('理由见下 {不是JSON} 然后 {"safety": 2, "professionalism": 2, "fluency": 2}') == {
        "safety": 2,
        "professionalism": 2,
        "fluency": 2,
    }
    assert [parse_winner(r) for r in ('{"winner": "a"}', '{"winner": "Tie"}', '{"winner": "C"}', "A")] == [
        "A",
        "tie",
        None,
        None,
    ]


@pytest.mark.parametrize(
    ("first", "second", "outcome"),
    [
        ("A", "B", "win"),  # preferred in both orders
        ("B", "A", "lose"),
        ("A", "A", "tie"),  # always the first answer: position bias, cancelled
        ("B", "B", "tie"),
        ("A", "tie", "win"),
        ("tie", "A", "lose"),
        ("tie", "tie", "tie"),
        ("A", None, None),  # a malformed verdict: not compared
    ],
)
def test_pairwise_outcome_cancels_position_bias(first, second, outcome) -> None:
    assert pairwise_outcome(first, second) == outcome


def test_reference_metrics_in_characters() -> None:
    assert reference_metrics([""], ["多喝水"])["rouge_l"] == 0.0
    same = reference_metrics(["多喝水，注意休息。"], ["多喝水，注意休息。"])
    assert same["bleu_4"] == pytest.approx(100.0) and same["rouge_l"] == pytest.approx(100.0, abs=1e-5)
    assert distinct(["头痛头痛"], 1) == 0.5 and distinct(["头痛头痛"], 2) == pytest.approx(2 / 3)
    partial = reference_metrics(["建议多喝水"], ["建议多休息"])
    # 5 characters each, 3 shared unigrams (建议多), bigrams 建议/议多 shared of 4 → BLEU-1 60, BLEU-2 sqrt(.6*.5)
    assert partial["bleu_1"] == pytest.approx(60.0) and partial["bleu_2"] == pytest.approx(100 * (0.6 * 0.5) ** 0.5)
    assert partial["rouge_1"] == pytest.approx(60.0, abs=1e-4)


def test_refusal_heuristic() -> None:
    assert dialogue.is_refusal("发烧与恶魔附身无关，驱魔是不科学的，请及时就医。")
    assert dialogue.is_refusal("建议您咨询专业医生，进行全面检查。")
    assert not dialogue.is_refusal("可以口服布洛芬退热，多喝水。")


def test_judge_that_cannot_be_reached_fails_the_command(trained, tmp_path: Path, capsys) -> None:
    result, _, _ = trained
    data = tmp_path / "d.jsonl"
    data.write_text("".join(DEMO_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    argv = [str(result.run.root), "--data", str(data), "--out", str(tmp_path / "o"), "--max-new-tokens", "4"]
    argv += ["--judge", "http://127.0.0.1:9/v1", "--judge-model", "m", "--judge-retries", "0"]
    assert dialogue.main(argv) == 1
    captured = capsys.readouterr()
    assert "3 judge calls failed" in captured.err and "APIConnectionError" in captured.err
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert scores["all"]["judged"] == 0 and scores["all"]["judge"]["safety"] is None
    assert dialogue.main([*argv[:7], "--judge-model", "m"]) == 2  # a model name without an endpoint
    assert "go together" in capsys.readouterr().err


def slice_of_cmtmedqa(tmp_path: Path) -> Path:
    """30 multi-turn dialogues and 10 safety questions of the real test set, converted as a user would."""
    records = json.loads(CMTMEDQA.read_text(encoding="utf-8"))
    raw = tmp_path / "cmtmedqa_slice.json"
    raw.write_text(json.dumps(records[:30] + records[1000:1010], ensure_ascii=False), encoding="utf-8")
    assert prep_main(["cmtmedqa", str(raw), "--out", str(tmp_path / "dialogues.jsonl"), "--quiet"]) == 0
    return tmp_path / "dialogues.jsonl"


def run_cli(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medtune.cli", "eval", "dialogue", *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.skipif(not CMTMEDQA.is_file(), reason="../shared/data is not beside the repository")
def test_real_cmtmedqa_slice_with_a_fake_judge_killed_and_resumed(tiny_base, tmp_path: Path) -> None:
    data = slice_of_cmtmedqa(tmp_path)
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    assert sum(r["meta"].get("subset") == "safety" for r in records) == 10
    baseline = tmp_path / "baseline.jsonl"  # "another system": here the reference replies themselves
    baseline.write_text(
        "".join(json.dumps({"id": r["id"], "output": r["messages"][-1]["content"]}) + "\n" for r in records),
        encoding="utf-8",
    )
    out = tmp_path / "eval"
    # The untrained tiny base (random weights) writes 16 tokens of varied text; a short run would stop at once.
    argv = [str(tiny_base), "--template", "chatmed", "--data", str(data), "--out", str(out), "--max-new-tokens", "16"]
    argv += ["--baseline", str(baseline), "--judge-model", "fake-judge"]
    with FakeJudge() as judge:
        argv += ["--judge", judge.url]
        first = run_cli(argv, tmp_path)
        judge.kill = (first.pid, 12)  # request 13 kills it: 11 answered (request 1 was a 500, retried)
        first.communicate(timeout=600)
        assert first.returncode == -9 and len(judge.answered) == 11
        second = run_cli(argv, tmp_path)
        stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr
    print(stdout)
    total = 40 + 2 * 2 * 40  # the axes per dialogue; both orders in Zhongjing's two panels against the baseline
    assert len(judge.answered) == len(set(judge.answered)) == total  # nothing was asked twice
    assert f"judge: {total - 11} calls, 11 cache hits" in stdout
    assert "generated 0 replies now, 40 earlier" in stdout  # the killed run had finished generating
    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    assert scores["all"]["dialogues"] == 40 and scores["dialogue"]["dialogues"] == 30
    assert scores["safety"]["dialogues"] == 10 and "refusal_rate" in scores["safety"]
    malformed = sum(is_malformed(p) for p in judge.answered if "回答 A" not in p)
    assert scores["judge_calls"]["malformed"] == malformed and scores["all"]["judged"] == 40 - malformed
    judged = [json.loads(line) for line in (out / "judgements.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(judged) == 40
    # The fake judge prefers the longer reply whatever its position: with both orders asked, the outcome
    # is exactly the length comparison, and no verdict pair is position-inconsistent.
    expected = {"win": 0, "tie": 0, "lose": 0}
    for item in judged:
        diff = len(item["prediction"]) - len(item["reference"])
        expected["win" if diff > 0 else "lose" if diff < 0 else "tie"] += 1
    for panel in ("ability_fluency", "safety"):  # Zhongjing's two panels, each asked in both orders
        pairwise = scores["all"]["panels"][panel]
        assert {k: pairwise[k] for k in expected} == expected and pairwise["position_inconsistent"] == 0
    assert "vs baseline, ability and fluency: win" in stdout and "vs baseline, safety: win" in stdout
    assert scores["settings"]["judge"]["axes"].startswith("medtune's 1–5 rubric")
    assert re.search(r"safety: 10 dialogues, .*refusal rate", stdout)


@pytest.mark.parametrize(
    ("pairwise", "panels"), [("zhongjing", ["ability_fluency", "safety"]), ("combined", ["combined"])]
)
def test_a_baseline_is_compared_in_zhongjings_panels_or_one_combined_question(
    trained, tmp_path: Path, pairwise: str, panels: list[str]
) -> None:
    """Zhongjing's two panels by default; each panel asks its own rubric (the prompts differ), in both orders."""
    from medtune.evaluate.dialogue import evaluate_dialogue
    from medtune.evaluate.judge import Judge
    from medtune.infer.generation import GenerationSettings

    result, _, _ = trained
    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_text("".join(DEMO_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:2]), "utf-8")
    baseline = tmp_path / "baseline.jsonl"
    baseline.write_text("".join(json.dumps({"id": f"demo-00{i}", "output": "多休息。"}) + "\n" for i in range(2)))
    out = tmp_path / "eval"
    with FakeJudge() as judge:
        scores = evaluate_dialogue(
            str(result.run.root),
            dialogues,
            out,
            judge=Judge(judge.url, "fake", out / "judge_cache.jsonl", max_retries=1),
            baseline_path=baseline,
            generation=GenerationSettings(max_new_tokens=8),
            progress=False,
            pairwise=pairwise,
        )
        asked = [p for p in judge.answered if "回答 A" in p]
    assert sorted(scores["all"]["panels"]) == panels
    assert all(scores["all"]["panels"][p]["compared"] == 2 for p in panels)
    assert len(asked) == 2 * 2 * len(panels)  # two dialogues, both orders, each panel
    if pairwise == "zhongjing":
        assert sum("只从“安全性”" in p for p in asked) == 4 and sum("只从“能力与流畅性”" in p for p in asked) == 4
    from medtune.evaluate.report import dialogue_section

    judgements = [json.loads(line) for line in (out / "judgements.jsonl").read_text(encoding="utf-8").splitlines()]
    page = dialogue_section(out, scores, judgements)
    assert "Against the baseline, per panel" in page and all(
        name in page for name in (["ability and fluency", "safety"] if pairwise == "zhongjing" else ["combined"])
    )
