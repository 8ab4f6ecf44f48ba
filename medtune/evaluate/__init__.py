"""`medtune eval exam|dialogue`: exam benchmarks scored their publishers' way; dialogue quality and safety."""

from __future__ import annotations

import importlib
import sys

TASKS = {
    "exam": ("multiple-choice medical exams (CMB, CMExam, MedQA-MCMLE, CMMLU, C-Eval)", "medtune.evaluate.exam"),
    "dialogue": ("doctor replies: reference metrics, an LLM judge, the safety subset", "medtune.evaluate.dialogue"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in TASKS:
        print("usage: medtune eval {exam,dialogue} ...  (medtune eval TASK --help)", file=sys.stderr)
        for name, (help_, _) in TASKS.items():
            print(f"  {name}: {help_}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(TASKS[argv[0]][1]).main(argv[1:])
