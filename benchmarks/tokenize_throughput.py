"""Tokenization throughput and the cache: N synthetic ChatMed-style records through medtune's
dataset builder, cold (tokenize + write the Arrow cache) and warm (the cache is reused).

    python benchmarks/tokenize_throughput.py [--rows 100000]

Prints rows/s of the cold run, the warm run's time as a fraction of the cold one (target < 5%),
and the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import chatmed_like, write_jsonl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["MEDTUNE_CACHE"] = str(tmp / "cache")
        from medtune.data.token_cache import load_datasets
        from medtune.data.tokenizer import load_tokenizer
        from medtune.model.tiny import build_tiny_llama, corpus_texts
        from medtune.recipe import DataConfig

        data = write_jsonl(chatmed_like(args.rows), tmp / "data.jsonl")
        sample = write_jsonl(chatmed_like(2000, seed=1), tmp / "sample.jsonl")
        tokenizer = load_tokenizer(str(build_tiny_llama(tmp / "base", corpus_texts([sample]))))
        config = DataConfig(train_files=[str(data)], template="chatmed", max_length=1024)
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            train, _ = load_datasets(config, 42, tokenizer, log=lambda message: None)
            timings.append(time.perf_counter() - start)
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "cold_s": round(timings[0], 2),
                    "cold_rows_per_s": round(args.rows / timings[0]),
                    "warm_s": round(timings[1], 3),
                    "warm_over_cold": round(timings[1] / timings[0], 4),
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                    "train_rows": len(train),
                }
            )
        )


if __name__ == "__main__":
    main()
