"""Medical exam benchmarks → exam records (question, lettered options, gold letters, category path).

Each source reads the files as their publishers ship them:

- cmb:          FreedomIntelligence/CMB `CMB-Exam` JSON (exam_type, exam_class, exam_subject,
                question_type 单项选择题/多项选择题, question, option {A..E}, answer); the answer key's
                string is kept as written in meta.answer_as_written (CMB scores against it, unsorted), and
                meta.cmb_prompt_leaves_out names the one-character options CMB's prompt does not show
- cmexam:       williamliujl/CMExam CSV (Question, Options as lines "A 选项", Answer, Explanation, ...)
- medqa-mcmle:  jind11/MedQA `questions/Mainland/*.jsonl` (question, options {A..E}, answer, answer_idx, meta_info)
- cmmlu:        CMMLU CSV, one file per subject (",Question,A,B,C,D,Answer"), subject from the file name
- ceval:        C-Eval CSV, one file per subject and split (id,question,A..D,answer,explanation)

For CMMLU and C-Eval only the medical subjects are kept unless --subjects says otherwise. The prompt a
question is asked with belongs to `medtune eval exam` (medtune/exam_prompts.py), not to the record, so
one converted file serves loglik, generate and any number of shots.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path

from data_prep.pipeline import Item, Options, PrepError, Skip, record_id, text_field

# CMMLU's and C-Eval's medical subjects (file-name stem → the Chinese name their official prompts use).
CMMLU_MEDICAL = {
    "anatomy": "解剖学",
    "clinical_knowledge": "临床知识",
    "college_medical_statistics": "大学医学统计",
    "college_medicine": "大学医学",
    "genetics": "遗传学",
    "nutrition": "营养学",
    "professional_medicine": "专业医学",
    "traditional_chinese_medicine": "中医中药",
    "virology": "病毒学",
}
CEVAL_MEDICAL = {"basic_medicine": "基础医学", "clinical_medicine": "临床医学", "physician": "医师资格"}


def read_csv_items(path: Path) -> Iterator[Item]:
    """One Item per CSV row (a dict by header), with the line it starts on; quoted newlines are kept."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            line = 2
            for index, row in enumerate(reader):
                yield Item(str(path), index, line, row)
                line = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise PrepError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None


def exam(
    id_: str,
    source: str,
    question: str,
    options: dict[str, str],
    answer: str,
    multi: bool,
    category: list[str],
    meta: dict,
) -> dict:
    letters = "".join(sorted(set(answer.strip().upper())))
    if not letters or any(a not in options for a in letters):
        raise Skip("answer not among options", f"answer {answer!r}, options {''.join(options)}")
    if len(letters) > 1 and not multi:
        raise Skip("several answers to a single-choice question", f"answer {answer!r}")
    category = [c for c in category if c]
    return {
        "id": id_,
        "source": source,
        "question": question,
        "options": options,
        "answer": letters,
        "multi": multi,
        "category": category,
        "meta": meta,
    }


def lettered(options: dict[str, str]) -> dict[str, str]:
    """Options must run A, B, C… without a gap (a missing middle option would silently shift letters)."""
    letters = sorted(options)
    if len(letters) < 2:
        raise Skip("too few options", f"{len(letters)} option(s)")
    if "".join(letters) != "ABCDEFG"[: len(letters)]:
        raise Skip("options with gaps", f"letters {''.join(letters)}")
    return {k: options[k] for k in letters}


# ----------------------------------------------------------------------------- CMB


def convert_cmb(obj: dict, item: Item, options: Options) -> list[dict]:
    question = text_field(obj, "question")
    raw = obj.get("option")
    if not isinstance(raw, dict):
        raise Skip("missing field", "'option' (an object of lettered options)")
    if "answer" not in obj or not str(obj["answer"]).strip():
        raise Skip("no answer", "CMB's test questions carry no answer; convert CMB-val or CMB-train")
    question_type = text_field(obj, "question_type")
    meta = {k: text_field(obj, k) for k in ("exam_type", "exam_class", "exam_subject")}
    meta["question_type"] = question_type
    # CMB's score.py compares the extracted letters with the key's string as written ("EB" is not "BE");
    # the record's answer is the sorted set the record contract asks for.
    meta["answer_as_written"] = str(obj["answer"])
    # CMB's prompt (workers/base.py) lists an option only when len(text) > 1: an empty E and a one-character
    # option ("铁") alike are left out, the others keeping their letters, and the question is still scored.
    # Every option with text is kept (letters without gaps); the ones CMB's prompt leaves out are named.
    texts = {k.strip(): v for k, v in raw.items() if isinstance(v, str) and v.strip()}
    left_out = "".join(k for k in sorted(texts) if len(texts[k]) <= 1)
    if left_out:
        meta["cmb_prompt_leaves_out"] = left_out
    return [
        exam(
            record_id(obj, item, "cmb", "id"),
            "cmb",
            question,
            lettered({k: v.strip() for k, v in texts.items()}),
            str(obj["answer"]),
            question_type == "多项选择题",
            [meta["exam_type"], meta["exam_class"]],
            meta,
        )
    ]


