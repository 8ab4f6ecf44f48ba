"""Each exam benchmark's official answer extraction, reproduced exactly, and one strict rule beside them.

Published Chinese medical exam scores differ as much by how an answer is read out of a reply as by
the model. Each benchmark's own rule is reproduced here so a medtune number is comparable with the
published ones; the strict rule (a reply that is only the answer letters, optionally after
答案是/正确选项为) shows how much of an official number comes from lenient reading.

- CMB (FreedomIntelligence/CMB at 6c8ece4: src/utils.py ``match_choice`` and ``extract_ans``, score.py):
  the letters A–G in what follows 答案/正确选项 + 是/：/为/应该是/应该为, up to 。 or . or the end;
  without that phrase, every capital A–G in the reply. A single-choice question keeps the first letter.
  score.py compares that string with the answer key's string as written, so order matters: "CA" is not
  "AC", and the key itself has four unsorted answers (test ids 5218 "EB", 5255 "EC", 5313 "DB",
  5444 "CA"); data_prep keeps the key's string in meta.answer_as_written (see ``official_gold``).
- CMExam (williamliujl/CMExam at fadb22c, src/evaluation/evaluate_lora_result.py ``parse_options``): the
  replies are read back with ``pandas.read_csv``, so a reply that is one of pandas' default NA strings
  is NaN, which is "无答案"; otherwise, if the reply mentions 解释, only its first line counts; every
  option whose letter, or whose text's first word, occurs is chosen, in option order; none → "无答案".
- MedQA-MCMLE, CMMLU, C-Eval: OpenCompass (open-compass/opencompass, opencompass/utils/
  text_postprocessors.py), each with the post-processor of its published config (``OPENCOMPASS``):
  ``first_capital_postprocess`` (the reply's first upper-case character, whatever it is) for CMMLU
  (cmmlu_gen_c13365) and C-Eval (ceval_gen_5f30c7, ceval_gen_2daf24), ``first_option_postprocess``
  with options 'ABCD' for MedQA (MedQA_gen_3bf756). ``first_option_postprocess`` changed in 2024
  (98242ff: the reply stripped, the letter looked for in group(1), 10 more patterns; unchanged since, at
  HEAD a5acc4b). MedQA_gen_3bf756 appeared after that (6097186, 2025), so MedQA is read by the later
  function; the earlier one (14ca958, the one ceval_zero_shot_gen_bd40ef first ran with) is what
  ``--extractor first_option`` gives CMMLU and C-Eval. Both keep the originals' quirks: a missing comma
  joins the 故选 pattern to the next one, and the "1. …" catch-all comes before its stricter twin.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

NO_ANSWER = ""  # what the strict rule and the OpenCompass rules give when no letter is found
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


def official_gold(record: dict) -> str:
    """The answer string a benchmark's own score compares an extracted answer with: for CMB the answer key's
    string as written (unsorted where the key is), for every other benchmark the record's answer."""
    if record["source"] == "cmb":
        return record.get("meta", {}).get("answer_as_written", record["answer"])
    return record["answer"]


# ----------------------------------------------------------------------------- CMExam

# pandas.read_csv's default na_values (keep_default_na=True): pandas._libs.parsers.STR_NA_VALUES, listed in
# the read_csv docs under na_values (pandas 2.x and 3.x; "None" since 2.0). A field equal to one of them,
# whole, reads as NaN; CMExam's parse_options answers "无答案" for anything that is not a string.
PANDAS_NA_STRINGS = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN"]
    + ["<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
)


def cmexam_extract(text: str, record: dict) -> str:
    if text in PANDAS_NA_STRINGS:  # read_csv made it NaN: not a str, so no answer
        return CMEXAM_NO_ANSWER
    reply = text.split("\n")[0].strip() if "解释" in text else text
    chosen = [
        letter
        for letter, option in record["options"].items()
        if letter in reply or option.split()[0] in reply  # the official split keeps an option's first word
    ]
    return "".join(chosen) if chosen else CMEXAM_NO_ANSWER


# ----------------------------------------------------------------------------- OpenCompass


def first_capital(text: str) -> str:
    """OpenCompass's first_capital_postprocess: the first character that is upper case (str.isupper), any
    letter of any script ("T" of "The", a full-width "Ｃ"), not only an option letter."""
    return next((ch for ch in text if ch.isupper()), NO_ANSWER)


def _opencompass_patterns(o: str) -> list[str]:
    """first_option_postprocess's patterns at 14ca958, cushion patterns included (cushion=True)."""
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


def _later_patterns(o: str) -> list[str]:
    """first_option_postprocess's patterns since 98242ff (as at a5acc4b): 14ca958's, each followed by what
    was added after it."""
    added = {
        rf"答案是?\s*:\s*([{o}])": [rf"答案选项应?该?是\s*([{o}])", rf"答案选项应?该?为\s*([{o}])"],
        rf"答案应该?选\s*([{o}])": [
            rf"答案选项为?\s*：\s*([{o}])",
            rf"答案选项为?\s+\(?\*?\*?([{o}])\*?\*?\)?",
            rf"答案选项是?\s*:\s*([{o}])",
        ],
        r"答案为\s?(\S+)(?:。|$)": [rf"(?i)ANSWER\s*:\s*([{o}])"],
        rf"[Tt]he answer is:?\s+\(?([{o}])\)?": [rf"[Tt]he answer is:?\s+\(?\*?\*?([{o}])\*?\*?\)?"],
        rf"[Tt]he correct answer is option:?\s+\(?([{o}])\)?": [
            rf"[Tt]he correct answer is:?.*?boxed{{([{o}])}}",
            rf"[Tt]he correct option is:?.*?boxed{{([{o}])}}",
            rf"[Tt]he correct answer option is:?.*?boxed{{([{o}])}}",
        ],
    }
    return [q for p in _opencompass_patterns(o) for q in (p, *added.get(p, []))]


