"""The one streaming reader/writer every source shares, with the skip report.

Every input record is either written or reported: read = written + skipped, by
reason. A record is written only when it follows the record contract, is strict
JSON (no NaN), shows its answer (not only zero-width characters) and has an id
no earlier record of the run had. Outputs go to temp files renamed only on
success, so a failed run (bad input, read-only folder, full disk) leaves no half
file and keeps an earlier run's files; no output may overwrite an input, and no
input may be given twice.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from medtune.console import MedtuneError
from medtune.data.records import RecordError, held_out, record_kind, validate_record, write_jsonl_line
from medtune.temp_files import remove_dead_temps, temp_sibling


class Skip(Exception):
    """A record that cannot be converted; ``reason`` is one of a small closed set, ``detail`` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class PrepError(MedtuneError):
    """The whole run cannot go on (missing file, non-UTF-8 input, output over an input, a folder that cannot be
    written): one line, printed by medtune.console.run_command."""


@dataclass
class Item:
    """One raw input record and where it came from (for ids and for the skip report)."""

    file: str
    index: int  # 0-based position in the file
    line: int  # 1-based line where it starts
    value: Any = None
    error: str | None = None  # set when the text could not be parsed
    label: str = ""  # how generated ids name the file: its name, or its path when two inputs share a name


@dataclass
class Options:
    dev_ratio: float = 0.0
    seed: int = 42
    max_length: int | None = None  # characters of all message content together
    dedup: bool = False
    max_per_task: int | None = None  # PromptCBLUE: cap records per meta.task_dataset
    strip_answer_cue: bool = False  # PromptCBLUE: drop "答：" from prompts, as the LLaMA baseline does
    subjects: tuple[str, ...] | None = None  # CMMLU/C-Eval: subjects to keep (None: the medical ones; ("all",))


@dataclass
class Report:
    read: int = 0
    written: int = 0
    dev: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        parts = [
            f"read {self.read}",
            f"written {self.written} (train {self.written - self.dev}, dev {self.dev})",
            f"skipped {sum(self.skipped.values())}",
        ]
        lines = ["; ".join(parts)]
        lines += [f"  skipped, {reason}: {n}" for reason, n in self.skipped.most_common()]
        return "\n".join(lines)


Converter = Callable[[Any, Item, Options], list[dict]]


# ----------------------------------------------------------------------------- reading


def read_items(path: Path) -> Iterator[Item]:
    """Stream a JSON-lines file or a JSON array file, one record at a time, memory flat."""
    with path.open("r", encoding="utf-8-sig", newline="") as handle:  # -sig: a BOM is not part of the first record
        first = _first_char(handle)
        handle.seek(0)
        if first == "[":
            yield from _read_array(handle, str(path))
        else:
            yield from _read_lines(handle, str(path))


def _first_char(handle) -> str:
    while True:
        chunk = handle.read(4096)
        if not chunk:
            return ""
        stripped = chunk.lstrip("\ufeff \t\r\n")
        if stripped:
            return stripped[0]


def _read_lines(handle, name: str) -> Iterator[Item]:
    index = 0
    for lineno, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            value, error = None, f"malformed JSON ({exc.msg} at column {exc.colno})"
        except RecursionError:
            value, error = None, "nested too deeply to read"
        else:
            error = None
        for element in value if isinstance(value, list) else [value]:  # a line may hold an array of records
            yield Item(name, index, lineno, element, error)
            index += 1


