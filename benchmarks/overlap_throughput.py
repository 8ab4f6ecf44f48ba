"""`medtune data overlap` at scale: N synthetic ChatMed-style training rows against every exam benchmark of
tests/fixtures (converted by data_prep), in a child process.

    python benchmarks/overlap_throughput.py [--rows 1000000] [--n 13]

Prints training rows/s and the peak RSS of the overlap process (the generator's memory not counted). The index
holds the benchmarks' grams only, so memory should not grow with the training set.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic import text

REPO = Path(__file__).resolve().parent.parent
EXAMS = REPO / "tests" / "fixtures" / "exams"


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    """ChatMed's length mix (query median ~39 characters, response ~136), streamed to disk."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            question = text(rng, max(4, round(rng.lognormvariate(3.66, 0.625))))
            answer = text(rng, max(8, round(rng.lognormvariate(4.91, 0.526))))
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            handle.write(
                json.dumps({"id": f"syn-{i}", "source": "synthetic", "messages": messages}, ensure_ascii=False)
            )
            handle.write("\n")


def convert_exams(work: Path) -> list[Path]:
    sources = [
        ("cmb", [EXAMS / "cmb_val.json"]),
        ("cmexam", [EXAMS / "cmexam_test.csv"]),
        ("medqa-mcmle", [EXAMS / "medqa_mcmle_test.jsonl"]),
        ("cmmlu", sorted((EXAMS / "cmmlu").glob("*.csv"))),
        ("ceval", sorted((EXAMS / "ceval").rglob("*.csv"))),
    ]
    outs = []
    for source, inputs in sources:
        out = work / f"{source}.jsonl"
        command = [sys.executable, "-m", "data_prep", source, *map(str, inputs), "--out", str(out), "--quiet"]
        subprocess.run(command, check=True, capture_output=True, cwd=REPO)
        outs.append(out)
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--n", type=int, default=13)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        train = work / "train.jsonl"
        write_rows(train, args.rows)
        size = train.stat().st_size / 2**20
        print(f"generated {args.rows:,} rows ({size:.0f} MiB) in {time.perf_counter() - start:.1f} s")
        exams = convert_exams(work)
        command = [sys.executable, "-m", "medtune.cli", "data", "overlap", str(train), "--n", str(args.n)]
        start = time.perf_counter()
        proc = subprocess.run([*command, "--against", *map(str, exams)], capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        print(proc.stdout.strip())
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        print(f"overlap: {args.rows / wall:,.0f} training rows/s ({wall:.1f} s wall, start included); "
              f"peak RSS {peak:.0f} MB (the largest child: the overlap process)")  # fmt: skip


if __name__ == "__main__":
    main()
