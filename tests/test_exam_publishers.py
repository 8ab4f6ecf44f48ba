"""Exam scores as each publisher's own code gives them (issue 24): CMB's answer key compared as written,
CMB's one-character options, CMExam's replies read through pandas.read_csv, the OpenCompass function each
published config uses, medtune's own figures named as medtune's, and empty replies counted.

Expected values come from reading the publishers' code (CMB 6c8ece4, CMExam fadb22c, OpenCompass 14ca958 and
a5acc4b), not from running medtune.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from helpers import REPO

from data_prep.__main__ import main as prep_main
from medtune.evaluate import exam as exam_eval
from medtune.evaluate.extract import (
    CMEXAM_NO_ANSWER,
    PANDAS_NA_STRINGS,
    cmexam_extract,
    extraction_for,
    first_capital,
    first_option,
    first_option_later,
)

FIXTURES = REPO / "tests" / "fixtures" / "exams"
CMB_KEY = FIXTURES / "cmb_key_order_and_short_options.json"  # ids 5218 "EB", 5444 "CA"; one-character options


def convert(source: str, out: Path, *inputs: Path) -> list[dict]:
    assert prep_main([source, *map(str, inputs), "--out", str(out), "--quiet"]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def write_outputs(path: Path, outputs: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "output": v}) + "\n" for k, v in outputs.items()), encoding="utf-8")
    return path


def rescore(tmp_path: Path, data: Path, outputs: dict[str, str], name: str, *extra: str) -> dict:
    pred = write_outputs(tmp_path / f"{name}.outputs.jsonl", outputs)
    assert exam_eval.main(["--score", str(pred), "--data", str(data), "--out", str(tmp_path / name), *extra]) == 0
    return json.loads((tmp_path / name / "scores.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- 1. CMB's key, as written


def test_cmb_key_is_kept_as_written_and_compared_as_cmb_compares(tmp_path: Path) -> None:
    records = {r["id"]: r for r in convert("cmb", tmp_path / "cmb.jsonl", CMB_KEY)}
    assert records["5218"]["answer"] == "BE" and records["5218"]["meta"]["answer_as_written"] == "EB"
    assert records["5444"]["answer"] == "AC" and records["5444"]["meta"]["answer_as_written"] == "CA"
    eb, ca = records["5218"], records["5444"]
    # score.py: model_answer == answer as written. "答案是EB。" is right (medtune used to compare with "BE").
    assert exam_eval.extracted_row(eb, "答案是EB。")["correct"]
    assert not exam_eval.extracted_row(eb, "答案是BE。")["correct"]
    # ...and "AC" on 5444 is wrong (medtune used to count it right), "答案是CA。" right.
    assert not exam_eval.extracted_row(ca, "AC")["correct"]
    row = exam_eval.extracted_row(ca, "答案是CA。")
    assert row["correct"] and row["strict_correct"] and row["answer_as_written"] == "CA"


def test_cmb_scores_official_and_as_sets_side_by_side(tmp_path: Path, capsys) -> None:
    data = tmp_path / "cmb.jsonl"
    convert("cmb", data, CMB_KEY)
    outputs = {"5218": "答案是EB。", "5444": "AC", "7001": "C", "7002": "", "7003": "答案是E"}
    scores = rescore(tmp_path, data, outputs, "s")
    cmb = scores["benchmarks"]["cmb"]
    assert cmb["accuracy"] == 0.6  # 5218, 7001, 7003
    assert cmb["accuracy_as_sets"] == 0.8  # and 5444's "AC", letters in any order
    assert cmb["accuracy_per_subcategory"] == {"医师考试 / 执业医师": 2 / 3, "药师考试 / 初级中药士": 0.5}
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "s" / "predictions.jsonl").read_text().splitlines())}
    assert rows["5444"]["extracted"] == "AC" and not rows["5444"]["correct"]
    assert rows["5218"]["answer_as_written"] == "EB" and "answer_as_written" not in rows["7001"]


# ----------------------------------------------------------------------------- 2. CMB's one-character options


def test_cmb_one_character_options_are_converted_not_skipped(tmp_path: Path, capsys) -> None:
    records = {r["id"]: r for r in convert("cmb", tmp_path / "cmb.jsonl", CMB_KEY)}
    assert "read 5; written 5" in capsys.readouterr().out  # medtune skipped 7001 ("options with gaps") and 7003
    iron = records["7001"]  # C "铁": CMB's prompt leaves it out (len(text) > 1 only) and still scores the key
    assert iron["options"]["C"] == "铁" and iron["answer"] == "C" and iron["meta"]["cmb_prompt_leaves_out"] == "C"
    iodine = records["7003"]  # E "碘" is the answer ("answer not among options" before)
    assert iodine["answer"] == "E" and iodine["meta"]["cmb_prompt_leaves_out"] == "E"
    hepatitis = records["7002"]  # D "无" left out by CMB's prompt; the empty E is no option at all
    assert list(hepatitis["options"]) == ["A", "B", "C", "D"] and hepatitis["meta"]["cmb_prompt_leaves_out"] == "D"
    assert "cmb_prompt_leaves_out" not in records["5218"]["meta"]
    from medtune.data.exam_prompts import question_prompt

    assert "C. 铁" not in question_prompt(iron) and "A. " in question_prompt(iron)  # the prompt CMB's code writes


# ----------------------------------------------------------------------------- 3. CMExam through pandas.read_csv

CMEXAM = {"options": {"A": "青霉素", "B": "庆大霉素", "C": "甲硝唑", "D": "氟康唑", "E": "阿昔洛韦"}}


@pytest.mark.parametrize("reply", ["NA", "N/A", "n/a", "#N/A", "NULL", "null", "None", "NaN", "nan", "<NA>", "-NaN"])
def test_cmexam_pandas_na_replies_are_no_answer(reply: str) -> None:
    assert cmexam_extract(reply, CMEXAM) == CMEXAM_NO_ANSWER  # medtune read "NA" and "N/A" as "A"


@pytest.mark.parametrize(("reply", "expected"), [(" NA", "A"), ("NA。", "A"), ("答案: NA", "A"), ("N/A B", "AB")])
def test_cmexam_only_a_whole_na_field_is_nan(reply: str, expected: str) -> None:
    assert cmexam_extract(reply, CMEXAM) == expected


def test_cmexam_na_strings_are_what_pandas_reads_as_nan() -> None:
    pd = pytest.importorskip("pandas")
    replies = sorted(PANDAS_NA_STRINGS) + [" NA", "NA ", "na", "Na", "NONE", "A", "答案: NA"]
    buffer = io.StringIO()
    pd.DataFrame({"model_result": replies, "Answer": ["A"] * len(replies)}).to_csv(buffer, index=False)
    read = pd.read_csv(io.StringIO(buffer.getvalue()))["model_result"]
    print(f"pandas {pd.__version__}: NaN for {[r for r, v in zip(replies, read, strict=True) if pd.isna(v)]}")
    assert [pd.isna(v) for v in read] == [r in PANDAS_NA_STRINGS for r in replies]


# ----------------------------------------------------------------------------- 4. OpenCompass: each config's function

FIRST_CAPITAL_CASES = [
    ("B", "B"),
    ("答案：B", "B"),
    ("The answer is B", "T"),  # any upper-case character
    ("Answer: C", "A"),
    ("答案是Ｃ", "Ｃ"),  # full-width is upper case too (and wrong)
    ("答案是b", ""),
    ("E", "E"),  # not an option of a four-option question, still read
    ("β细胞，选D", "D"),  # β is lower case
    ("", ""),
]


@pytest.mark.parametrize(("text", "expected"), FIRST_CAPITAL_CASES)
def test_first_capital_postprocess(text: str, expected: str) -> None:
    assert first_capital(text) == expected


def test_each_benchmark_reads_replies_with_its_published_configs_function() -> None:
    cmmlu, ceval, medqa = extraction_for("cmmlu"), extraction_for("ceval"), extraction_for("medqa-mcmle")
    assert (cmmlu.function, cmmlu.config) == ("OpenCompass first_capital_postprocess", "cmmlu_gen_c13365")
    assert ceval.function == cmmlu.function and ceval.config == "ceval_gen_5f30c7, ceval_gen_2daf24"
    assert medqa.function == "OpenCompass first_option_postprocess(options='ABCD')"
    assert medqa.config.startswith("MedQA_gen_3bf756") and medqa.commit.startswith("98242ff")
    assert extraction_for("ceval", "first_option").config == "ceval_zero_shot_gen_bd40ef"
    assert extraction_for("ceval", "first_option").commit == "14ca958"
    assert extraction_for("cmb", "first_option").function == "CMB match_choice"  # CMB and CMExam keep their own
    medqa_record = {"options": dict.fromkeys("ABCDE", "x")}
    assert medqa.read("答案是E", medqa_record) == ""  # options 'ABCD': MedQA's E is never read
    assert medqa.read("答案是C", medqa_record) == "C"


def test_first_option_postprocess_before_and_after_its_2024_change() -> None:
    # 14ca958: the first option letter in the whole match; 98242ff: in the first group, else the next pattern
    assert first_option("DNA检测 C 阳性", "ABCD") == "C"
    assert first_option_later("DNA检测 C 阳性", "ABCD") == "D"
    assert first_option_later("The correct answer is \\boxed{C}", "ABCD") == "C"
    assert first_option_later("  答案选项为 B  ", "ABCD") == "B"


def test_extractor_option_rescores_cmmlu_and_names_config_and_commit(tmp_path: Path, capsys) -> None:
    data = tmp_path / "cmmlu.jsonl"
    ids = [r["id"] for r in convert("cmmlu", data, FIXTURES / "cmmlu" / "clinical_knowledge.csv")]
    outputs = dict(zip(ids, ["The answer is B", "答案：C", "答案是B"], strict=True))  # gold B, C, B
    official = rescore(tmp_path, data, outputs, "official")
    assert official["benchmarks"]["cmmlu"]["accuracy"] == 2 / 3  # "T" of "The"
    assert official["settings"]["extractor"] == "official"
    assert official["benchmarks"]["cmmlu"]["extraction"] == {
        "function": "OpenCompass first_capital_postprocess",
        "config": "cmmlu_gen_c13365",
        "commit": "a5acc4b",
        "note": "the reply's first upper-case character, an option letter or not (the T of 'The')",
    }
    line = "OpenCompass first_capital_postprocess (cmmlu_gen_c13365; commit a5acc4b)"
    assert official["extraction"]["cmmlu"] == line
    option = rescore(tmp_path, data, outputs, "option", "--extractor", "first_option")
    assert option["benchmarks"]["cmmlu"]["accuracy"] == 1.0
    assert option["benchmarks"]["cmmlu"]["extraction"]["commit"] == "14ca958"
    assert option["settings"]["extractor"] == "first_option"


def test_extractor_is_refused_where_nothing_is_extracted(tmp_path: Path, capsys) -> None:
    data = tmp_path / "cmb.jsonl"
    convert("cmb", data, CMB_KEY)
    with pytest.raises(SystemExit):
        exam_eval.main(["run", "--data", str(data), "--out", str(tmp_path / "e"), "--extractor", "first_option"])
    assert "--extractor reads generated replies: use it with --mode generate or --score" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 5. and 6. what the user reads


def test_empty_replies_are_counted_and_medtunes_average_is_named_as_medtunes(tmp_path: Path, capsys) -> None:
    data = tmp_path / "cmb.jsonl"
    convert("cmb", data, FIXTURES / "cmb_val.json")
    capsys.readouterr()
    scores = rescore(tmp_path, data, {"1": "", "2": " \n", "3": "", "4": ""}, "empty")
    cmb = scores["benchmarks"]["cmb"]
    assert cmb["empty_replies"] == 4 and cmb["no_answer"] == 4 and cmb["accuracy"] == 0.0
    assert "average" not in cmb and cmb["medtune_average"] == 0.0
    assert cmb["note"].startswith("CMB's score.py publishes accuracy_per_category and accuracy_per_subcategory only")
    printed = capsys.readouterr().out
    assert (
        "cmb: 4 questions, accuracy 0.0000 (medtune_average 0.0000: medtune's mean of the categories, not CMB's), "
        "strict 0.0000, no answer found 4, empty replies 4\n"
    ) in printed


def test_a_repeated_output_id_names_both_lines(tmp_path: Path, capsys) -> None:
    data = tmp_path / "cmb.jsonl"
    convert("cmb", data, FIXTURES / "cmb_val.json")
    pred = tmp_path / "outputs.jsonl"
    pred.write_text("".join(json.dumps({"id": i, "output": "B"}) + "\n" for i in ["1", "2", "1", "3", "4"]))
    capsys.readouterr()
    assert exam_eval.main(["--score", str(pred), "--data", str(data), "--out", str(tmp_path / "s")]) == 2
    assert f"{pred}: id '1' is on line 1 and again on line 3; keep one reply per id" in capsys.readouterr().err


def test_a_repeated_question_id_names_both_lines(tmp_path) -> None:
    from medtune.data.records import RecordError, read_kind

    exam = {"id": "q1", "source": "cmb", "question": "问题", "options": {"A": "甲", "B": "乙"}, "answer": "A"}
    exam["multi"] = False
    path = tmp_path / "exams.jsonl"
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in (exam, {**exam, "id": "q2"}, exam)))
    with pytest.raises(RecordError, match=rf"{path}:3: id 'q1' is also on line 1; answers are matched back"):
        read_kind(path, "exam", "hint")
