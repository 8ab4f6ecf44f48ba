"""Benchmark scorers. `medtune score BENCHMARK ...`; PromptCBLUE is the one there is."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("promptcblue",)  # each a module here whose main(argv) scores it (imported when chosen, as cli.py)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(
            f"usage: medtune score {{{','.join(BENCHMARKS)}}} --pred PRED.jsonl --gold GOLD.jsonl "
            "[--json SCORES.json] [--results results.json]",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(f"medtune.evaluate.score.{argv[0]}").main(argv[1:])
