"""Warm start: how long a training command takes to reach its first step when its tokenized data is cached.

    python benchmarks/warm_start.py [--rows 1000000] [--lf-cli /tmp/lfvenv/bin/llamafactory-cli]

N synthetic Chinese chat rows, the same tiny LLaMA-shaped model and tokenizer for both tools. Each tool
runs its real CLI twice in a fresh process, training one step: the first run tokenizes and caches (cold),
the second finds the cache (warm). Prints the wall time of each run; medtune's warm run is also broken
down (cache key, loading the cache, row lengths) in-process. For LLaMA-Factory the cache is its
`tokenized_path` (see llamafactory_compare.py for how its venv is set up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import chatmed_like, write_jsonl  # noqa: E402

MEDTUNE_RECIPE = """model: {{base: {base}, dtype: fp32}}
lora: {{r: 8, alpha: 16, dropout: 0.0}}
data: {{train_files: [{data}], template: chatmed, max_length: 1024}}
train: {{max_steps: 1, per_device_batch_size: 8, logging_steps: 1, save_steps: 0}}
output: {{dir: {out}}}
"""

LF_CONFIG = """model_name_or_path: {base}
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
dataset: synthetic
dataset_dir: {data_dir}
template: empty
cutoff_len: 1024
tokenized_path: {cache}
preprocessing_num_workers: 1
output_dir: {out}
overwrite_output_dir: true
save_strategy: "no"
report_to: none
per_device_train_batch_size: 8
max_steps: 1
"""


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def medtune_runs(base: Path, data: Path, tmp: Path, env: dict[str, str]) -> tuple[float, float]:
    times = []
    for name in ("cold", "warm"):
        recipe = tmp / f"medtune-{name}.yaml"
        recipe.write_text(MEDTUNE_RECIPE.format(base=base, data=data, out=tmp / f"run-{name}"), encoding="utf-8")
        times.append(timed([sys.executable, "-m", "medtune.train", str(recipe)], env))
    return times[0], times[1]


def medtune_breakdown(base: Path, data: Path) -> dict[str, float]:
    """The warm run's data steps, in this process: cache key, loading the cache, row lengths."""
    from medtune.data.token_cache import cache_key, load_datasets, row_lengths
    from medtune.data.tokenizer import load_tokenizer
    from medtune.recipe import DataConfig

    tokenizer = load_tokenizer(str(base))
    config = DataConfig(train_files=[str(data)], template="chatmed", max_length=1024)
    steps = {}
    start = time.perf_counter()
    cache_key(config, 42, tokenizer, [str(data)])
    steps["cache key"] = time.perf_counter() - start
    start = time.perf_counter()
    train, _ = load_datasets(config, 42, tokenizer, log=lambda message: None)
    steps["load cache"] = time.perf_counter() - start
    start = time.perf_counter()
    row_lengths(train)
    steps["row lengths"] = time.perf_counter() - start
    return steps


def llamafactory_runs(cli: str, base: Path, data: Path, tmp: Path, env: dict[str, str]) -> tuple[float, float]:
    data_dir = tmp / "lf-data"
    data_dir.mkdir()
    with data.open(encoding="utf-8") as source, (data_dir / "synthetic.jsonl").open("w", encoding="utf-8") as out:
        for line in source:
            messages = json.loads(line)["messages"]
            out.write(
                json.dumps(
                    {"instruction": messages[0]["content"], "input": "", "output": messages[1]["content"]},
                    ensure_ascii=False,
                )
                + "\n"
            )
    (data_dir / "dataset_info.json").write_text(json.dumps({"synthetic": {"file_name": "synthetic.jsonl"}}))
    config = tmp / "lf.yaml"
    config.write_text(LF_CONFIG.format(base=base, data_dir=data_dir, cache=tmp / "lf-cache", out=tmp / "lf-out"))
    return timed([cli, "train", str(config)], env), timed([cli, "train", str(config)], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--lf-cli", help="llamafactory-cli of a separate venv, to compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["MEDTUNE_CACHE"] = str(tmp / "cache")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
        from medtune.model.tiny import build_tiny_llama, corpus_texts

        data = write_jsonl(chatmed_like(args.rows), tmp / "data.jsonl")
        sample = write_jsonl(chatmed_like(2000, seed=1), tmp / "sample.jsonl")
        base = build_tiny_llama(tmp / "base", corpus_texts([sample]))
        size = data.stat().st_size / 2**20
        print(f"{args.rows:,} rows ({size:.0f} MiB), one training step per run, 2 CPU threads")
        cold, warm = medtune_runs(base, data, tmp, env)
        print(f"medtune         cold {cold:7.1f} s   warm {warm:6.1f} s")
        for step, seconds in medtune_breakdown(base, data).items():
            print(f"  warm, {step:12s} {seconds:6.2f} s")
        if args.lf_cli:
            cold, warm = llamafactory_runs(args.lf_cli, base, data, tmp, env)
            print(f"LLaMA-Factory   cold {cold:7.1f} s   warm {warm:6.1f} s")


if __name__ == "__main__":
    main()
