"""Each exam benchmark's official answer extraction, reproduced exactly, and one strict rule beside them.

Published Chinese medical exam scores differ as much by how an answer is read out of a reply as by
the model. Each benchmark's own rule is reproduced here so a medtune number is comparable with the
published ones; the strict rule (a reply that is only the answer letters, optionally after
答案是/正确选项为) shows how much of an official number comes from lenient reading.

- CMB (FreedomIntelligence/CMB, src/utils.py ``match_choice`` and ``extract_ans``): the letters A–G in
  what follows 答案/正确选项 + 是/：/为/应该是/应该为, up to 。 or . or the end; without that phrase,
  every capital A–G in the reply. A single-choice question keeps the first letter. Compared with the
  gold answer as strings, so order matters ("CA" is not "AC").
- CMExam (williamliujl/CMExam, src/evaluation ``parse_options``): if the reply mentions 解释, only its
  first line counts; every option whose letter, or whose text's first word, occurs is chosen, in
  option order; none → "无答案".
- MedQA-MCMLE, CMMLU, C-Eval: OpenCompass's ``first_option_postprocess`` (opencompass/utils/
  text_postprocessors.py at commit 14ca958): the first of an ordered list of patterns that matches
  (re.DOTALL) decides; the answer is the first option letter, in option order, inside the whole match.
  Two quirks are kept: a missing comma there joins the 故选 pattern to the next one, and the
  "1. …" catch-all comes before its stricter twin.
"""

from __future__ import annotations

import re
from collections.abc import Callable

NO_ANSWER = ""  # what the strict rule and the OpenCompass rule give when no letter is found
CMEXAM_NO_ANSWER = "无答案"  # CMExam's own marker

# ----------------------------------------------------------------------------- CMB

_CMB_LETTERS = "ABCDEFG"
_CMB_PHRASE = re.compile(r"(答案|正确选项)(?:是|：|为|应该是|应该为)(.*?)(。|\.|$)", re.S)


def cmb_match_choice(text: str) -> str:
    found = _CMB_PHRASE.search(text)
    source = found.group(2) if found else text
    return "".join(ch for ch in source if ch in _CMB_LETTERS)


def cmb_extract(text: str, record: dict) -> str:
    choice = cmb_match_choice(text)
    if len(choice) > 1 and record.get("meta", {}).get("question_type", "") != "多项选择题":
        choice = choice[0]
    return choice


# ----------------------------------------------------------------------------- CMExam


def cmexam_extract(text: str, record: dict) -> str:
    reply = text.split("\n")[0].strip() if "解释" in text else text
    chosen = [
        letter
        for letter, option in record["options"].items()
        if letter in reply or option.split()[0] in reply  # the official split keeps an option's first word
    ]
    return "".join(chosen) if chosen else CMEXAM_NO_ANSWER


# ----------------------------------------------------------------------------- OpenCompass


def _opencompass_patterns(o: str) -> list[str]:
    return [
        rf"答案是?\s*([{o}])",
        rf"答案是?\s*：\s*([{o}])",
        rf"答案是?\s*:\s*([{o}])",
        rf"答案应该?是\s*([{o}])",
        rf"答案应该?选\s*([{o}])",
        rf"答案为\s*([{o}])",
        rf"答案选\s*([{o}])",
        rf"选择?\s*([{o}])",
        rf"故选?\s*([{o}])" rf"只有选?项?\s?([{o}])\s?是?对",  # joined in the original (missing comma)
        rf"只有选?项?\s?([{o}])\s?是?错",
        rf"只有选?项?\s?([{o}])\s?不?正确",
        rf"只有选?项?\s?([{o}])\s?错误",
        rf"说法不?对选?项?的?是\s?([{o}])",
        rf"说法不?正确选?项?的?是\s?([{o}])",
        rf"说法错误选?项?的?是\s?([{o}])",
        rf"([{o}])\s?是正确的",
        rf"([{o}])\s?是正确答案",
        rf"选项\s?([{o}])\s?正确",
        rf"所以答\s?([{o}])",
        rf"所以\s?([{o}][.。$]?$)",
        rf"所有\s?([{o}][.。$]?$)",
        rf"[\s，：:,]([{o}])[。，,\.]?$",
        rf"[\s，,：:][故即]([{o}])[。\.]?$",
        rf"[\s，,：:]因此([{o}])[。\.]?$",
        rf"[是为。]\s?([{o}])[。\.]?$",
        rf"因此\s?([{o}])[。\.]?$",
        rf"显然\s?([{o}])[。\.]?$",
        r"答案是\s?(\S+)(?:。|$)",
        r"答案应该是\s?(\S+)(?:。|$)",
        r"答案为\s?(\S+)(?:。|$)",
        rf"[Tt]he answer is:?\s+\(?([{o}])\)?",
        rf"[Tt]he answer is option:?\s+\(?([{o}])\)?",
        rf"[Tt]he correct answer is:?\s+\(?([{o}])\)?",
        rf"[Tt]he correct answer is option:?\s+\(?([{o}])\)?",
        rf"[Tt]he answer to the question is:?\s+\(?([{o}])\)?",
        rf"^选项\s?([{o}])",
        rf"^([{o}])\s?选?项",
        rf"(\s|^)[{o}][\s。，,：:\.$]",
        r"1.\s?(.*?)$",
        rf"1.\s?([{o}])[.。$]?$",
        # the "cushion" patterns, on by default
        rf"([{o}]):",
        rf"([{o}])",
    ]


_PATTERNS: dict[str, list[re.Pattern]] = {}


def first_option(text: str, letters: str) -> str:
    """OpenCompass's first_option_postprocess(text, letters) with cushion=True."""
    if letters not in _PATTERNS:
        _PATTERNS[letters] = [re.compile(p, re.DOTALL) for p in _opencompass_patterns(letters)]
    for pattern in _PATTERNS[letters]:
        found = pattern.search(text)
        if found:
            whole = found.group(0)
            for letter in letters:
                if letter in whole:
                    return letter
    return NO_ANSWER


def opencompass_extract(text: str, record: dict) -> str:
    return first_option(text, "".join(record["options"]))


# ----------------------------------------------------------------------------- strict

_STRICT = re.compile(
    r"^\s*(?:(?:答案|正确答案|正确选项)\s*(?:应该是|应该为|是|为)?\s*[：:]?\s*)?"
    r"([A-G](?:\s*[、,，和及]?\s*[A-G])*)\s*[。.．]?\s*$"
)


def strict_extract(text: str, record: dict) -> str:
    """The letters of a reply that is nothing but the answer; "" for anything else (counted wrong)."""
    found = _STRICT.match(text)
    if not found:
        return NO_ANSWER
    letters = re.sub(r"[^A-G]", "", found.group(1))
    if any(a not in record["options"] for a in letters) or len(set(letters)) != len(letters):
        return NO_ANSWER
    if not record["multi"] and len(letters) != 1:
        return NO_ANSWER
    return "".join(sorted(letters))


# source → (the official rule's name, the rule); every source converted by data_prep's exam sources
OFFICIAL: dict[str, tuple[str, Callable[[str, dict], str]]] = {
    "cmb": ("CMB match_choice", cmb_extract),
    "cmexam": ("CMExam parse_options", cmexam_extract),
    "medqa-mcmle": ("OpenCompass first_option_postprocess", opencompass_extract),
    "cmmlu": ("OpenCompass first_option_postprocess", opencompass_extract),
    "ceval": ("OpenCompass first_option_postprocess", opencompass_extract),
}
