"""medtune vs LLaMA-Factory on the same CPU work: same tiny LLaMA-shaped model (hidden 256, 4 layers),
same tokenizer, same 2,000 synthetic Chinese samples, LoRA r 8 / alpha 16 on all linear layers,
batch 8, 60 steps, fp32, --workers threads and tokenizing processes each (default: one per core).

    python3 -m venv /tmp/lfvenv && /tmp/lfvenv/bin/pip install torch==2.13.0 llamafactory==0.9.5
    python benchmarks/llamafactory_compare.py --lf-cli /tmp/lfvenv/bin/llamafactory-cli            # defaults
    python benchmarks/llamafactory_compare.py --lf-cli /tmp/lfvenv/bin/llamafactory-cli --equal    # equal settings
    python benchmarks/llamafactory_compare.py --lf-cli /tmp/lfvenv/bin/llamafactory-cli --tokenize [--rows N]
        [--pairs N] [--tokenizer DIR]      # cold and warm starts of whole training commands (warm_start.py)

Pin torch: torch==2.13.0 is the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
``--tokenize`` runs benchmarks/warm_start.py with the options that follow (its docstring says what it
holds equal); the rest of this docstring is about the training loop.

The first compares each tool as it comes (LLaMA-Factory: random batches, gradient checkpointing on).
``--equal`` runs the defaults pair and three pairs at equal settings, interleaved, ``--repeats`` times
each: length-grouped batches without checkpointing (LF: ``train_sampling_strategy: group_by_length``,
``disable_gradient_checkpointing: true``), packed rows with per-sample attention (LF: ``packing``,
``neat_packing``), and random batches without checkpointing; medtune pads to a multiple of 8 in those
three, as LLaMA-Factory's SFT collator always does when training.

Both train on the same text: LLaMA-Factory runs a template registered for this run (warm_start.py's
launcher) that writes medtune's chatmed text: the tokenizer's BOS, "问：\n{q}\n答：\n" as the prompt,
"{a}\n" as the reply, EOS, so the same tokens are trained and masked; the script counts both tools'
tokens of every sample (LLaMA-Factory tokenizes prompt and reply apart, medtune in one call) and refuses
to compare if the totals differ. Real (non-pad) tokens/s: for LLaMA-Factory, steps x batch samples x
the mean tokens of a sample (it draws batches at random); for medtune, the real tokens its loop
counted (a packed row holds several samples). Each side is timed over its training loop only
(HF Trainer's train_runtime; medtune's loop_seconds), model loading and tokenization excluded. Each tool's
caches (HF_HOME, HF_DATASETS_CACHE, XDG_CACHE_HOME, TMPDIR, MEDTUNE_CACHE) are in the run's temporary
directory. Prints both environments' versions and the load average before and after.

LLaMA-Factory 0.9.5 imports torchaudio at start-up even for text-only SFT, and no torchaudio wheel
exists for torch 2.13.0: give its venv an empty `torchaudio` package (text SFT never calls it), and
uninstall torchvision (PyPI's build does not load beside the torch 2.13.0 CPU wheel):
    SP=$(/tmp/lfvenv/bin/python -c "import site; print(site.getsitepackages()[0])")
    /tmp/lfvenv/bin/pip uninstall -y torchvision torchaudio; mkdir -p $SP/torchaudio; touch $SP/torchaudio/__init__.py
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proc_tree import isolated_env  # noqa: E402
from synthetic import promptcblue_like, write_jsonl  # noqa: E402
from warm_start import PACKAGES, loadavg, versions, write_lf_launcher  # noqa: E402

LF_TEMPLATE = "medtune_chatmed"

LF_CONFIG = """model_name_or_path: {base}
trust_remote_code: false
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_alpha: 16
lora_dropout: 0.0
lora_target: all
dataset: synthetic
dataset_dir: {data_dir}
template: {template}
cutoff_len: 1024
overwrite_cache: true
preprocessing_num_workers: {workers}
dataloader_num_workers: 0
output_dir: {out}
logging_steps: 10
save_strategy: "no"
report_to: none
per_device_train_batch_size: 8
gradient_accumulation_steps: 1
learning_rate: 1.0e-4
max_steps: {steps}
lr_scheduler_type: cosine
bf16: false
fp16: false
seed: 42
"""

MEDTUNE_RECIPE = """
model: {{base: {base}, dtype: fp32}}
lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}}
data: {{train_files: [{data}], template: chatmed, max_length: 1024}}
train:
  {{learning_rate: 1e-4, max_steps: {steps}, per_device_batch_size: 8, logging_steps: 10, save_steps: 0, seed: 42}}
