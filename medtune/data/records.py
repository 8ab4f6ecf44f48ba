"""The instruction-record format: the contract between data_prep (writes) and training (reads).

One JSON object a line, of one of three kinds:

- chat:       {"id", "source", "messages": [{"role", "content"}, ...], "meta": {...}}; an assistant message
              may carry its reasoning (chain of thought) in "reasoning", kept apart from the answer in
              "content": templates with a reasoning block render it as the model's own template does
- preference: a chat record whose messages are the prompt, plus "chosen" and "rejected" replies
- text:       {"id", "source", "text"} for continued pre-training
- exam:       {"id", "source", "question", "options": {"A": ...}, "answer": "AC", "multi", "category": [...],
              "meta"} — a multiple-choice question of a medical exam benchmark, for `medtune eval exam`

Roles are system (optional, first), then user and assistant alternating. A chat
record whose last message is from the user is a prompt (for prediction).
Both sides validate through :func:`validate_record`, so they cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medtune.console import MedtuneError

ROLES = ("system", "user", "assistant")
# Keys of the corpora's own formats (alpaca, sharegpt, ChatMed, PromptCBLUE): such a file was not converted yet.
RAW_FORMAT_KEYS = {"instruction", "instruct", "output", "conversations", "query", "response", "input", "target"}
RAW_FORMAT_KEYS |= {"Question", "Complex_CoT", "Response"}


def converter_for(value: Any) -> str | None:
    """The data_prep converter a raw corpus line of this shape needs, from its fields (None: not one known).
    Naming the one that fits matters: ChatMed's `<s>问：…答：` queries through `alpaca` would be templated twice."""
    if isinstance(value, list):  # a JSON array on one line: its records' shape decides
        return converter_for(value[0]) if value else None
    if not isinstance(value, dict):
        return None
    keys = set(value)
    if {"query", "response"} <= keys:
        return "chatmed-consult"  # or chatmed-tcm: the same shape
    if {"input", "target", "task_dataset"} <= keys:
        return "promptcblue"
    if {"Question", "Response"} <= keys:
        return "medical-o1"
    if "conversations" in keys:
        return "sharegpt"
    output = value.get("output")
    if isinstance(output, list) and len(output) == 2 and isinstance(value.get("instruction"), str):
        return "preference"
    if isinstance(value.get("instruction"), list):
        return "huatuo"
    if "history" in keys or {"cate1", "cate2"} & keys or "instruct" in keys:
        return "cmtmedqa"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    return None


def convert_hint(value: Any) -> str:
    """What to run on a raw corpus file instead of training on it."""
    source = converter_for(value) or "SOURCE"
    return (
        f"this looks like a corpus in its own format: convert it first with python -m data_prep {source} FILE "
        "--out FILE.jsonl (python -m data_prep --help lists the sources)"
    )


CONVERT_HINT = convert_hint(None)


class RecordError(MedtuneError):
    """A record that does not follow the format; the message names file, line and field."""


OPTION_LETTERS = "ABCDEFG"  # the letters CMB's official extraction knows; no benchmark here has more options


def record_kind(record: dict[str, Any]) -> str:
    if "options" in record and "messages" not in record:
        return "exam"
    if "text" in record and "messages" not in record:
        return "text"
    if "chosen" in record or "rejected" in record:
        return "preference"
    return "chat"


