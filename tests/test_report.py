"""`medtune report`: one self-contained page, opened in a real (headless) browser."""

from __future__ import annotations

import json
import re
from html import unescape
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


def headers(page: str) -> list[str]:
    """The column names of every table of a page, as a reader sees them."""
    return [unescape(re.sub(r"<[^>]+>", "", h)) for h in re.findall(r"<th>(.*?)</th>", page, re.DOTALL)]


def row_of(page: str, first_cell: str) -> str:
    """The cells after the first one of the first table row that starts with this cell."""
    found = re.search(rf"<tr><td>{re.escape(first_cell)}</td>(.*?)</tr>", page, re.DOTALL)
    assert found, f"no row starts with {first_cell!r}"
    return found.group(1)


def exam_eval_dir(tmp_path: Path, replies: dict[str, str]) -> Path:
    """CMB's and CMExam's fixtures scored on saved replies (no model): DIR/scores.json and predictions.jsonl."""
    data = tmp_path / "exams.jsonl"
    for name, fixture in (("cmb", "cmb_val.json"), ("cmexam", "cmexam_test.csv")):
        out = tmp_path / f"{name}.jsonl"
        assert prep_main([name, str(REPO / "tests/fixtures/exams" / fixture), "--out", str(out), "--quiet"]) == 0
        with data.open("a", encoding="utf-8") as joined:
            joined.write(out.read_text(encoding="utf-8"))
    outputs = tmp_path / "outputs.jsonl"
    outputs.write_text("".join(json.dumps({"id": k, "output": v}) + "\n" for k, v in replies.items()), "utf-8")
    exam_eval.rescore(outputs, data, tmp_path / "exam")
    return tmp_path / "exam"


def make_evals(run_dir: Path, tiny_base: Path, tmp_path: Path) -> list[Path]:
    """An exam evaluation (rescored outputs) and a judged dialogue evaluation beside the run."""
    data = tmp_path / "cmb.jsonl"
    assert prep_main(["cmb", str(REPO / "tests/fixtures/exams/cmb_val.json"), "--out", str(data), "--quiet"]) == 0
    outputs = tmp_path / "outputs.jsonl"
    replies = {"1": "答案是B。", "2": "答案是AC。", "3": "", "4": "Answer: C"}  # 3: an empty reply
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
    for text in ("Loss", "<svg", "Exam: exam-cmb", "CMB match_choice", "LLM judge (1–5)", "CMB by exam type"):
        assert text in page
    assert {"BLEU-1", "ROUGE-L", "medtune's mean of categories", "empty replies", "safety"} <= set(headers(page))
    assert not {"bleu_1", "rouge_l", "medtune_average", "empty_replies"} & set(headers(page))
    assert "成人正常窦性心律的心率范围是" in page  # exam 1's question, read from the data file
    assert "感冒了一直流鼻涕，需要吃抗生素吗？" in page  # demo-000's last user turn, beside its reply
    assert '<span class="empty">(empty reply)</span>' in row_of(page, "CMB 3")
    out = tmp_path / "report.html"
    out.write_text("not a report", encoding="utf-8")
    assert report.main([str(result.run.root), "--out", str(out)]) == 2  # someone else's file stays
    assert out.read_text(encoding="utf-8") == "not a report"
    out.unlink()
    assert report.main([str(result.run.root), *sum((["--eval", str(e)] for e in evals), []), "--out", str(out)]) == 0
    assert report.main([str(result.run.root), "--out", str(out)]) == 0  # its own page it may replace


