"""Results files that survive a kill and are never reused with other settings: what predict, eval and reward
write a batch at a time.

A results file has a sidecar (`OUT.medtune.json`) holding its fingerprint: the model (its description and the
identity of its weight files), the input file's hash and the settings. A run resumes a file only under the same
fingerprint; rows are appended and synced a batch at a time, a torn last line is dropped and redone, and the
finished file is rewritten in input order.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medtune.console import MedtuneError
from medtune.data.records import write_jsonl_line
from medtune.rundir import atomic_write_text, describe_source, file_identities


def fingerprint(source: str, data: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """What the predictions in a file depend on: the model (its description and the identity of its
    weight files), the prompts' file and the generation settings. Predictions are only resumed under
    the same fingerprint."""
    info = describe_source(source)
    found = {
        "model": {**info.to_json(), "weights": file_identities((info.base, *info.adapters))},
        "settings": settings,
        "data": {"path": str(data.resolve()), "sha256": hashlib.sha256(data.read_bytes()).hexdigest()},
    }
    return json.loads(json.dumps(found))  # as it reads back from the file (tuples become lists)


def fingerprint_file(out: Path) -> Path:
    return out.with_name(out.name + ".medtune.json")


def check_resumable(out: Path, expected: dict[str, Any], overwrite: bool) -> None:
    """Resume ``out`` only if this model, data and settings wrote it; --overwrite starts it again."""
    sidecar = fingerprint_file(out)
    if overwrite or not out.exists():
        out.unlink(missing_ok=True)
        sidecar.write_text(json.dumps(expected, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return
    if not sidecar.is_file():
        raise MedtuneError(
            f"--out {out}: exists, and no {sidecar.name} says medtune predict wrote it with these "
            "settings; pass --overwrite to replace it, or choose another --out"
        )
    saved = json.loads(sidecar.read_text(encoding="utf-8"))
    differ = [k for k in ("model", "data", "settings") if saved.get(k) != expected[k]]
    if differ:
        detail = ", ".join(
            f"{k}.{name}"
            for k in differ
            for name in sorted(set(saved.get(k, {})) | set(expected[k]))
            if saved.get(k, {}).get(name) != expected[k].get(name)
        )
        raise MedtuneError(
            f"--out {out}: its predictions were made otherwise ({detail} changed); "
            "pass --overwrite to start again, or choose another --out"
        )


def answer_in_batches(
    out: Path,
    todo: list,
    total: int,
    batch_size: int,
    answer: Callable[[list], list[dict]],
    unit: str,
    progress: bool = True,
) -> list[dict]:
    """Run ``answer(batch) -> rows`` over ``todo`` a batch at a time, each batch's rows appended to ``out``
    and synced before the next starts (the resumable loop of predict and eval); all new rows returned."""
    bar = tqdm(total=total, initial=total - len(todo), unit=unit, disable=not progress or not sys.stderr.isatty())
    written: list[dict] = []
    with out.open("a", encoding="utf-8") as handle:
        for start in range(0, len(todo), batch_size):
            rows = answer(todo[start : start + batch_size])
            append_rows(handle, rows)
            written += rows
            bar.update(len(rows))
    bar.close()
    return written


def append_rows(handle, rows: list[dict]) -> None:
    """Write and sync a batch of result rows: what is written survives a crash; only the batch in flight is lost."""
    handle.write("".join(write_jsonl_line(row) for row in rows))
    handle.flush()
    os.fsync(handle.fileno())


def rewrite_in_order(out: Path, done: dict[str, dict], ids: list[str]) -> None:
    """The finished file in input order, atomically (a resumed run appended in the order it ran)."""
    atomic_write_text(out, "".join(write_jsonl_line(done[i]) for i in ids))


def read_done(out: Path) -> dict[str, dict]:
    """Predictions already written; a torn last line (killed mid-write) is dropped and redone."""
    done: dict[str, dict] = {}
    if not out.is_file():
        return done
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[prediction_id(row)] = row
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        out.write_text("".join(kept), encoding="utf-8")
    return done


def prediction_id(row: dict) -> str:
    """A row's id: a PromptCBLUE prediction's sample_id, else the record's id."""
    return row.get("sample_id") or row["id"]
