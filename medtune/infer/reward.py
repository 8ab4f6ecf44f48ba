"""`medtune reward RUN_OR_MERGED --data FILE --out scores.jsonl`: what a reward model says.

FILE holds preference records (prompt, chosen, rejected) — then each pair gets both scores, the margin
and whether the chosen reply wins, and the summary is accuracy, mean margin and a histogram — or chat
records ending with a reply, which get one score each. Records are encoded as the RM stage encoded
them (tokenize_pairs / the reply as the last turn, the run's template and system prompt) and the score
is read where training read it: the score head at each row's last non-pad token of a right-padded batch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from medtune.console import MedtuneError, quiet_libraries, run_command
from medtune.data.records import read_records, record_kind, write_jsonl_line
from medtune.infer.resumable import check_resumable, fingerprint
from medtune.model.load import DTYPES
from medtune.model.reward_model import load_reward_model, score_conversations
from medtune.rundir import atomic_write_text


def read_scoring_records(path: Path) -> tuple[str, list[dict[str, Any]]]:
    records = [record for _, record in read_records(path)]
    kinds = {record_kind(r) for r in records}
    if not records:
        raise MedtuneError(f"{path}: no records")
    if len(kinds) > 1 or kinds & {"text", "exam"}:
        raise MedtuneError(f"{path}: give preference records, or chat records ending with a reply (found {kinds})")
    kind = kinds.pop()
    if kind == "chat" and any(r["messages"][-1]["role"] != "assistant" for r in records):
        raise MedtuneError(f"{path}: every chat record must end with the assistant reply to score")
    return kind, records


def histogram(values: list[float], bins: int = 10, width: int = 40) -> str:
    low, high = min(values), max(values)
    step = (high - low) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - low) / step), bins - 1)] += 1
    top = max(counts)
    return "\n".join(
        f"  [{low + i * step:8.3f}, {low + (i + 1) * step:8.3f}) {'#' * round(width * c / top):<{width}} {c}"
        for i, c in enumerate(counts)
    )


def check_finite(scores: list[float], records: list[dict[str, Any]], source: str) -> None:
    """A score head that gives NaN or ±inf is a broken model, not a score: named with the first record it hit,
    before anything is written."""
    per_record = len(scores) // len(records)  # 2 for pairs (chosen, rejected), 1 for replies
    for i, score in enumerate(scores):
        if not math.isfinite(score):
            record = records[i // per_record]
            raise MedtuneError(
                f"{source}: the reward model scored record {record['id']!r} {score}; "
                "its score head is broken (retrain or re-merge it), nothing was written"
            )


def score_file(
    source: str, data: Path, out: Path, batch_size: int = 8, dtype: str = "fp32", overwrite: bool = False
) -> dict[str, Any]:
    """Score every record of ``data`` into ``out`` (one line each) and summarise; refuses an ``out`` that
    medtune reward did not write with these settings."""
    if batch_size < 1:
        raise MedtuneError(f"--batch-size {batch_size}: must be at least 1")
    kind, records = read_scoring_records(data)
    expected = fingerprint(source, data, {"task": "reward", "dtype": dtype})
    check_resumable(out, expected, overwrite)  # refuses a file medtune reward did not write
    model, tokenizer, info = load_reward_model(source, dtype)
    if kind == "preference":
        conversations = [
            r["messages"] + [{"role": "assistant", "content": r[side]}]
            for r in records
            for side in ("chosen", "rejected")
        ]
    else:
        conversations = [r["messages"] for r in records]
    scores = score_conversations(model, tokenizer, info.template, info.system_prompt, conversations, batch_size)
    check_finite(scores, records, source)
    if kind == "preference":
        rows = [
            {"id": r["id"], "chosen_score": c, "rejected_score": j, "margin": c - j, "correct": c > j}
            for r, c, j in zip(records, scores[0::2], scores[1::2], strict=True)
        ]
        summary = {
            "pairs": len(rows),
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "mean_margin": sum(r["margin"] for r in rows) / len(rows),
        }
    else:
        rows = [{"id": r["id"], "score": s} for r, s in zip(records, scores, strict=True)]
        summary = {"replies": len(rows), "mean_score": sum(scores) / len(scores)}
    atomic_write_text(out, "".join(write_jsonl_line(r) for r in rows))
    return {**summary, "histogram": histogram(scores)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune reward", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a reward-model run directory or its medtune-merged directory")
    parser.add_argument("--data", required=True, type=Path, help="preference records, or chat records with replies")
    parser.add_argument("--out", required=True, type=Path, help="scores, one JSON line per record")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even if made otherwise")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    quiet_libraries()
    args = parser.parse_args(argv)

    def work() -> int:
        summary = score_file(args.model, args.data, args.out, args.batch_size, args.dtype, args.overwrite)
        histogram_text = summary.pop("histogram")
        print(json.dumps(summary, ensure_ascii=False))
        print("scores:\n" + histogram_text)
        print(f"per-record scores: {args.out}")
        return 0

    return run_command(work, args.debug)


if __name__ == "__main__":
    sys.exit(main())
