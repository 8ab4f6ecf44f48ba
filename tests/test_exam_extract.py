"""Official answer extraction of each exam benchmark, on replies written by hand from each rule's text.

The expected answers were worked out from the published code's rules (see medtune/evaluate/extract.py),
including their quirks, not by running medtune.
"""

from __future__ import annotations

import pytest

from medtune.evaluate.extract import (
    CMEXAM_NO_ANSWER,
    cmb_extract,
    cmexam_extract,
    first_option,
    strict_extract,
)


def record(options: str | dict = "ABCDE", multi: bool = False, question_type: str | None = None) -> dict:
    if isinstance(options, str):
        options = {letter: f"选项{letter}内容" for letter in options}
    qtype = question_type or ("多项选择题" if multi else "单项选择题")
    return {"options": options, "multi": multi, "meta": {"question_type": qtype}}


SINGLE, MULTI = record(), record(multi=True)

CMB_CASES = [
    ("答案是B。", SINGLE, "B"),
    ("答案：C", SINGLE, "C"),
    ("正确选项为D。因为其他选项都不对", SINGLE, "D"),
    ("答案应该是A", SINGLE, "A"),
    ("答案应该为E.", SINGLE, "E"),
    ("B", SINGLE, "B"),
    ("我认为是B", SINGLE, "B"),
    ("选B，因为B是正确的", SINGLE, "B"),  # "BB": single choice keeps the first
    ("答案是AC。", MULTI, "AC"),
    ("答案是CA。", MULTI, "CA"),  # order kept: scored wrong against "AC"
    ("答案是A和C", MULTI, "AC"),
    ("正确选项是：B", SINGLE, "B"),
    ("答案：\nB", SINGLE, "B"),  # re.S: the capture runs over the newline to the end
    ("答案是：D。解释：A选项错误", SINGLE, "D"),  # the capture stops at 。
    ("这道题选择D。A、B、C都不对", SINGLE, "D"),  # no phrase: all capitals, first kept
    ("这道题选择D。A、B、C都不对", MULTI, "DABC"),
    ("无法确定", SINGLE, ""),
    ("", SINGLE, ""),
    ("答案是维生素C", SINGLE, "C"),
    ("The answer is B", SINGLE, "B"),  # T is not an option letter
    ("Answer: C", SINGLE, "A"),  # the A of "Answer" comes first: extraction luck
    ("答案为 B.", SINGLE, "B"),
    ("答案是E，因为胰岛素由β细胞分泌。", SINGLE, "E"),
    ("答案是E，因为ACTH升高。", SINGLE, "E"),
    ("答案是E，因为ACTH升高。", MULTI, "EAC"),
    ("ABD", MULTI, "ABD"),
    ("正确选项为A、B、D。", MULTI, "ABD"),
    ("答案：B,D", MULTI, "BD"),
    ("答案是b", SINGLE, ""),  # lower case is not a letter to CMB
    ("答案是。选C", SINGLE, ""),  # the phrase matched with an empty capture: no fall-back to the text
    ("我选Ｃ", SINGLE, ""),  # a full-width letter is not a letter either
    ("答案是G", SINGLE, "G"),  # not among the options, still extracted (and wrong)
    ("答案是ABCDE", MULTI, "ABCDE"),
    ("根据题意，应选A。答案是C", SINGLE, "C"),  # the phrase wins over earlier letters
]


@pytest.mark.parametrize(("text", "rec", "expected"), CMB_CASES)
def test_cmb_match_choice(text: str, rec: dict, expected: str) -> None:
    assert cmb_extract(text, rec) == expected


CMEXAM = record({"A": "青霉素", "B": "庆大霉素", "C": "甲硝唑", "D": "氟康唑", "E": "阿昔洛韦"})
CMEXAM_MULTI = record({"A": "鼠疫", "B": "霍乱", "C": "艾滋病", "D": "肺结核", "E": "麻疹"}, multi=True)
CMEXAM_SPACED = record({"A": "维生素 B1", "B": "叶酸", "C": "铁剂", "D": "钙剂", "E": "锌剂"})
NONE = CMEXAM_NO_ANSWER

