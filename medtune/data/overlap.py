"""`medtune data overlap TRAIN.jsonl… --against BENCH.jsonl…`: which benchmark items a training set already holds.

Training on the test set is the commonest way a published medical score misleads. Texts are compared as
character n-grams of their normalised form (NFKC, lower case, white space and punctuation removed: a copy with
other punctuation or spacing is the same copy). Chinese has no spaces to count words by, so n counts characters;
the default 13 follows GPT-3's 13-gram contamination rule, and 13 Chinese characters are about 6–8 words: long
enough that a shared one is not a common phrase ("建议及时就医" is 6). An item is

- **contaminated** when it shares at least one n-gram with a training record, and
- a **near-duplicate** when at least ``--near`` (default 0.5) of its n-grams are in one training record.

Items shorter than n characters are compared whole. Benchmarks are small (thousands of items) and are indexed;
training records stream past the index, so memory is the index's, whatever the corpus size.
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.console import MedtuneError, run_command
from medtune.data.records import iter_json_lines, write_jsonl_line
from medtune.temp_files import temp_sibling

DEFAULT_N = 13
LISTED = 5  # training records named per contaminated item (all are counted)
DEFAULT_NEAR = 0.5


def normalised(text: str) -> str:
    """NFKC, lower case, and only letters, digits and CJK characters kept."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(c for c in text if c.isalnum())


def ngrams(text: str, n: int) -> set[str]:
    """The distinct n-character grams of a normalised text; a shorter text is its own one gram."""
    if len(text) <= n:
        return {text} if text else set()
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def record_texts(record: dict[str, Any]) -> Iterator[str]:
    """What a record says, whatever its kind: messages (and reasoning), a text, a pair's replies, an exam's
    question and options."""
    for message in record.get("messages", []):
        yield message.get("content", "")
        if message.get("reasoning"):
            yield message["reasoning"]
    for key in ("text", "chosen", "rejected", "question"):
        if isinstance(record.get(key), str):
            yield record[key]
    if isinstance(record.get("options"), dict):
        yield from (v for v in record["options"].values() if isinstance(v, str))


@dataclass
class Item:
    """One benchmark item: where it is from and its grams."""

    benchmark: str
    id: str
    forms: list[set[str]]  # the grams of each way the item is written (an exam's options with and without letters)
    hits: int = 0  # training records sharing an n-gram with it
    near: int = 0  # training records holding >= --near of its grams
    shares: list[str] = field(default_factory=list)  # the first few of each, to list (memory stays the index's)
    near_ids: list[str] = field(default_factory=list)

    @property
    def grams(self) -> set[str]:
        return set().union(*self.forms)


class BenchmarkIndex:
    """Every benchmark item's grams, and for each gram the items holding it."""

    def __init__(self, items: list[Item]):
        self.items = items
        self.by_gram: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            for gram in item.grams:
                self.by_gram[gram].append(i)

    def match(self, record_id: str, grams: set[str], near: float) -> bool:
        """Mark the items this training record overlaps; True when it overlaps any."""
        hit = {i for gram in grams & self.by_gram.keys() for i in self.by_gram[gram]}
        for i in hit:
            item = self.items[i]
            item.hits += 1
            if len(item.shares) < LISTED:
                item.shares.append(record_id)
            if any(len(grams & form) >= near * len(form) for form in item.forms):
                item.near += 1
                if len(item.near_ids) < LISTED:
                    item.near_ids.append(record_id)
        return bool(hit)


def benchmark_items(paths: Iterable[Path], n: int) -> list[Item]:
    """The items of exam or dialogue files (data_prep's output), grouped by their source."""
    items = []
    for path in paths:
        for lineno, record in iter_json_lines(path):
            if not isinstance(record, dict) or "id" not in record:
                raise MedtuneError(f"{path}:{lineno}: not a medtune record (exam or chat lines from data_prep)")
            items.append(item_of(record, path.stem, n))
    if not items:
        raise MedtuneError("--against: no benchmark item in " + ", ".join(map(str, paths)))
    return items


def item_of(record: dict[str, Any], default_benchmark: str, n: int) -> Item:
    """An item's grams in each way it is written: a copy may carry the option letters (as eval exam asks,
    "A. 胃溃疡") or not, and a gram that crosses from one option into the next differs between the two."""
    benchmark = str(record.get("source") or default_benchmark)
    forms = [ngrams(normalised("".join(record_texts(record))), n)]
    if isinstance(record.get("options"), dict):
        lettered = "".join(f"{k}{v}" for k, v in record["options"].items() if isinstance(v, str))
        forms.append(ngrams(normalised(str(record.get("question", "")) + lettered), n))
    return Item(benchmark, str(record["id"]), forms)


def contamination(train: list[Path], records: list[dict[str, Any]], benchmark: str) -> dict[str, Any]:
    """For an evaluation: of its records (exam questions, dialogues), how many the training files already hold,
    at the default n and near; the ids of the contaminated ones."""
    index = BenchmarkIndex([item_of(r, benchmark, DEFAULT_N) for r in records])
    seen = scan(train, index, DEFAULT_N, DEFAULT_NEAR, None)
    hit = [item for item in index.items if item.hits]
    return {
        "training_files": [str(p) for p in train],
        "training_records": seen.get("records", 0),
        "n": DEFAULT_N,
        "items": len(index.items),
        "contaminated": len(hit),
        "near_duplicates": sum(bool(item.near) for item in hit),
        "contaminated_ids": [item.id for item in hit],
    }


