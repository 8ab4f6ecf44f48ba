"""The one streaming reader/writer every source shares, with the skip report.

Every input record is either written or reported: read = written + skipped, by
reason. Outputs go to temp files renamed only on success, so a failed run
leaves no half file, and no output may overwrite an input.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.data.records import RecordError, held_out, record_kind, validate_record, write_jsonl_line
from medtune.temp_files import remove_dead_temps, temp_sibling


class Skip(Exception):
    """A record that cannot be converted; ``reason`` is one of a small closed set, ``detail`` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class PrepError(RuntimeError):
    """The whole run cannot go on (missing file, non-UTF-8 input, output over an input)."""


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
    for path in inputs:
        if not path.is_file():
            raise PrepError(f"{path}: input file not found")
    resolved = {p.resolve() for p in inputs}
    for kind, path in output_paths(out).items():
        if path.resolve() in resolved:
            raise PrepError(f"{path}: the {kind} output would overwrite an input; choose another --out")


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
    paths = output_paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temp_files(paths)
    names = Counter(p.name for p in inputs)
    labels = {str(p): p.name if names[p.name] == 1 else str(p) for p in inputs}
    tmp = {kind: temp_sibling(path) for kind, path in paths.items()}
    handles = {kind: path.open("w", encoding="utf-8") for kind, path in tmp.items()}
    report, seen, per_task = Report(), set(), Counter()
    ticker = _Progress(enabled=progress)
    try:
        for path in inputs:
            try:
                for item in reader(path):
                    item.label = labels[str(path)]
                    report.read += 1
                    ticker.tick(report.read)
                    try:
                        records = _convert_one(convert, item, options, seen, per_task)
                    except Skip as skip:
                        report.skipped[skip.reason] += 1
                        handles["skipped"].write(
                            write_jsonl_line(
                                {
                                    "file": item.file,
                                    "line": item.line,
                                    "index": item.index,
                                    "reason": skip.reason,
                                    "detail": skip.detail,
                                }
                            )
                        )
                        continue
                    for record in records:
                        dev = is_dev(record["id"], options)
                        handles["dev" if dev else "train"].write(write_jsonl_line(record))
                        report.written += 1
                        report.dev += dev
            except UnicodeDecodeError as exc:
                raise PrepError(
                    f"{path}: not UTF-8 (byte offset {exc.start}: {exc.reason}); "
                    "convert the file to UTF-8 first (e.g. iconv -f GB18030 -t UTF-8)"
                ) from None
        for handle in handles.values():
            handle.close()
        for kind, path in tmp.items():
            if kind == "dev" and options.dev_ratio <= 0:
                path.unlink()
                if paths["dev"].is_file():  # an earlier run's split of this --out would read as this run's
                    paths["dev"].unlink()
                    print(f"removed {paths['dev']} of an earlier run (this run has no dev split)", file=sys.stderr)
                continue
            os.replace(path, paths[kind])
    finally:
        ticker.close(report.read)
        for handle in handles.values():
            handle.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return report


def _remove_dead_temp_files(paths: dict[str, Path]) -> None:
    for path in paths.values():
        remove_dead_temps(path)


def _convert_one(convert: Converter, item: Item, options: Options, seen: set, per_task: Counter) -> list[dict]:
    if item.error:
        raise Skip("malformed JSON", item.error)
    if not isinstance(item.value, dict):
        raise Skip("not an object", f"got {type(item.value).__name__}")
    try:
        records = convert(item.value, item, options)
    except RecursionError:
        raise Skip("nested too deeply") from None
    for record in records:
        try:
            validate_record(record)
            write_jsonl_line(record).encode("utf-8")
        except RecordError as exc:
            raise Skip("invalid record", str(exc)) from None
        except UnicodeEncodeError as exc:
            raise Skip("invalid text", f"not encodable as UTF-8 ({exc.reason}, e.g. a lone surrogate)") from None
        if options.max_length:
            length = _length(record)
            if length > options.max_length:
                raise Skip("too long", f"{length} characters > --max-length {options.max_length}")
    if options.dedup:
        keys = [hashlib.blake2b(_content_key(r).encode(), digest_size=16).digest() for r in records]
        if any(k in seen for k in keys):
            raise Skip("duplicate", "same content as an earlier record")
        seen.update(keys)
    if options.max_per_task:
        for record in records:
            task = record.get("meta", {}).get("task_dataset")
            if task is not None and per_task[task] >= options.max_per_task:
                raise Skip("over per-task cap", f"{task} already has {options.max_per_task} records")
        for record in records:
            per_task[record.get("meta", {}).get("task_dataset")] += 1
    return records


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

    def tick(self, n: int) -> None:
        if self.enabled and n % 4096 == 0:
            now = time.perf_counter()
            if now - self.last > 0.5:
                self.last = now
                print(f"\r{n:,} rows, {n / (now - self.start):,.0f} rows/s", end="", file=sys.stderr, flush=True)

    def close(self, n: int) -> None:
        if self.enabled:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            print(f"\r{n:,} rows, {n / elapsed:,.0f} rows/s in {elapsed:.1f} s", file=sys.stderr, flush=True)


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