def _read_array(handle, name: str, chunk_size: int = 1 << 20) -> Iterator[Item]:
    """Elements of a top-level JSON array, decoded one by one from a sliding buffer."""
    decoder = json.JSONDecoder()
    buffer, line, index, eof = "", 1, 0, False
    pos = buffer.find("[")
    while pos < 0 and not eof:
        more = handle.read(chunk_size)
        eof = not more
        buffer += more
        pos = buffer.find("[")
    line += buffer.count("\n", 0, pos)
    pos += 1
    while True:
        # skip white space and commas between elements
        while True:
            while pos < len(buffer) and buffer[pos] in " \t\r\n,\ufeff":
                if buffer[pos] == "\n":
                    line += 1
                pos += 1
            if pos < len(buffer) or eof:
                break
            buffer, pos = buffer[pos:], 0
            more = handle.read(chunk_size)
            eof = not more
            buffer += more
        if pos >= len(buffer):
            raise PrepError(f"{name}: the JSON array is not closed (no final ']')")
        if buffer[pos] == "]":
            _check_nothing_after(handle, buffer[pos + 1 :], name, line)
            return
        while True:
            try:
                value, end = decoder.raw_decode(buffer, pos)
                break
            except json.JSONDecodeError as exc:
                if eof:
                    raise PrepError(
                        f"{name}:{line}: malformed JSON inside the array ({exc.msg}); "
                        "a broken JSON array cannot be read past this point"
                    ) from None
                buffer, pos = buffer[pos:], 0
                more = handle.read(chunk_size)
                eof = not more
                buffer += more
        yield Item(name, index, line, value)
        line += buffer.count("\n", pos, end)
        index, pos = index + 1, end


def _check_nothing_after(handle, rest: str, name: str, line: int) -> None:
    """A JSON array file ends at its ']': anything but white space after it would be silently lost."""
    while True:
        if rest.strip():
            raise PrepError(
                f"{name}:{line}: more content after the JSON array's closing ']'; a file holds one "
                "array or JSON lines: split it, or join the arrays"
            )
        rest = handle.read(1 << 20)
        if not rest:
            return


# ----------------------------------------------------------------------------- the run


def output_paths(out: Path) -> dict[str, Path]:
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return {"train": out, "dev": out.with_name(f"{stem}.dev.jsonl"), "skipped": out.with_name(f"{stem}.skipped.jsonl")}


def check_paths(inputs: list[Path], out: Path) -> None:
    """Refuse, before anything is written, a run whose inputs or outputs cannot be right."""
    first_given: dict[tuple[int, int], Path] = {}
    for path in inputs:
        if not path.is_file():
            raise PrepError(f"{path}: input file not found")
        stat = path.stat()
        identity = (stat.st_dev, stat.st_ino)  # the same file under another spelling, or through a link, too
        if identity in first_given:
            also = f" (also as {first_given[identity]})" if str(first_given[identity]) != str(path) else ""
            raise PrepError(
                f"{path}: the same input file is given twice{also}; give each file once "
                "(its records would be written twice, under colliding ids)"
            )
        first_given[identity] = path
    if out.parent.exists() and not out.parent.is_dir():
        raise PrepError(f"{out.parent}: a file where --out needs a folder; choose another --out")
    resolved = {p.resolve() for p in inputs}
    for kind, path in output_paths(out).items():
        if path.resolve() in resolved:
            raise PrepError(f"{path}: the {kind} output would overwrite an input; choose another --out")
        if path.is_dir() and kind == "train":
            raise PrepError(f"{path}: --out is a directory; give a file name, e.g. --out {path / 'train.jsonl'}")
        if path.exists() and not path.is_file():
            raise PrepError(f"{path}: the {kind} output would replace a directory or device; choose another --out")


def is_dev(record_id: str, options: Options) -> bool:
    """A stable split: the same id and seed always land on the same side, whatever the order (training's
    held-out split is the same function)."""
    return held_out(record_id, options.seed, options.dev_ratio)


def run(
    convert: Converter,
    inputs: list[Path],
    out: Path,
    options: Options,
    reader: Callable[[Path], Iterator[Item]] = read_items,
    progress: bool = True,
) -> Report:
    """Convert every input record, write train/dev/skipped atomically, return the counts."""
    check_paths(inputs, out)
    names = Counter(p.name for p in inputs)
    labels = {str(p): p.name if names[p.name] == 1 else str(p) for p in inputs}
    report, seen, ticker = Report(), Seen(), _Progress(enabled=progress)
    try:
        with Outputs(out, keep_dev=options.dev_ratio > 0) as outputs:
            for path in inputs:
                for item in _read(reader, path):
                    item.label = labels[str(path)]
                    report.read += 1
                    ticker.tick(report.read)
                    _write_item(convert, item, options, seen, outputs, report)
            outputs.commit()
    finally:
        ticker.close(report.read)
    return report


