"""Scale: N synthetic ChatMed rows → data_prep → tokenize (cold, then warm) → pack, each step its own process.

    python benchmarks/scale.py 1000000 [--tokenizer DIR] [--max-length 1024] [--workers N] [--keep DIR]

Prints one line per step: the step's own seconds (timed inside its process, imports excluded) and rows/s,
the whole process's wall time (start-up and imports included: what a user waits for a warm restart of
a command is longer still, it loads a model too; benchmarks/warm_start.py times whole training commands),
and the memory of the step's whole process tree, sampled every 0.1 s (benchmarks/proc_tree.py): peak RSS
(pages the forked workers share with the parent counted in each) and peak PSS (shared pages divided among
their sharers: what the tree occupies). The tokenize step also prints the RSS of its first process after
its imports; run it at two sizes to see whether the growth depends on N. The tokenize step runs
--workers tokenizing processes (data.tokenize_workers; default one per core, as medtune picks).
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
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from proc_tree import run_tree  # noqa: E402

SHARED_TOKENIZER = HERE.parent.parent / "shared" / "tokenizers" / "chinese_llama2"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def config(args):
    from medtune.recipe import DataConfig

    return DataConfig(
        train_files=[str(Path(args.work) / "prepared.jsonl")],
        template="chatmed",
        max_length=args.max_length,
        tokenize_workers=args.workers,
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
    """The step in a fresh Python process; the memory of its process tree, sampled."""
    work = Path(args.work)
    env = {
        **os.environ,
        "MEDTUNE_CACHE": str(work / "cache"),
        "OMP_NUM_THREADS": str(args.workers),
        "HF_HOME": str(work / "hf"),
        "HF_DATASETS_CACHE": str(work / "hf" / "datasets"),
        "XDG_CACHE_HOME": str(work / "xdg-cache"),
        "TMPDIR": str(work / "tmp"),
    }
    (work / "tmp").mkdir(exist_ok=True)
    with (work / "step.out").open("w+") as out, (work / "step.err").open("w+") as err:
        run = run_tree([sys.executable, *extra], env=env, stdout=out, stderr=err)
        out.seek(0), err.seek(0)
        if run.returncode:
            sys.exit(f"{name} failed:\n{err.read()[-3000:]}")
        last = (out.read().strip().splitlines() or [""])[-1]
    result = json.loads(last) if last.startswith("{") else {}
    result.setdefault("seconds", run.wall_s)
    result.update(
        wall_s=round(run.wall_s, 2),
        cpu_s=round(run.cpu_s, 2),
        peak_rss_mb=round(run.peak_rss_mb),
        peak_pss_mb=round(run.peak_pss_mb),
        processes=run.max_processes,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=int)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: Chinese-LLaMA-2's)")
    parser.add_argument("--max-length", type=int, default=1024)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--workers", type=int, default=min(cores, 8), help="tokenizing processes")
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
    from synthetic import write_chatmed_raw

    raw = work / "raw.jsonl"
    start = time.perf_counter()
    if not args.reuse:
        write_chatmed_raw(raw, args.rows)
    shutil.rmtree(work / "cache", ignore_errors=True)  # the cold step is cold
    size, seconds = raw.stat().st_size / 2**20, time.perf_counter() - start
    print(f"synthetic: {args.rows:,} ChatMed rows, {size:,.0f} MiB, {seconds:.0f} s")
    print(f"tokenizer {args.tokenizer}, {args.workers} tokenizing processes, load average {loadavg()}")
    step = [__file__, "0", "--work", str(work), "--tokenizer", args.tokenizer, "--max-length", str(args.max_length)]
    step += ["--workers", str(args.workers)]
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
        rate = rows / result["seconds"]
        line = (
            f"{name:14} {result['seconds']:9.2f} s  {rate:>11,.0f} rows/s  process {result['wall_s']:8.2f} s"
            f"  tree peak RSS {result['peak_rss_mb']:,} MB, PSS {result['peak_pss_mb']:,} MB"
            f" ({result['processes']} processes)"
        )
        if "rss_after_imports_mb" in result:
            line += f", first process {result['rss_after_imports_mb']:,} MB after imports"
        if "padding_efficiency" in result:
            line += f"  {result['packed_rows']:,} rows, padding efficiency {result['padding_efficiency']}"
        print(line, flush=True)
    warm, cold = results["tokenize warm"], results["tokenize cold"]
    step_ratio, process_ratio = warm["seconds"] / cold["seconds"], warm["wall_s"] / cold["wall_s"]
    print(f"warm / cold: step {step_ratio:.4%}, whole process {process_ratio:.2%}; load average {loadavg()}")
    print(json.dumps({"rows": args.rows, "tokenizer": args.tokenizer, **results}))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