def contamination_line(found: dict[str, Any]) -> str:
    """What eval prints beside its score."""
    return (
        f"contamination: {found['contaminated']} of {found['items']} items share a {found['n']}-character gram with "
        f"the {found['training_records']:,} training records ({found['near_duplicates']} near-duplicates)"
    )


def scan(train_paths: list[Path], index: BenchmarkIndex, n: int, near: float, clean_out: Path | None) -> dict:
    """Stream the training records past the index; with ``clean_out``, write those that overlap nothing."""
    counts = Counter()
    clean = None
    if clean_out is not None:
        tmp = temp_sibling(clean_out)
        clean = tmp.open("w", encoding="utf-8")
    try:
        for path in train_paths:
            for lineno, record in iter_json_lines(path):
                if not isinstance(record, dict):
                    raise MedtuneError(f"{path}:{lineno}: not a JSON object")
                record_id = f"{path.name}:{record.get('id', lineno)}"
                grams = ngrams(normalised("".join(record_texts(record))), n)
                counts["records"] += 1
                if index.match(record_id, grams, near):
                    counts["overlapping"] += 1
                elif clean is not None:
                    clean.write(write_jsonl_line(record))
        if clean is not None:
            clean.close()
            tmp.replace(clean_out)
    finally:
        if clean is not None and not clean.closed:
            clean.close()
            tmp.unlink(missing_ok=True)
    return dict(counts)


def overlap(
    train: list[Path],
    against: list[Path],
    n: int = DEFAULT_N,
    near: float = DEFAULT_NEAR,
    clean_out: Path | None = None,
) -> dict[str, Any]:
    """Per benchmark: items, contaminated, near-duplicates, and the items with the training records they share."""
    if n < 4 or not 0 < near <= 1:
        raise MedtuneError("--n must be at least 4 and --near in (0, 1]")
    index = BenchmarkIndex(benchmark_items(against, n))
    seen = scan(train, index, n, near, clean_out)
    report: dict[str, Any] = {"n": n, "near": near, "training": seen, "benchmarks": {}}
    for item in index.items:
        entry = report["benchmarks"].setdefault(
            item.benchmark, {"items": 0, "contaminated": 0, "near_duplicates": 0, "listed": []}
        )
        entry["items"] += 1
        if item.hits:
            entry["contaminated"] += 1
            entry["near_duplicates"] += bool(item.near)
            entry["listed"].append({"id": item.id, "records": item.hits, "near": item.near_ids, "shares": item.shares})
    return report


def summary(report: dict[str, Any]) -> str:
    lines = [f"{report['training'].get('records', 0):,} training records, {report['n']}-character grams:"]
    for name, entry in report["benchmarks"].items():
        share = entry["contaminated"] / entry["items"]
        lines.append(
            f"{name}: {entry['contaminated']} of {entry['items']} items share a {report['n']}-gram with the training "
            f"data ({share:.1%}), {entry['near_duplicates']} are near-duplicates (>= {report['near']:.0%})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune data", description="Data checks on instruction JSONL.")
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("overlap", help=__doc__.splitlines()[0].split(": ", 1)[1])
    check.add_argument("train", nargs="+", type=Path, help="training JSONL (data_prep's output), any kind")
    check.add_argument("--against", nargs="+", type=Path, required=True, help="exam or dialogue JSONL")
    check.add_argument("--n", type=int, default=DEFAULT_N, help=f"characters per gram (default {DEFAULT_N})")
    check.add_argument("--near", type=float, default=DEFAULT_NEAR, help="share of an item's grams: near-duplicate")
    check.add_argument("--json", type=Path, help="write the report (every contaminated item listed) here")
    check.add_argument("--write-clean", type=Path, metavar="OUT", help="the training records that overlap nothing")
    check.add_argument("--overwrite", action="store_true", help="replace --json / --write-clean files that exist")
    check.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    args = parser.parse_args(argv)

    def work() -> int:
        inputs = {p.resolve() for p in [*args.train, *args.against]}
        for out in (args.json, args.write_clean):
            if out is not None and out.resolve() in inputs:
                raise MedtuneError(f"{out}: is one of the inputs; write elsewhere")
            if out is not None and out.exists() and not args.overwrite:
                raise MedtuneError(f"{out}: exists; pass --overwrite to replace it, or choose another path")
        report = overlap(args.train, args.against, args.n, args.near, args.write_clean)
        print(summary(report))
        if args.json:
            args.json.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            print(f"contaminated items: {args.json}")
        if args.write_clean:
            kept = report["training"].get("records", 0) - report["training"].get("overlapping", 0)
            print(f"{kept:,} training records overlap nothing: {args.write_clean}")
        return 0

    return run_command(work, args.debug)


if __name__ == "__main__":
    sys.exit(main())