_PATTERNS: dict[tuple[str, bool], list[re.Pattern]] = {}


def _compiled(letters: str, later: bool) -> list[re.Pattern]:
    if (letters, later) not in _PATTERNS:
        patterns = _later_patterns(letters) if later else _opencompass_patterns(letters)
        _PATTERNS[letters, later] = [re.compile(p, re.DOTALL) for p in patterns]
    return _PATTERNS[letters, later]


def first_option(text: str, letters: str) -> str:
    """OpenCompass's first_option_postprocess(text, letters) with cushion=True, as at commit 14ca958: the
    first pattern that matches decides, and the answer is the first option letter inside the whole match."""
    for pattern in _compiled(letters, later=False):
        found = pattern.search(text)
        if found:
            whole = found.group(0)
            for letter in letters:
                if letter in whole:
                    return letter
    return NO_ANSWER


def first_option_later(text: str, letters: str) -> str:
    """first_option_postprocess as changed in 98242ff (unchanged at HEAD a5acc4b): the reply stripped, more
    patterns, and the letter looked for in the first group (the whole match when that group is empty); a
    match with no option letter there lets the next pattern try."""
    text = text.strip()
    for pattern in _compiled(letters, later=True):
        found = pattern.search(text)
        if found:
            part = found.group(1) or found.group(0)
            for letter in letters:
                if letter in part:
                    return letter
    return NO_ANSWER


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


# ----------------------------------------------------------------------------- which rule, where from


@dataclass(frozen=True)
class Extraction:
    """One way of reading an answer out of a reply, and where it is published (written into scores.json)."""

    function: str  # the function as its publisher names it, with its arguments
    read: Callable[[str, dict], str]  # (reply, exam record) → the extracted answer
    config: str  # the published script or config that reads replies this way
    commit: str  # the publisher's commit of the function medtune reproduces
    note: str = ""

    def describe(self) -> dict[str, str]:
        fields = {"function": self.function, "config": self.config, "commit": self.commit}
        return {**fields, "note": self.note} if self.note else fields

    def line(self) -> str:
        return f"{self.function} ({self.config}; commit {self.commit})"


EXTRACTORS = ("official", "first_capital", "first_option")  # medtune eval exam --extractor
_FIRST_CAPITAL = "OpenCompass first_capital_postprocess"
_FIRST_OPTION = "OpenCompass first_option_postprocess(options='ABCD')"
_LATER = "98242ff (unchanged at HEAD a5acc4b)"
_CAPITAL_NOTE = "the reply's first upper-case character, an option letter or not (the T of 'The')"
_PIN_NOTE = "first_option_postprocess as at 14ca958, before OpenCompass changed it in 98242ff"


def _capital(text: str, record: dict) -> str:
    return first_capital(text)


def _option_14ca958(text: str, record: dict) -> str:
    return first_option(text, "ABCD")  # the configs pass 'ABCD', whatever the question's letters


def _option_later(text: str, record: dict) -> str:
    return first_option_later(text, "ABCD")


_MEDQA = Extraction(
    _FIRST_OPTION,
    _option_later,
    "MedQA_gen_3bf756 (added in 6097186)",
    _LATER,
    "options 'ABCD' as the config passes them: MedQA-MCMLE's fifth option, E, is never read",
)
# source → the rule its publisher scores with; every source converted by data_prep's exam sources
OFFICIAL: dict[str, Extraction] = {
    "cmb": Extraction(
        "CMB match_choice",
        cmb_extract,
        "FreedomIntelligence/CMB src/utils.py extract_ans, score.py",
        "6c8ece4",
        "compared with the answer key's string as written: order matters",
    ),
    "cmexam": Extraction(
        "CMExam parse_options",
        cmexam_extract,
        "williamliujl/CMExam src/evaluation/evaluate_lora_result.py",
        "fadb22c",
        "replies read with pandas.read_csv: its default NA strings (NA, N/A, null, ...) are no answer",
    ),
    "medqa-mcmle": _MEDQA,
    "cmmlu": Extraction(_FIRST_CAPITAL, _capital, "cmmlu_gen_c13365", "a5acc4b", _CAPITAL_NOTE),
    "ceval": Extraction(_FIRST_CAPITAL, _capital, "ceval_gen_5f30c7, ceval_gen_2daf24", "a5acc4b", _CAPITAL_NOTE),
}
# --extractor first_capital|first_option on the OpenCompass benchmarks (CMB and CMExam keep their own rule)
OPENCOMPASS: dict[str, dict[str, Extraction]] = {
    "medqa-mcmle": {
        "first_option": _MEDQA,
        "first_capital": Extraction(_FIRST_CAPITAL, _capital, "none published for MedQA", "a5acc4b", _CAPITAL_NOTE),
    },
    "cmmlu": {
        "first_capital": OFFICIAL["cmmlu"],
        "first_option": Extraction(
            _FIRST_OPTION,
            _option_14ca958,
            "none published for CMMLU (C-Eval's ceval_zero_shot_gen_bd40ef)",
            "14ca958",
            _PIN_NOTE,
        ),
    },
    "ceval": {
        "first_capital": OFFICIAL["ceval"],
        "first_option": Extraction(_FIRST_OPTION, _option_14ca958, "ceval_zero_shot_gen_bd40ef", "14ca958", _PIN_NOTE),
    },
}


def extraction_for(source: str, extractor: str = "official") -> Extraction:
    """The rule a benchmark's replies are read with: its publisher's, or the chosen OpenCompass function."""
    if extractor == "official" or source not in OPENCOMPASS:
        return OFFICIAL[source]
    return OPENCOMPASS[source][extractor]
