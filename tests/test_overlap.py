"""`medtune data overlap`: planted copies of benchmark items are found — exact, re-punctuated, partial — and
disjoint data shows none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import DEMO_DATA, REPO

from data_prep.__main__ import main as prep_main
from medtune.data.overlap import main, normalised, overlap

QUESTION = "患者男性，45岁，反复上腹部疼痛三年，进食后加重，夜间痛醒，最可能的诊断是"
OPTIONS = {"A": "胃溃疡", "B": "十二指肠溃疡", "C": "慢性胃炎", "D": "胃癌"}
HEART = "成人正常窦性心律的心率范围是每分钟多少次呢"
DKA = "下列哪项是糖尿病酮症酸中毒最常见的诱因，请选择最合适的一项"


def exam_file(tmp_path: Path) -> Path:
    heart = {"A": "40", "B": "60~100"}
    dka = {"A": "感染", "B": "饮食"}
    exams = [
        {"id": "q1", "source": "cmb", "question": QUESTION, "options": OPTIONS, "answer": "B", "multi": False},
        {"id": "q2", "source": "cmb", "question": HEART, "options": heart, "answer": "B", "multi": False},
        {"id": "q3", "source": "cmexam", "question": DKA, "options": dka, "answer": "A", "multi": False},
    ]
    path = tmp_path / "exams.jsonl"
    lines = (json.dumps({**e, "category": ["内科"]}, ensure_ascii=False) + "\n" for e in exams)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def chat(record_id: str, question: str, answer: str = "好的。") -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"id": record_id, "source": "train", "messages": messages}


def test_planted_copies_are_found_and_disjoint_data_shows_none(tmp_path: Path) -> None:
    exams = exam_file(tmp_path)
    demo = [json.loads(line) for line in DEMO_DATA.read_text(encoding="utf-8").splitlines()]
    planted = [
        chat("exact", QUESTION + "".join(OPTIONS.values())),
        chat("respelt", "成人 正常窦性心律的心率范围是，每分钟多少次呢？？"),  # other spacing and punctuation
        chat("partial", "病例：下列哪项是糖尿病酮症酸中毒最常见的诱因？这是一个很长的病例描述，和原题大部分不同"),
    ]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in demo + planted), encoding="utf-8")
    report = overlap([train], [exams])
    cmb, cmexam = report["benchmarks"]["cmb"], report["benchmarks"]["cmexam"]
    assert (cmb["items"], cmb["contaminated"], cmb["near_duplicates"]) == (2, 2, 2)
    assert (cmexam["items"], cmexam["contaminated"], cmexam["near_duplicates"]) == (1, 1, 0)  # partial: not near
    assert {e["id"]: e["shares"] for e in cmb["listed"]} == {
        "q1": ["train.jsonl:exact"],
        "q2": ["train.jsonl:respelt"],
    }
    clean = tmp_path / "clean.jsonl"
    report = overlap([DEMO_DATA], [exams], clean_out=clean)
    assert all(entry["contaminated"] == 0 for entry in report["benchmarks"].values())
    assert clean.read_text(encoding="utf-8") == DEMO_DATA.read_text(encoding="utf-8").replace("\r\n", "\n")


def test_the_real_exam_fixtures_against_the_demo_set_and_the_cli(tmp_path: Path, capsys) -> None:
    cmb = tmp_path / "cmb.jsonl"
    assert prep_main(["cmb", str(REPO / "tests/fixtures/exams/cmb_val.json"), "--out", str(cmb), "--quiet"]) == 0
    capsys.readouterr()
    train = tmp_path / "train.jsonl"
    first = json.loads(cmb.read_text(encoding="utf-8").splitlines()[0])
    text = DEMO_DATA.read_text(encoding="utf-8") + json.dumps(
        chat("leak", first["question"] + "".join(first["options"].values())), ensure_ascii=False
    )
    train.write_text(text + "\n", encoding="utf-8")
    report_file, clean = tmp_path / "report.json", tmp_path / "clean.jsonl"
    argv = [str(train), "--against", str(cmb), "--json", str(report_file), "--write-clean", str(clean)]
    assert main(["overlap", *argv]) == 0
    out = capsys.readouterr().out
    assert "cmb: 1 of 4 items share a 13-gram with the training data (25.0%), 1 are near-duplicates" in out
    assert len(clean.read_text(encoding="utf-8").splitlines()) == 40
    assert json.loads(report_file.read_text())["benchmarks"]["cmb"]["listed"][0]["shares"] == ["train.jsonl:leak"]
    before = clean.read_bytes()
    assert main(["overlap", *argv]) == 2  # a second run never replaces files silently
    assert f"{report_file}: exists; pass --overwrite" in capsys.readouterr().err and clean.read_bytes() == before
    assert main(["overlap", *argv, "--overwrite"]) == 0 and clean.read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "2"], "--n must be at least 4 and --near in (0, 1]"),
        (["--write-clean", "TRAIN"], "is one of the inputs; write elsewhere"),
    ],
)
def test_bad_options_are_one_line(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    exams = exam_file(tmp_path)
    argv = [str(DEMO_DATA) if a == "TRAIN" else a for a in argv]
    assert main(["overlap", str(DEMO_DATA), "--against", str(exams), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_normalising_drops_what_a_copy_changes() -> None:
    assert normalised("成人 正常，窦性心律！ＡＢ c") == normalised("成人正常窦性心律abc") == "成人正常窦性心律abc"


def test_eval_dialogue_reports_what_the_runs_training_data_holds(trained, tmp_path: Path, capsys) -> None:
    """The run trained on the demo set: its own dialogues are all contaminated; against another training file,
    none are. The count stands in scores.json and beside the printed score."""
    from medtune.evaluate.dialogue import main as dialogue_main

    result, _, _ = trained
    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_text("".join(DEMO_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), "utf-8")
    argv = [str(result.run.root), "--data", str(dialogues), "--max-new-tokens", "4"]
    assert dialogue_main([*argv, "--out", str(tmp_path / "own")]) == 0
    assert "contamination: 3 of 3 items share a 13-character gram with the 40 training records" in (
        capsys.readouterr().out
    )
    scores = json.loads((tmp_path / "own" / "scores.json").read_text(encoding="utf-8"))
    assert scores["contamination"]["contaminated_ids"] == ["demo-000", "demo-001", "demo-002"]
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(chat("x", QUESTION), ensure_ascii=False) + "\n", encoding="utf-8")
    assert dialogue_main([*argv, "--out", str(tmp_path / "other"), "--train-files", str(other)]) == 0
    assert "contamination: 0 of 3 items" in capsys.readouterr().out


def test_eval_exam_and_the_report_show_the_count(trained, tmp_path: Path, capsys) -> None:
    from medtune.evaluate.exam import main as exam_main
    from medtune.evaluate.report import main as report_main

    result, _, _ = trained
    exams = exam_file(tmp_path)
    leak = tmp_path / "leak.jsonl"
    leak.write_text(json.dumps(chat("l", QUESTION + "".join(OPTIONS.values())), ensure_ascii=False) + "\n", "utf-8")
    out = tmp_path / "exam"
    argv = [str(result.run.root), "--data", str(exams), "--out", str(out), "--train-files", str(leak)]
    assert exam_main(argv) == 0
    assert "contamination: 1 of 3 items share a 13-character gram with the 1 training records" in (
        capsys.readouterr().out
    )
    assert json.loads((out / "scores.json").read_text())["contamination"]["contaminated_ids"] == ["q1"]
    page = tmp_path / "report.html"
    assert report_main([str(result.run.root), "--eval", str(out), "--out", str(page)]) == 0
    assert "contamination: 1 of 3 items share a 13-character gram" in page.read_text(encoding="utf-8")


def test_a_question_asked_as_eval_asks_it_is_a_near_duplicate(tmp_path: Path) -> None:
    """A training record holding an exam question in its benchmark's wording (letters before the options, as
    eval exam and the exam reward ask it) is a near-duplicate, and every matching record is counted."""
    from medtune.data.exam_prompts import question_prompt

    exams = exam_file(tmp_path)
    first = json.loads(exams.read_text(encoding="utf-8").splitlines()[0])
    train = tmp_path / "train.jsonl"
    copies = [chat(f"c{i}", question_prompt(first)) for i in range(8)]
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in copies), encoding="utf-8")
    listed = overlap([train], [exams])["benchmarks"]["cmb"]["listed"][0]
    assert listed["id"] == "q1" and listed["records"] == 8 and len(listed["near"]) == 5 and len(listed["shares"]) == 5