def _read(reader: Callable[[Path], Iterator[Item]], path: Path) -> Iterator[Item]:
    """The reader's items; a file that cannot be decoded or read ends the run in one line naming it."""
    try:
        yield from reader(path)
    except UnicodeDecodeError as exc:
        raise PrepError(
            f"{path}: not UTF-8 (byte offset {exc.start}: {exc.reason}); "
            "convert the file to UTF-8 first (e.g. iconv -f GB18030 -t UTF-8)"
        ) from None
    except OSError as exc:
        raise PrepError(f"{path}: cannot read the input ({exc.strerror or exc}); check its permissions") from None


def _write_item(
    convert: Converter, item: Item, options: Options, seen: Seen, outputs: Outputs, report: Report
) -> None:
    """Write the item's records, or report it in the skip file: every item read is one or the other."""
    try:
        records = _convert_one(convert, item, options, seen)
    except Skip as skip:
        report.skipped[skip.reason] += 1
        outputs.write(
            "skipped",
            {"file": item.file, "line": item.line, "index": item.index, "reason": skip.reason, "detail": skip.detail},
        )
        return
    for record, line in records:
        dev = is_dev(record["id"], options)
        outputs.write("dev" if dev else "train", record, line)
        report.written += 1
        report.dev += dev


def open_output(path: Path) -> TextIO:
    """A temp file to write records into (its own function: the one place the run opens a file for writing)."""
    return path.open("w", encoding="utf-8")


class Outputs:
    """The run's train, dev and skipped files, written to temp siblings renamed over the real names only when
    the run completes: a failed run (bad input, read-only folder, full disk) leaves no half file and keeps the
    files of an earlier run as they were."""

    def __init__(self, out: Path, keep_dev: bool):
        self.paths, self.keep_dev = output_paths(out), keep_dev
        self.temps = {kind: temp_sibling(path) for kind, path in self.paths.items()}
        self.handles: dict[str, TextIO] = {}
        self.written: Counter = Counter()  # lines per kind: an empty skip file is not left behind

    def __enter__(self) -> Outputs:
        folder = self.paths["train"].parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(exc, folder) from exc
        for path in self.paths.values():
            remove_dead_temps(path)
        for kind, temp in self.temps.items():
            try:
                self.handles[kind] = open_output(temp)
            except OSError as exc:
                self.__exit__()  # the files opened before this one, and their temps, go
                raise output_error(exc, self.paths[kind]) from exc
        return self

    def write(self, kind: str, record: dict, line: str | None = None) -> None:
        """``record`` as a line (``line``: the one the checks already built for it)."""
        try:
            self.handles[kind].write(line if line is not None else write_jsonl_line(record))
            self.written[kind] += 1
        except OSError as exc:
            raise output_error(exc, self.paths[kind]) from exc

    def commit(self) -> None:
        """Close every file (a full disk may show only now, at the last flush), then rename them into place."""
        for kind, handle in self.handles.items():
            try:
                handle.close()
            except OSError as exc:
                raise output_error(exc, self.paths[kind]) from exc
        for kind, temp in self.temps.items():
            try:
                if kind == "dev" and not self.keep_dev:
                    self._drop_old(temp, "dev", "this run has no dev split")
                elif kind == "skipped" and not self.written["skipped"]:
                    self._drop_old(temp, "skipped", "this run skipped nothing")
                else:
                    os.replace(temp, self.paths[kind])
            except OSError as exc:
                raise output_error(exc, self.paths[kind]) from exc

    def _drop_old(self, temp: Path, kind: str, why: str) -> None:
        """No such file this run (no dev split, nothing skipped): an earlier run's one of this --out would read
        as this run's, so it goes too."""
        temp.unlink()
        if self.paths[kind].is_file():
            self.paths[kind].unlink()
            print(f"removed {self.paths[kind]} of an earlier run ({why})", file=sys.stderr)

    def __exit__(self, *exc_info: object) -> None:
        for handle in self.handles.values():
            with contextlib.suppress(OSError):  # a full disk fails the flush again: the temp file goes anyway
                handle.close()
        for temp in self.temps.values():
            temp.unlink(missing_ok=True)