# ----------------------------------------------------------------------------- CMExam

OPTION_LINE = re.compile(r"^\s*([A-G])[\s.．、:：]+(.*\S)\s*$")


def convert_cmexam(obj: dict, item: Item, options: Options) -> list[dict]:
    question = text_field(obj, "Question", "问题")
    answer = text_field(obj, "Answer", "答案")
    if not answer:
        raise Skip("no answer", "empty Answer column")
    parsed = {}
    for line in text_field(obj, "Options", "选项").splitlines():
        if not line.strip():
            continue
        match = OPTION_LINE.match(line)
        if not match:
            raise Skip("malformed options", f"option line {line.strip()[:30]!r} is not 'A 选项'")
        parsed[match.group(1)] = match.group(2)
    department = text_field(obj, "Clinical Department", required=False)
    meta = {"explanation": text_field(obj, "Explanation", "答案解析", required=False)}
    for column in ("Disease Group", "Clinical Department", "Medical Discipline", "Competency", "Difficulty level"):
        if text_field(obj, column, required=False):
            meta[column] = text_field(obj, column)
    letters = re.sub(r"[^A-G]", "", answer.upper())
    return [
        exam(
            record_id(obj, item, "cmexam", "id", "ID"),
            "cmexam",
            question,
            lettered(parsed),
            letters,
            len(letters) > 1,
            [department or "全部"],
            meta,
        )
    ]


# ----------------------------------------------------------------------------- MedQA (Mainland)


def convert_medqa(obj: dict, item: Item, options: Options) -> list[dict]:
    question = text_field(obj, "question")
    raw = obj.get("options")
    if not isinstance(raw, dict):
        raise Skip("missing field", "'options' (an object of lettered options)")
    kept = {k.strip(): v.strip() for k, v in raw.items() if isinstance(v, str) and v.strip()}
    answer = text_field(obj, "answer_idx", required=False)
    if not answer:  # older files give only the answer's text
        text = text_field(obj, "answer")
        matches = [k for k, v in kept.items() if v == text]
        if len(matches) != 1:
            raise Skip("answer not among options", f"answer text {text[:30]!r} matches {len(matches)} options")
        answer = matches[0]
    meta_info = text_field(obj, "meta_info", required=False)
    return [
        exam(
            record_id(obj, item, "medqa-mcmle", "id"),
            "medqa-mcmle",
            question,
            lettered(kept),
            answer,
            False,
            [meta_info or "全部"],
            {"meta_info": meta_info} if meta_info else {},
        )
    ]


# ----------------------------------------------------------------------------- CMMLU and C-Eval


def subject_of(item: Item) -> str:
    """CMMLU: clinical_knowledge.csv; C-Eval: clinical_medicine_val.csv (split suffix removed)."""
    return re.sub(r"_(val|dev|test)$", "", Path(item.file).stem)


def _selected(subject: str, medical: dict[str, str], options: Options) -> str:
    wanted = options.subjects
    if wanted is None and subject not in medical:
        raise Skip("subject not selected", f"{subject} is not medical; --subjects all keeps every subject")
    if wanted is not None and wanted != ("all",) and subject not in wanted:
        raise Skip("subject not selected", f"{subject} is not in --subjects")
    return medical.get(subject, subject)


def _four_options(obj: dict) -> dict[str, str]:
    return {k: text_field(obj, k) for k in "ABCD" if text_field(obj, k, required=False)}


def convert_cmmlu(obj: dict, item: Item, options: Options) -> list[dict]:
    subject = subject_of(item)
    name = _selected(subject, CMMLU_MEDICAL, options)
    answer = text_field(obj, "Answer", "answer")
    return [
        exam(
            f"cmmlu:{subject}:{text_field(obj, '', required=False) or item.index}",
            "cmmlu",
            text_field(obj, "Question", "question"),
            lettered(_four_options(obj)),
            answer,
            False,
            [subject],
            {"subject": subject, "subject_zh": name},
        )
    ]


def convert_ceval(obj: dict, item: Item, options: Options) -> list[dict]:
    subject = subject_of(item)
    name = _selected(subject, CEVAL_MEDICAL, options)
    answer = text_field(obj, "answer", required=False)
    if not answer:
        raise Skip("no answer", "C-Eval's test split carries no answers; convert the val or dev split")
    split = Path(item.file).stem[len(subject) + 1 :] or "val"
    meta = {"subject": subject, "subject_zh": name}
    if text_field(obj, "explanation", required=False):
        meta["explanation"] = text_field(obj, "explanation")
    return [
        exam(
            f"ceval:{subject}:{split}:{text_field(obj, 'id', required=False) or item.index}",
            "ceval",
            text_field(obj, "question"),
            lettered(_four_options(obj)),
            answer,
            False,
            [subject],
            meta,
        )
    ]
