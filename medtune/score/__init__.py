"""Benchmark scorers. `medtune score BENCHMARK ...`; PromptCBLUE is the one there is."""

from __future__ import annotations

import sys

BENCHMARKS = ("promptcblue",)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(
            f"usage: medtune score {{{','.join(BENCHMARKS)}}} --pred PRED.jsonl --gold GOLD.jsonl "
            "[--json SCORES.json] [--results results.json]",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from medtune.score import promptcblue

    return promptcblue.main(argv[1:])