def output_error(exc: OSError, path: Path) -> Exception:
    """An OS error writing an output as one line naming the file we were writing: a full disk keeps its errno,
    for medtune's own full-disk line (medtune.console.run_command), anything else is a PrepError."""
    if exc.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return PrepError(f"{path}: cannot write ({exc.strerror or exc}); choose an --out in a folder you can write")


class DigestSet:
    """64-bit digests, 8 bytes each once settled: new ones wait in a small set and are merged into one sorted
    numpy array when it fills (a Python set would cost ~100 bytes a digest: 2.6 GB for Huatuo26M's ids)."""

    BUFFER = 1 << 20

    def __init__(self) -> None:
        self.settled = np.empty(0, dtype=np.uint64)
        self.recent: set[int] = set()

    def __contains__(self, key: int) -> bool:
        if key in self.recent:
            return True
        i = int(np.searchsorted(self.settled, np.uint64(key)))
        return i < len(self.settled) and int(self.settled[i]) == key

    def update(self, keys: list[int]) -> None:
        self.recent.update(keys)
        if len(self.recent) >= self.BUFFER:
            fresh = np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent))
            self.settled = np.union1d(self.settled, fresh)
            self.recent = set()


@dataclass
class Seen:
    """What a run remembers of the records it wrote: fixed-size digests, not records, so that memory stays
    small over a corpus of tens of millions."""

    ids: DigestSet = field(default_factory=DigestSet)  # 64-bit digests of the written ids
    contents: set[bytes] = field(default_factory=set)  # 16-byte digests of the written contents (--dedup)
    per_task: Counter = field(default_factory=Counter)  # records written per PromptCBLUE task


def _convert_one(convert: Converter, item: Item, options: Options, seen: Seen) -> list[tuple[dict, str]]:
    """The item's records with their JSON lines, checked one by one and against what the run wrote before; a Skip
    otherwise."""
    if item.error:
        raise Skip("malformed JSON", item.error)
    if not isinstance(item.value, dict):
        raise Skip("not an object", f"got {type(item.value).__name__}")
    try:
        records = convert(item.value, item, options)
    except RecursionError:
        raise Skip("nested too deeply") from None
    lines = [_check_record(record, options) for record in records]
    ids = _new_ids(records, seen)
    contents = _new_contents(records, seen) if options.dedup else []
    if options.max_per_task is not None:
        _check_task_cap(records, options.max_per_task, seen)
        seen.per_task.update(r.get("meta", {}).get("task_dataset") for r in records)
    seen.ids.update(ids)
    seen.contents.update(contents)
    return list(zip(records, lines, strict=True))


def _check_record(record: dict, options: Options) -> str:
    """The record's JSON line (written as it is: each record is serialised once); a Skip when it breaks the
    contract, cannot be written as strict UTF-8 JSON, shows no text, or is too long."""
    try:
        validate_record(record)
        line = write_jsonl_line(record, strict=True)
        line.encode("utf-8")
    except RecordError as exc:
        raise Skip("invalid record", str(exc)) from None
    except UnicodeEncodeError as exc:
        raise Skip("invalid text", f"not encodable as UTF-8 ({exc.reason}, e.g. a lone surrogate)") from None
    except ValueError:  # NaN or ±Infinity: Python's json reads them, but no JSON reader after us does
        where, value = _non_finite(record)
        if where is None:
            raise
        raise Skip(
            "non-finite number",
            f"{where} is {json.dumps(value)}; JSON has no NaN or Infinity: write null or a string in the input",
        ) from None
    for where, reason, text in _shown_texts(record):
        if is_invisible(text):
            raise Skip(reason, f"{where} holds only invisible characters ({_code_points(text)})")
    for i, message in enumerate(record.get("messages", [])):
        if (marker := template_marker(message["content"])) is not None:
            raise Skip(
                "already in a chat template",
                f"messages[{i}].content carries {marker!r}: training would apply a template twice; convert the "
                "corpus with its own converter (chatmed-consult removes ChatMed's <s>问：…答： wrapper)",
            )
    if options.max_length is not None and (length := _length(record)) > options.max_length:
        raise Skip("too long", f"{length} characters > --max-length {options.max_length}")
    return line


