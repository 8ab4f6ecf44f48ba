"""Conversion throughput and memory: N synthetic ChatMed-style rows through `python -m data_prep`.

    python benchmarks/prep_throughput.py [--rows 500000] [--dedup] [--dev-ratio 0.01]

Prints rows/s and the peak RSS of the conversion process (measured as a child process,
so the generator's memory is not counted). Targets: >= 50k rows/s, peak RSS < 500 MB.
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

SYMPTOMS = ["头痛", "发烧", "咳嗽", "胃痛", "失眠", "腰疼", "皮疹", "心慌", "腹泻", "头晕"]
PEOPLE = ["我", "孩子", "老人", "我妈妈", "我爱人"]
ADVICE = [
    "建议及时就医，完善相关检查。",
    "注意休息，多喝温水，清淡饮食。",
    "可在医生指导下短期用药。",
    "如症状加重或持续不缓解，请尽快到医院就诊。",
    "保持规律作息，避免劳累和熬夜。",
]


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            symptom = rng.choice(SYMPTOMS)
            query = f"<s>问：\n{rng.choice(PEOPLE)}最近{rng.randint(1, 30)}天一直{symptom}，{rng.choice(SYMPTOMS)}也有，编号{i}，需要怎么处理？\n答：\n"  # noqa: E501
            response = "您好，" + "".join(rng.sample(ADVICE, 3)) + f"针对{symptom}，" + rng.choice(ADVICE)
            handle.write(json.dumps({"query": query, "response": response}, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--dedup", action="store_true")
    parser.add_argument("--dev-ratio", type=float, default=0.01)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "consult.jsonl", Path(tmp) / "out.jsonl"
        start = time.perf_counter()
        write_rows(src, args.rows)
        print(
            f"generated {args.rows:,} rows ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s"  # noqa: E501
        )
        cmd = [
            sys.executable,
            "-m",
            "data_prep",
            "chatmed-consult",
            str(src),
            "--out",
            str(out),
            "--dev-ratio",
            str(args.dev_ratio),
            "--quiet",
        ] + (["--dedup"] if args.dedup else [])
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        elapsed = time.perf_counter() - start
        if proc.returncode:
            sys.exit(proc.stderr)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(proc.stdout.strip())
        print(
            f"conversion: {args.rows / elapsed:,.0f} rows/s ({elapsed:.1f} s wall, process start included); "
            f"peak RSS {peak_mb:.0f} MB"
        )


if __name__ == "__main__":
    main()