def validate_record(record: Any) -> str:
    """Return the record's kind, or raise RecordError naming the bad field."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    for key in ("id", "source"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise RecordError(f"field {key!r}: a non-empty string is required")
    kind = record_kind(record)
    if kind == "exam":
        _validate_exam(record)
        return kind
    if kind == "text":
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise RecordError("field 'text': a non-empty string is required")
        return kind
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("field 'messages': a non-empty list is required")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RecordError(f"field 'messages[{i}].role': one of {', '.join(ROLES)} is required")
        if not isinstance(message.get("content"), str):
            raise RecordError(f"field 'messages[{i}].content': a string is required")
        if "reasoning" in message and (message["role"] != "assistant" or not isinstance(message["reasoning"], str)):
            raise RecordError(f"field 'messages[{i}].reasoning': a string, on assistant messages only")
        if message["role"] == "system" and i != 0:
            raise RecordError(f"field 'messages[{i}].role': a system message may only come first")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            offset = len(messages) - len(turns)
            raise RecordError(
                f"field 'messages[{i + offset}].role': expected {expected!r} (turns alternate user/assistant)"
            )
    if kind == "preference":
        if turns[-1]["role"] != "user":
            raise RecordError("field 'messages': a preference prompt must end with a user message")
        for key in ("chosen", "rejected"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise RecordError(f"field {key!r}: a non-empty string is required")
    if "meta" in record and not isinstance(record["meta"], dict):
        raise RecordError("field 'meta': an object is required")
    return kind


def _validate_exam(record: dict[str, Any]) -> None:
    """Options lettered A, B, C... without gaps; the answer a sorted, non-empty set of those letters."""
    if not isinstance(record.get("question"), str) or not record["question"].strip():
        raise RecordError("field 'question': a non-empty string is required")
    options = record["options"]
    if not isinstance(options, dict) or len(options) < 2:
        raise RecordError("field 'options': an object of at least two lettered options is required")
    if list(options) != list(OPTION_LETTERS[: len(options)]):
        raise RecordError(f"field 'options': letters must be {', '.join(OPTION_LETTERS[: len(options)])} in order")
    for letter, text in options.items():
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"field 'options.{letter}': a non-empty string is required")
    answer = record.get("answer")
    if not isinstance(answer, str) or not answer or any(a not in options for a in answer):
        raise RecordError(f"field 'answer': one or more of the option letters {''.join(options)} is required")
    if "".join(sorted(set(answer))) != answer:
        raise RecordError("field 'answer': letters must be sorted and distinct (e.g. 'ACD')")
    if not isinstance(record.get("multi"), bool) or (len(answer) > 1 and not record["multi"]):
        raise RecordError("field 'multi': true for a question with several answers, false otherwise")
    category = record.get("category", [])
    if not isinstance(category, list) or not all(isinstance(c, str) and c for c in category):
        raise RecordError("field 'category': a list of non-empty strings is required")
    if "meta" in record and not isinstance(record["meta"], dict):
        raise RecordError("field 'meta': an object is required")


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed value) of a JSON-lines file; a bad line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: file not found")
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            value = parse_line(path, lineno, raw)
            if value is not _BLANK:
                yield lineno, value


_BLANK = object()  # what parse_line gives for an empty line


def parse_line(path: str | Path, lineno: int, raw: bytes) -> Any:
    """One line of a JSON-lines file, parsed (``_BLANK`` when empty). A first-line BOM (Windows editors write
    one) is dropped as data_prep drops it; a line that is not UTF-8 (a GBK export, say) or not JSON is one
    error naming the file and line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = raw[exc.start]
        raise RecordError(f"{path}:{lineno}: not UTF-8 text (byte {byte:#04x}); save the file as UTF-8") from None
    if lineno == 1:
        line = line.removeprefix("\ufeff")
    if not line.strip():
        return _BLANK
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        hint = f"; {CONVERT_HINT}" if line.lstrip().startswith(("[", "\ufeff[")) else ""
        raise RecordError(f"{path}:{lineno}: not valid JSON lines ({exc.msg}){hint}") from None
    except RecursionError:
        raise RecordError(f"{path}:{lineno}: nested too deeply to read") from None


def parse_records(path: str | Path, first_lineno: int, lines: list[bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a block of a file's raw lines, the first being line ``first_lineno``, each
    validated: what read_records does, for a block read elsewhere (a tokenizing process parses its own)."""
    for lineno, raw in enumerate(lines, first_lineno):
        record = parse_line(path, lineno, raw)
        if record is _BLANK:
            continue
        try:
            validate_record(record)
        except RecordError as exc:
            raw_format = isinstance(record, list) or (isinstance(record, dict) and bool(set(record) & RAW_FORMAT_KEYS))
            hint = f"; {convert_hint(record)}" if raw_format else ""
            raise RecordError(f"{path}:{lineno}: {exc}{hint}") from None
        yield lineno, record


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) from an instruction JSONL file, validating each line."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: file not found")
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            yield from parse_records(path, lineno, [raw])


def read_kind(path: str | Path, kind: str, hint: str) -> list[dict[str, Any]]:
    """All records of a file, each of ``kind`` (else an error naming the line, with ``hint`` on how to make
    the right file), ids unique (answers are matched back to records by id)."""
    records = []
    first_line: dict[str, int] = {}
    for lineno, record in iter_json_lines(path):
        try:
            found = validate_record(record)
        except RecordError as exc:
            raise RecordError(f"{path}:{lineno}: {exc}; {hint}") from None
        if found != kind:
            raise RecordError(f"{path}:{lineno}: a {found} record where {kind} records are expected; {hint}")
        if record["id"] in first_line:
            raise RecordError(
                f"{path}:{lineno}: id {record['id']!r} is also on line {first_line[record['id']]}; answers are "
                "matched back to records by id: keep one record per id"
            )
        first_line[record["id"]] = lineno
        records.append(record)
    if not records:
        raise RecordError(f"{path}: no {kind} record in it; {hint}")
    return records


def held_out(record_id: str, seed: int, ratio: float) -> bool:
    """Whether a record belongs to the held-out share: a hash of (seed, id), so the split is decided record by
    record while streaming, a repeated record always lands on the same side, and data_prep's dev split and
    training's eval split agree (the same seed holds out the same records, a larger ratio a superset)."""
    if ratio <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < ratio


def write_jsonl_line(record: dict[str, Any], strict: bool = False) -> str:
    """The one serialisation: UTF-8 text kept readable, keys in a stable order. ``strict``: NaN and ±Infinity
    (which Python's json writes, but no other JSON reader takes) raise ValueError."""
    return json.dumps(record, ensure_ascii=False, allow_nan=not strict) + "\n"