def _new_ids(records: list[dict], seen: Seen) -> list[int]:
    """Digests of the records' ids; a Skip when one was written before in this run (any input file)."""
    keys = []
    for record in records:
        key = int.from_bytes(hashlib.blake2b(record["id"].encode("utf-8"), digest_size=8).digest(), "little")
        if key in seen.ids or key in keys:
            raise Skip("duplicate id", f"{record['id']!r} is the id of an earlier record of this run")
        keys.append(key)
    return keys


def _new_contents(records: list[dict], seen: Seen) -> list[bytes]:
    keys = [hashlib.blake2b(_content_key(r).encode(), digest_size=16).digest() for r in records]
    if any(k in seen.contents for k in keys):
        raise Skip("duplicate", "same content as an earlier record")
    return keys


def _check_task_cap(records: list[dict], cap: int, seen: Seen) -> None:
    for record in records:
        task = record.get("meta", {}).get("task_dataset")
        if task is not None and seen.per_task[task] >= cap:
            raise Skip("over per-task cap", f"{task} already has {cap} records")


# Markers of a chat template's text: a message that holds one was rendered for some model already.
TEMPLATE_MARKERS = (
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "[INST]",
    "[/INST]",
    "<|start_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<|user|>",
    "<|assistant|>",
)


def template_marker(text: str) -> str | None:
    """The template marker a message's text carries (ChatMed's wrapper is 问：…答： around the question), or None."""
    stripped = text.strip()
    if stripped.startswith(("问：", "问:")) and stripped.endswith(("答：", "答:")):
        return "问：…答："
    return next((marker for marker in TEMPLATE_MARKERS if marker in text), None)


def is_invisible(text: str) -> bool:
    """Whether text shows nothing: white space, zero-width and other format characters (U+200B, U+2060, a BOM,
    a soft hyphen) and control characters. Such a reply passes a strip() and a length check, then trains the
    model to answer with nothing."""
    for char in text:  # a loop, not all(): the first character is nearly always visible, and that is the answer
        if not (char.isspace() or unicodedata.category(char) in ("Cf", "Cc")):
            return False
    return True


def _code_points(text: str, most: int = 4) -> str:
    points = list(dict.fromkeys(f"U+{ord(c):04X}" for c in text))
    return " ".join(points[:most]) + (" …" if len(points) > most else "")


def _shown_texts(record: dict) -> Iterator[tuple[str, str, str]]:
    """(field, skip reason, text) of every text a reader of the record expects to see."""
    kind = record_kind(record)
    if kind == "text":
        yield "text", "empty text", record["text"]
        return
    if kind == "exam":
        yield "question", "empty question", record["question"]
        yield from ((f"options.{k}", "empty option", v) for k, v in record["options"].items())
        return
    for i, message in enumerate(record["messages"]):
        if message["role"] != "system":
            reason = "empty question" if message["role"] == "user" else "empty answer"
            yield f"messages[{i}].content", reason, message["content"]
        if "reasoning" in message:
            yield f"messages[{i}].reasoning", "no reasoning", message["reasoning"]
    for key in ("chosen", "rejected"):
        if key in record:
            yield key, "empty answer", record[key]


