"""`medtune report`: one self-contained page, opened in a real (headless) browser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from browser import CHROMIUM, dump_dom, screenshot
from fake_judge import FakeJudge
from helpers import DEMO_DATA, REPO

from data_prep.__main__ import main as prep_main
from medtune.evaluate import dialogue, report
from medtune.evaluate import exam as exam_eval
from medtune.evaluate.judge import Judge
from medtune.infer.generation import GenerationSettings


def make_evals(run_dir: Path, tiny_base: Path, tmp_path: Path) -> list[Path]:
    """An exam evaluation (rescored outputs) and a judged dialogue evaluation beside the run."""
    data = tmp_path / "cmb.jsonl"
    assert prep_main(["cmb", str(REPO / "tests/fixtures/exams/cmb_val.json"), "--out", str(data), "--quiet"]) == 0
    outputs = tmp_path / "outputs.jsonl"
    replies = {"1": "答案是B。", "2": "答案是AC。", "3": "C", "4": "Answer: C"}
    outputs.write_text("".join(json.dumps({"id": k, "output": v}) + "\n" for k, v in replies.items()), "utf-8")
    exam_eval.rescore(outputs, data, tmp_path / "exam-cmb")
    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_text("".join(DEMO_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:6]), "utf-8")
    with FakeJudge() as judge:
        out = tmp_path / "dialogue-demo"
        dialogue.evaluate_dialogue(
            str(run_dir),
            dialogues,
            out,
            judge=Judge(judge.url, "fake", out / "judge_cache.jsonl", max_retries=1),
            generation=GenerationSettings(max_new_tokens=12),
            progress=False,
        )
    return [tmp_path / "exam-cmb", tmp_path / "dialogue-demo"]


def test_report_is_self_contained_and_says_what_it_shows(trained, tiny_base, tmp_path: Path) -> None:
    result, _, _ = trained
    evals = make_evals(result.run.root, tiny_base, tmp_path)
    page = report.render(result.run.root, evals)
    assert not any(tag in page for tag in ("<script", "<link", " src=", 'href="http'))  # nothing to fetch
    for text in ("Loss", "<svg", "Exam: exam-cmb", "CMB match_choice", "医师考试 / 执业医师", "LLM judge (1–5)"):
        assert text in page
    out = tmp_path / "report.html"
    out.write_text("not a report", encoding="utf-8")
    assert report.main([str(result.run.root), "--out", str(out)]) == 2  # someone else's file stays
    assert out.read_text(encoding="utf-8") == "not a report"
    out.unlink()
    assert report.main([str(result.run.root), *sum((["--eval", str(e)] for e in evals), []), "--out", str(out)]) == 0
    assert report.main([str(result.run.root), "--out", str(out)]) == 0  # its own page it may replace


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_renders_in_a_browser(trained, tiny_base, tmp_path: Path) -> None:
    import matplotlib.image

    result, _, _ = trained
    evals = make_evals(result.run.root, tiny_base, tmp_path)
    out = tmp_path / "report.html"
    assert report.main([str(result.run.root), *sum((["--eval", str(e)] for e in evals), []), "--out", str(out)]) == 0
    dom = dump_dom(out, tmp_path / "profile-dom")
    for text in ("medtune report", "Exam: exam-cmb", "Dialogue: dialogue-demo", "Sample generations", "执业医师"):
        assert text in dom
    assert dom.count("<table") >= 6 and "<path" in dom  # the tables, and the loss curve's lines
    png = screenshot(out, tmp_path / "report.png", tmp_path / "profile-shot")
    pixels = matplotlib.image.imread(png)[..., :3]
    inked = float((pixels.mean(axis=-1) < 0.9).mean())
    print(f"screenshot {pixels.shape[1]}x{pixels.shape[0]}, {inked:.1%} of pixels inked")
    assert inked > 0.02 and pixels.std() > 0.05  # not a blank page