"""


def chatmed_prompt(record: dict) -> str:
    return f"问：\n{record['messages'][0]['content']}\n答：\n"


def chatmed_reply(record: dict) -> str:
    return f"{record['messages'][1]['content']}\n"


def run_llamafactory(
    cli: str, base: Path, records: list[dict], steps: int, tmp: Path, extra: str = "", workers: int = 1
) -> dict:
    """One LLaMA-Factory training run: its loop seconds and, from its log, the number of training rows."""
    data_dir = tmp / "lf_data"
    data_dir.mkdir(exist_ok=True)
    alpaca = [  # the LF template writes them as medtune's chatmed template does
        {"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]}
        for r in records
    ]
    (data_dir / "synthetic.json").write_text(json.dumps(alpaca, ensure_ascii=False), encoding="utf-8")
    (data_dir / "dataset_info.json").write_text(json.dumps({"synthetic": {"file_name": "synthetic.json"}}))
    launcher = write_lf_launcher(tmp / "lf_train.py", LF_TEMPLATE, "问：\n{{content}}\n答：\n", "{{content}}\n")
    config = tmp / "lf.yaml"
    out = tmp / "lf_out"
    shutil.rmtree(out, ignore_errors=True)
    config.write_text(
        LF_CONFIG.format(base=base, data_dir=data_dir, out=out, steps=steps, template=LF_TEMPLATE, workers=workers)
        + extra
    )
    env = isolated_env(
        tmp, workers, WANDB_DISABLED="true", DISABLE_VERSION_CHECK="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1"
    )
    python = str(Path(cli).parent / "python")
    proc = subprocess.run([python, str(launcher), "train", str(config)], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit("LLaMA-Factory failed:\n" + proc.stdout[-3000:] + proc.stderr[-3000:])
    results = json.loads((out / "train_results.json").read_text())
    rows = re.search(r"Num examples = ([\d,]+)", proc.stdout + proc.stderr)
    return {"seconds": results["train_runtime"], "rows": int(rows.group(1).replace(",", "")) if rows else None}


def run_medtune(
    base: Path, data: Path, steps: int, tmp: Path, overrides: list[str], workers: int = 1
) -> tuple[float, int]:
    recipe = tmp / "medtune.yaml"
    recipe.write_text(MEDTUNE_RECIPE.format(base=base, data=data, steps=steps))
    out = Path(tempfile.mkdtemp(dir=tmp, prefix="medtune-")) / "run"  # a new run each time
    cmd = [
        sys.executable, "medtune/train.py", str(recipe), f"output.dir={out}", f"data.tokenize_workers={workers}",
        *overrides,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env=isolated_env(tmp, workers),
    )
    if proc.returncode:
        sys.exit("medtune failed:\n" + proc.stderr[-3000:])
    info = json.loads((out / "run_info.json").read_text())
    return info["loop_seconds"], info["real_tokens_this_session"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lf-cli", required=True, help="llamafactory-cli of a separate virtual environment")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--equal", action="store_true", help="three pairs at equal settings instead of defaults")
    parser.add_argument("--repeats", type=int, default=2, help="--equal: runs of each pair, interleaved")
    parser.add_argument("--tokenize", action="store_true", help="cold and warm starts instead (warm_start.py)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--workers", type=int, default=cores, help="threads and tokenizing processes of each tool")
    args, rest = parser.parse_known_args()
    if args.tokenize:
        import warm_start

        warm_start.main(["--lf-cli", args.lf_cli, "--workers", str(args.workers), *rest])
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from medtune.data.tokenizer import load_tokenizer
    from medtune.model.tiny import build_tiny_llama, corpus_texts

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["MEDTUNE_CACHE"] = str(tmp / "medtune-cache")
        records = promptcblue_like(args.samples)
        data = write_jsonl(records, tmp / "data.jsonl")
        base = build_tiny_llama(tmp / "base", corpus_texts([data]), hidden_size=256, layers=4)
        tokenizer = load_tokenizer(str(base))
        encode = partial(tokenizer.encode, add_special_tokens=False)
        ends = (tokenizer.bos_token_id is not None) + 1  # BOS (where the tokenizer has one) and EOS
        # LLaMA-Factory's sample: its prompt and its reply tokenized apart; medtune's: in one call
        lf_tokens = sum(len(encode(chatmed_prompt(r))) + len(encode(chatmed_reply(r))) + ends for r in records)
        medtune_tokens = sum(len(encode(chatmed_prompt(r) + chatmed_reply(r))) + ends for r in records)
        print(f"same text? tokens of the {len(records):,} samples: medtune {medtune_tokens:,}, LF {lf_tokens:,}")
        if lf_tokens != medtune_tokens:
            sys.exit("the two tools' samples differ in tokens: refusing to compare them")
        mine = ", ".join(f"{k} {importlib.metadata.version(k)}" for k in PACKAGES if k != "llamafactory")
        lf_versions = ", ".join(f"{k} {v}" for k, v in versions(str(Path(args.lf_cli).parent / "python"), tmp).items())
        print(f"medtune venv: {mine}\nLLaMA-Factory venv: {lf_versions}")
        print(f"{args.workers} threads and tokenizing processes each; load average before: {loadavg()}", flush=True)
        mean_tokens = lf_tokens / len(records)
        samples = args.steps * 8
        if args.equal:
            total_tokens = mean_tokens * len(records)
            equal_settings(args, base, data, records, tmp, samples * mean_tokens, total_tokens)
            print(f"load average after: {loadavg()}")
            return
        lf_seconds = run_llamafactory(args.lf_cli, base, records, args.steps, tmp, workers=args.workers)["seconds"]
        rows = {"LLaMA-Factory 0.9.5 (defaults)": (lf_seconds, samples * mean_tokens)}
        for name, overrides in {
            "medtune (length-grouped, default)": [],
            "medtune (random batches, no grouping)": ["data.group_by_length=false"],
            "medtune (packed)": ["data.packing=true"],
        }.items():
            rows[name] = run_medtune(base, data, args.steps, tmp, overrides, args.workers)
        lf_rate = rows["LLaMA-Factory 0.9.5 (defaults)"][1] / lf_seconds
        # samples/s only where a row is one sample (not packed)
        print(f"{'':40} {'loop s':>7} {'real tokens':>12} {'tokens/s':>9} {'vs LF':>6} {'samples/s':>10} {'vs LF':>6}")
        for name, (seconds, tokens) in rows.items():
            per_sample = (
                f"{samples / seconds:10.2f} {lf_seconds / seconds:5.2f}x"
                if "packed" not in name
                else f"{'-':>10} {'-':>6}"
            )
            print(
                f"{name:40} {seconds:7.1f} {tokens:12.0f} {tokens / seconds:9.0f} {tokens / seconds / lf_rate:5.2f}x {per_sample}"  # noqa: E501
            )
        print(f"load average after: {loadavg()}")


NO_CHECKPOINTING = "disable_gradient_checkpointing: true\n"
PAD8 = "data.pad_to_multiple_of=8"  # LLaMA-Factory's SFT collator pads every training batch to a multiple of 8
EQUAL = {  # name: (LLaMA-Factory's settings, medtune's overrides)
    "each tool's defaults": ("", []),  # LF: random batches, checkpointing on; medtune: length-grouped, off
    "length-grouped, no checkpointing": (NO_CHECKPOINTING + "train_sampling_strategy: group_by_length\n", [PAD8]),
    "packed, per-sample attention": (
        NO_CHECKPOINTING + "packing: true\nneat_packing: true\n",
        ["data.packing=true", PAD8],
    ),
    "random batches, no checkpointing": (NO_CHECKPOINTING, ["data.group_by_length=false", PAD8]),
}


def equal_settings(args, base: Path, data: Path, records: list[dict], tmp: Path, lf_tokens: float, total: float):
    """Each pair at equal settings, the two tools interleaved: loop seconds and real tokens/s per run (the same
    steps of 8 samples, or of 8 packed rows). LLaMA-Factory's packed rows each hold the data's tokens over its
    row count (from its log), on average. Both tools' samples are the same tokens (checked before), so equal
    loop seconds on unpacked batches is equal speed."""

    def span(values: list[float], fmt: str) -> str:
        low, high = min(values), max(values)
        return format(low, fmt) if low == high else f"{format(low, fmt)}–{format(high, fmt)}"

    print(f"{'':34} {'LF loop s':>11} {'medtune loop s':>15} {'LF tokens/s':>13} {'medtune tokens/s':>17}")
    for name, (lf_extra, overrides) in EQUAL.items():
        runs: dict[str, list[tuple[float, float]]] = {"lf": [], "medtune": []}
        for _ in range(args.repeats):
            lf = run_llamafactory(args.lf_cli, base, records, args.steps, tmp, lf_extra, args.workers)
            tokens = args.steps * 8 * total / lf["rows"] if "packing" in lf_extra and lf["rows"] else lf_tokens
            runs["lf"].append((lf["seconds"], tokens / lf["seconds"]))
            seconds, real = run_medtune(base, data, args.steps, tmp, overrides, args.workers)
            runs["medtune"].append((seconds, real / seconds))
        cells = [
            span([r[k] for r in runs[tool]], f) for k, f in ((0, ".1f"), (1, ",.0f")) for tool in ("lf", "medtune")
        ]
        print(f"{name:34} {cells[0]:>11} {cells[1]:>15} {cells[2]:>13} {cells[3]:>17}", flush=True)


if __name__ == "__main__":
    main()
