"""Scale: N synthetic ChatMed rows → data_prep → tokenize (cold, then warm) → pack, each step its own process.

    python benchmarks/scale.py 1000000 [--tokenizer DIR] [--max-length 1024] [--keep DIR]

Prints one line per step: rows/s and the peak RSS of that step (os.wait4's ru_maxrss: the largest of its
processes, tokenizing workers included), and for the tokenize step also the RSS after its imports, so the
growth the data itself costs can be read off; run it at two sizes to see whether that growth depends on N.
The tokenizer is Chinese-LLaMA-2's real SentencePiece model from ../shared/tokenizers when present (what a
Chinese medical run tokenizes with), else the tiny model's. The rows have real ChatMed_Consult's length mix
(benchmarks/synthetic.py). The cold tokenize step writes unpacked rows (data.packing false); the pack step
packs that cache's rows best-fit into max_length rows and reports the padding efficiency (real tokens over
rows × max_length).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_TOKENIZER = HERE.parent.parent / "shared" / "tokenizers" / "chinese_llama2"


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def config(args):
    from medtune.recipe import DataConfig

    return DataConfig(
        train_files=[str(Path(args.work) / "prepared.jsonl")], template="chatmed", max_length=args.max_length
    )


def step_tokenize(args) -> dict:
    """load_datasets as training calls it: cold builds the cache, warm finds it."""
    from medtune.data.token_cache import load_datasets
    from medtune.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    base = rss_mb()
    start = time.perf_counter()
    train, _ = load_datasets(config(args), 42, tokenizer, log=lambda message: None)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": len(train), "rss_after_imports_mb": round(base)}


def step_pack(args) -> dict:
    """The tokenized cache's rows, streamed through best-fit packing into a new Arrow file."""
    import pyarrow.compute as pc

    from medtune.data.packing import padding_efficiency
    from medtune.data.token_cache import PACK_CHUNK, RowFile, cache_key, lay_out, read_rows
    from medtune.data.tokenizer import load_tokenizer
    from medtune.paths import cache_root

    cfg = config(args)
    key = cache_key(cfg, 42, load_tokenizer(args.tokenizer), cfg.train_files)
    source = cache_root() / "tokenized" / key / "train.arrow"
    out = RowFile(Path(args.work) / "packed.arrow")
    start = time.perf_counter()
    samples = lay_out(read_rows(source, None, PACK_CHUNK), "pack", args.max_length, out)
    out.close()
    seconds = time.perf_counter() - start
    import pyarrow as pa

    with pa.memory_map(str(out.path)) as handle:
        table = pa.ipc.open_stream(handle).read_all()
        fill = padding_efficiency(table, args.max_length)
        tokens = pc.sum(pc.list_value_length(table.column("input_ids"))).as_py()
    return {
        "seconds": seconds,
        "rows": samples,
        "packed_rows": out.rows,
        "padding_efficiency": round(fill, 4),
        "tokens": tokens,
    }


def run_step(name: str, args, extra: list[str]) -> dict:
    """The step in a fresh Python process; its peak RSS from the kernel's accounting of that child."""
    env = {**os.environ, "MEDTUNE_CACHE": str(Path(args.work) / "cache"), "OMP_NUM_THREADS": "2"}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, *extra], stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status):
            sys.exit(f"{name} failed:\n{err.read()[-3000:]}")
        last = (out.read().strip().splitlines() or [""])[-1]
    result = json.loads(last) if last.startswith("{") else {}
    result.setdefault("seconds", time.perf_counter() - start)
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=int)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: Chinese-LLaMA-2's)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--keep", default=None, help="work in this directory and keep it")
    parser.add_argument("--reuse", action="store_true", help="with --keep: reuse its prepared data, new cache")
    parser.add_argument("--step", choices=["tokenize", "pack"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps({"tokenize": step_tokenize, "pack": step_pack}[args.step](args)))
        return
    work = Path(args.keep or tempfile.mkdtemp(prefix="medtune-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    if args.tokenizer is None:
        if SHARED_TOKENIZER.is_dir():
            args.tokenizer = str(SHARED_TOKENIZER)
        else:
            from medtune.model.tiny import ensure_tiny_llama

            args.tokenizer = str(ensure_tiny_llama([]))
    sys.path.insert(0, str(HERE))
    from synthetic import write_chatmed_raw

    raw = work / "raw.jsonl"
    start = time.perf_counter()
    if not args.reuse:
        write_chatmed_raw(raw, args.rows)
    shutil.rmtree(work / "cache", ignore_errors=True)  # the cold step is cold
    size, seconds = raw.stat().st_size / 2**20, time.perf_counter() - start
    print(f"synthetic: {args.rows:,} ChatMed rows, {size:,.0f} MiB, {seconds:.0f} s")
    step = [__file__, "0", "--work", str(work), "--tokenizer", args.tokenizer, "--max-length", str(args.max_length)]
    steps = {
        "data_prep": ["-m", "data_prep", "chatmed-consult", str(raw), "--out", str(work / "prepared.jsonl")],
        "tokenize cold": [*step, "--step", "tokenize"],
        "tokenize warm": [*step, "--step", "tokenize"],
        "pack": [*step, "--step", "pack"],
    }
    if args.reuse:
        del steps["data_prep"]
    results = {}
    for name, command in steps.items():
        result = run_step(name, args, command)
        results[name] = result
        rows = result.get("rows", args.rows)
        rate, peak = rows / result["seconds"], result["peak_rss_mb"]
        line = f"{name:14} {result['seconds']:9.2f} s  {rate:>11,.0f} rows/s  peak RSS {peak:,} MB"
        if "rss_after_imports_mb" in result:
            line += f" ({result['rss_after_imports_mb']:,} MB after imports)"
        if "padding_efficiency" in result:
            line += f"  {result['packed_rows']:,} rows, padding efficiency {result['padding_efficiency']}"
        print(line, flush=True)
    warm, cold = results["tokenize warm"]["seconds"], results["tokenize cold"]["seconds"]
    print(f"warm / cold: {warm / cold:.4%}")
    print(json.dumps({"rows": args.rows, "tokenizer": args.tokenizer, **results}))


if __name__ == "__main__":
    main()