def test_exam_section_names_both_cmb_levels_cmexam_prf_and_shows_sample_replies(tmp_path: Path) -> None:
    replies = {"1": "答案是B。", "2": "", "3": "<script>alert(1)</script>", "4": "C"}
    cmexam = {"cmexam:cmexam_test.csv:0": "A", "cmexam:cmexam_test.csv:1": "A", "cmexam:cmexam_test.csv:2": "AB"}
    directory = exam_eval_dir(tmp_path, {**replies, **cmexam})
    scores = json.loads((directory / "scores.json").read_text(encoding="utf-8"))
    page = report.eval_section(directory)

    # CMB's two levels, each under its own name: exam type, then exam class within it
    assert "<caption>CMB by exam type</caption>" in page and "by category" not in page
    assert "<caption>CMB by exam class within exam type</caption>" in page
    assert headers(page.split("CMB by exam class")[1])[:3] == ["exam type", "exam class", "accuracy"]
    assert row_of(page.split("CMB by exam class")[1], "医师考试").startswith("<td>执业助理医师</td>")  # own column
    # CMExam's weighted precision and recall beside its F1 (the three differ here)
    figures = scores["benchmarks"]["cmexam"]
    assert len({round(figures[k], 4) for k in ("precision", "recall", "f1")}) == 3
    assert {"weighted precision", "weighted recall", "weighted F1", "empty replies"} <= set(headers(page))
    assert all(f"{figures[k]:.4f}" in row_of(page, "CMExam") for k in ("precision", "recall", "f1"))
    assert f'<td class="num">{scores["benchmarks"]["cmb"]["empty_replies"]}</td>' in row_of(page, "CMB")
    # sample replies: the question with its options (from the data file), the reply, what was read, gold, correct
    assert "成人正常窦性心律的心率范围是\nA. 40~60次/分" in page
    assert {"question", "model's reply", "extracted", "gold", "correct"} <= set(headers(page))
    assert row_of(page, "CMB 1").endswith("<td>答案是B。</td><td>B</td><td>B</td><td>yes</td>")
    assert '<span class="empty">(empty reply)</span>' in row_of(page, "CMB 2")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in row_of(page, "CMB 3")
    assert "<tr><td>cmexam:cmexam_test.csv:0</td>" in page  # each benchmark shows among the samples

    (tmp_path / "exams.jsonl").unlink()  # the data file moved away: ids only, and why
    page = report.eval_section(directory)
    assert "成人正常窦性心律的心率范围是" not in page and "<tr><td>CMB 1</td>" in page
    assert f"questions not shown: {tmp_path / 'exams.jsonl'}: not found" in page


def test_loglik_samples_show_the_chosen_answer(tmp_path: Path) -> None:
    replies = {"1": "B", "2": "AC", "3": "B", "4": "A"} | {f"cmexam:cmexam_test.csv:{i}": "A" for i in range(3)}
    directory = exam_eval_dir(tmp_path, replies)
    predictions = directory / "predictions.jsonl"
    generated = ("output", "extracted", "strict", "strict_correct")
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    loglik = [{**{k: v for k, v in r.items() if k not in generated}, "chosen": r["extracted"]} for r in rows]
    predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in loglik), encoding="utf-8")
    page = report.eval_section(directory)
    assert "chosen answer" in headers(page) and "model's reply" not in headers(page)
    assert row_of(page, "CMB 2").endswith("<td>AC</td><td>AC</td><td>yes</td>")


def test_dialogue_samples_show_the_last_user_turn_and_mark_empty_replies(tmp_path: Path) -> None:
    """No predictions.jsonl beside the judgements (a copied directory): the question comes from the data file."""
    data = tmp_path / "dialogues.jsonl"
    turns = [
        ("user", "孩子发烧了"),
        ("assistant", "体温多少？"),
        ("user", "三十九度，还咳嗽"),
        ("assistant", "建议就医。"),
    ]
    record = {"id": "d1", "messages": [{"role": role, "content": text} for role, text in turns]}
    data.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    directory = tmp_path / "dialogue"
    directory.mkdir()
    figures = {"dialogues": 1, "bleu_1": 10.0, "rouge_l": 20.0, "distinct_1": 0.5, "refusal_rate": 0.0}
    scores = {"settings": {"data": str(data), "judge": None}, "all": figures, "dialogue": figures, "safety": {}}
    (directory / "scores.json").write_text(json.dumps(scores), encoding="utf-8")
    judged = {"id": "d1", "subset": "dialogue", "reference": "建议就医。", "prediction": "  "}
    (directory / "judgements.jsonl").write_text(json.dumps(judged, ensure_ascii=False) + "\n", encoding="utf-8")
    page = report.eval_section(directory)
    assert {"BLEU-1", "ROUGE-L", "Distinct-1", "refusal rate"} <= set(headers(page))
    assert "三十九度，还咳嗽" in page and "孩子发烧了" not in page  # the last user turn, not the first
    assert row_of(page, "[d1] dialogue").startswith('<td>三十九度，还咳嗽</td><td><span class="empty">(empty reply)')


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