CMEXAM_CASES = [
    ("A", CMEXAM, "A"),
    ("答案: A", CMEXAM, "A"),
    ("答案: A 青霉素", CMEXAM, "A"),
    ("青霉素", CMEXAM, "A"),  # an option's text counts as choosing it
    ("答案: B. \n 解释:庆大霉素对革兰阴性菌有效", CMEXAM, "B"),  # 解释: only the first line
    ("首选青霉素，其次是甲硝唑", CMEXAM, "AC"),
    ("答案: A\n解释: 不选C因为甲硝唑针对厌氧菌", CMEXAM, "A"),
    ("答案: A，不选C", CMEXAM, "AC"),  # no 解释: the whole reply, a rejected option counts too
    ("", CMEXAM, NONE),
    ("不知道", CMEXAM, NONE),
    ("The answer is A", CMEXAM, "A"),
    ("Answer: B", CMEXAM, "AB"),  # the A of "Answer"
    ("答案：E 阿昔洛韦", CMEXAM, "E"),
    ("解释：青霉素是首选\n答案：A", CMEXAM, "A"),  # first line is the explanation, naming 青霉素
    ("DNA病毒用阿昔洛韦", CMEXAM, "ADE"),
    ("选庆大霉素和氟康唑", CMEXAM, "BD"),
    ("ABCDE", CMEXAM, "ABCDE"),
    ("答案: a", CMEXAM, NONE),
    ("答案：Ｂ", CMEXAM, NONE),
    ("\n答案: C\n解释: 厌氧菌", CMEXAM, NONE),  # the first line is empty
    ("答案: C 甲硝唑\n解释: 厌氧菌感染", CMEXAM, "C"),
    ("答案: AB", CMEXAM_MULTI, "AB"),
    ("鼠疫和霍乱", CMEXAM_MULTI, "AB"),
    ("答案: BA", CMEXAM_MULTI, "AB"),  # option order, not reply order
    ("霍乱", CMEXAM_MULTI, "B"),
    ("肺结核属于乙类", CMEXAM_MULTI, "D"),
    ("艾滋病", CMEXAM_MULTI, "C"),
    ("答案: A, B\n解释: 甲类传染病包括鼠疫和霍乱", CMEXAM_MULTI, "AB"),
    ("缺乏维生素", CMEXAM_SPACED, "A"),  # only the option's first word is compared
    ("维生素B1缺乏", CMEXAM_SPACED, "AB"),  # and the B of B1 is a letter
    ("答案是：C。", CMEXAM, "C"),
    ("E", CMEXAM, "E"),
]


@pytest.mark.parametrize(("text", "rec", "expected"), CMEXAM_CASES)
def test_cmexam_parse_options(text: str, rec: dict, expected: str) -> None:
    assert cmexam_extract(text, rec) == expected


OPENCOMPASS_CASES = [
    ("答案是A", "ABCDE", "A"),
    ("答案：B", "ABCDE", "B"),
    ("答案: C", "ABCDE", "C"),
    ("答案应该是D", "ABCDE", "D"),
    ("答案应选E", "ABCDE", "E"),
    ("答案为B", "ABCDE", "B"),
    ("我选择C", "ABCDE", "C"),
    ("选D", "ABCDE", "D"),
    ("故选A", "ABCDE", "A"),
    ("B是正确的", "ABCDE", "B"),
    ("选项C正确", "ABCDE", "C"),
    ("所以答B", "ABCDE", "B"),
    ("因此，本题正确的是 A。", "ABCDE", "A"),
    ("A", "ABCDE", "A"),
    ("The answer is C", "ABCDE", "C"),
    ("The answer is (B) because of X", "ABCDE", "B"),
    ("答案是ABC", "ABCDE", "A"),
    ("选项B和C都对，但最佳答案为C", "ABCDE", "C"),  # pattern order, not text order
    ("我觉得B选项比较合理", "ABCDE", "B"),
    ("1. C", "ABCDE", "C"),
    ("正确答案是 D 氟康唑", "ABCDE", "D"),
    ("以上都不对", "ABCDE", ""),
    ("ABCD都不是", "ABCD", "A"),
    ("D. 氟康唑", "ABCDE", "D"),
    ("答案：\nE", "ABCDE", "E"),
    ("不选A，应选C", "ABCDE", "A"),  # the first 选 decides: extraction luck
    ("Answer: B", "ABCD", "B"),
    ("Answer: B.", "ABCD", "B"),
    ("因为D是错的，所以B", "ABCD", "B"),
    ("选择题答案：E", "ABCDE", "E"),
    ("B、C", "ABCD", "B"),
    ("答案是 (C)", "ABCDE", "C"),
    ("E", "ABCD", ""),  # not an option letter of a four-option question
]


@pytest.mark.parametrize(("text", "letters", "expected"), OPENCOMPASS_CASES)
def test_opencompass_first_option(text: str, letters: str, expected: str) -> None:
    assert first_option(text, letters) == expected


STRICT_CASES = [
    ("B", SINGLE, "B"),
    ("  答案是C。 ", SINGLE, "C"),
    ("正确选项为：D", SINGLE, "D"),
    ("答案：A、C", MULTI, "AC"),
    ("C,A", MULTI, "AC"),
    ("答案：A、C", SINGLE, ""),  # two letters for one answer
    ("B. 青霉素", SINGLE, ""),  # more than the answer
    ("我选B", SINGLE, ""),
    ("G", SINGLE, ""),  # not an option
    ("AA", MULTI, ""),
    ("", SINGLE, ""),
]


@pytest.mark.parametrize(("text", "rec", "expected"), STRICT_CASES)
def test_strict_rule(text: str, rec: dict, expected: str) -> None:
    assert strict_extract(text, rec) == expected


def test_enough_hand_written_cases_per_benchmark() -> None:
    counts = {"CMB": len(CMB_CASES), "CMExam": len(CMEXAM_CASES), "OpenCompass": len(OPENCOMPASS_CASES)}
    print("hand-written extraction cases:", counts)
    assert min(counts.values()) >= 30