def _non_finite(value: Any, where: str = "the record") -> tuple[str, float] | tuple[None, None]:
    """Where the first NaN or ±Infinity of a record is, and which it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    if isinstance(value, dict):
        children = ((k if where == "the record" else f"{where}.{k}", v) for k, v in value.items())
    elif isinstance(value, list):
        children = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None, None
    for child_where, child in children:
        found = _non_finite(child, child_where)
        if found[0] is not None:
            return found
    return None, None


def _length(record: dict) -> int:
    if record_kind(record) == "exam":
        return len(record["question"]) + sum(len(o) for o in record["options"].values())
    if record_kind(record) == "text":
        return len(record["text"])
    return (
        sum(len(m["content"]) + len(m.get("reasoning", "")) for m in record["messages"])
        + len(record.get("chosen", ""))
        + len(record.get("rejected", ""))
    )


def _content_key(record: dict) -> str:
    if record_kind(record) == "exam":
        return "\x1e".join([record["question"], *record["options"].values()])
    if record_kind(record) == "text":
        return record["text"]
    parts = [
        f"{m['role']}\x1f{m['content']}" + (f"\x1f{m['reasoning']}" if "reasoning" in m else "")
        for m in record["messages"]
    ]
    return "\x1e".join(parts + [record.get("chosen") or "", record.get("rejected") or ""])


class _Progress:
    """rows and rows/s on stderr, at most twice a second (a tqdm bar per row costs more than the work)."""

    def __init__(self, enabled: bool):
        self.enabled, self.start, self.last = enabled, time.perf_counter(), 0.0
        # On a terminal one line is redrawn in place; into a file or a pipe each report is a line of its own
        # (a "\r" there glues them into one), every 10 s at most.
        self.terminal = sys.stderr.isatty()
        self.every = 0.5 if self.terminal else 10.0

    def tick(self, n: int) -> None:
        if self.enabled and n % 4096 == 0:
            now = time.perf_counter()
            if now - self.last > self.every:
                self.last = now
                self.line(f"{n:,} rows, {n / (now - self.start):,.0f} rows/s", final=False)

    def close(self, n: int) -> None:
        if self.enabled:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.line(f"{n:,} rows, {n / elapsed:,.0f} rows/s in {elapsed:.1f} s", final=True)

    def line(self, text: str, final: bool) -> None:
        if self.terminal:
            print(f"\r{text}", end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- helpers for converters


def text_field(obj: dict, *names: str, required: bool = True) -> str:
    """The first of ``names`` present, as stripped text; a Skip naming the field otherwise."""
    for name in names:
        if name in obj and obj[name] is not None:
            value = obj[name]
            if not isinstance(value, str):
                raise Skip("invalid field", f"{name!r} is a {type(value).__name__}, expected text")
            return value.strip()
    if required:
        raise Skip("missing field", " or ".join(repr(n) for n in names))
    return ""


def record_id(obj: dict, item: Item, source: str, *names: str) -> str:
    """The source's own id when it has one, else a stable one from file and position."""
    for name in names:
        value = obj.get(name)
        if isinstance(value, (str, int)) and str(value).strip():
            return str(value).strip()
    return f"{source}:{item.label or Path(item.file).name}:{item.index}"


def chat(record_id_: str, source: str, messages: list[dict], meta: dict | None = None) -> dict:
    return {"id": record_id_, "source": source, "messages": messages, "meta": meta or {}}


def turns_from_pairs(history: Any) -> list[dict]:
    """[[user, assistant], ...] → messages; anything else is a Skip."""
    if history in (None, ""):
        return []
    if not isinstance(history, list):
        raise Skip("malformed history", f"expected a list of [question, answer] pairs, got {type(history).__name__}")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise Skip("malformed history", f"history[{i}] is not a [question, answer] pair of texts")
        if not pair[0].strip() or not pair[1].strip():
            raise Skip("empty answer" if pair[0].strip() else "empty question", f"history[{i}]")
        messages += [{"role": "user", "content": pair[0].strip()}, {"role": "assistant", "content": pair[1].strip()}]
    return messages
