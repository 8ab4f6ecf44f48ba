"""Training throughput through the real medtune loop: real (non-pad) tokens/s, padding efficiency,
step time and peak memory, on a PromptCBLUE-like length mix.

    python benchmarks/train_throughput.py                     # padded (length-grouped)
    python benchmarks/train_throughput.py --compare-packing   # random batches vs length-grouped vs packed
    python benchmarks/train_throughput.py --recipe recipes/chatmed_consult.yaml --steps 50   # a real recipe (GPU)

Without --recipe: a random-weight LLaMA-shaped model (hidden 256, 4 layers) and 2,000 synthetic
samples, fp32, LoRA r 8 / alpha 16 on all linear layers, batch 8, max length 1024.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import promptcblue_like, write_jsonl  # noqa: E402

from medtune.model.tiny import build_tiny_llama, corpus_texts  # noqa: E402
from medtune.recipe import load_recipe  # noqa: E402
from medtune.train import train  # noqa: E402

VARIANTS = {
    "random batches": ["data.group_by_length=false", "data.packing=false"],
    "length-grouped": ["data.group_by_length=true", "data.packing=false"],
    "packed": ["data.packing=true"],
}

RECIPE = """
model: {{base: {base}, dtype: fp32}}
lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}}
data: {{train_files: [{data}], template: chatmed, max_length: 1024}}
train: {{learning_rate: 1e-4, max_steps: {steps}, per_device_batch_size: 8, logging_steps: 10, save_steps: 0}}
"""


def run(recipe_path: Path, overrides: list[str], out: Path) -> dict:
    recipe = load_recipe(recipe_path, overrides + [f"output.dir={out}"])
    start = time.perf_counter()
    run_dir = train(recipe).run
    elapsed = time.perf_counter() - start
    rows = [r for r in run_dir.read_metrics() if "loss" in r][1:]  # the first window includes warm-up
    result = {
        "real_tokens_per_s": round(sum(r["tokens_per_s"] for r in rows) / len(rows), 1),
        "padding_efficiency": round(sum(r["padding_efficiency"] for r in rows) / len(rows), 4),
        "step_s": round(elapsed / recipe.train.max_steps, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if torch.cuda.is_available():
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, help="a recipe to measure (default: the synthetic CPU setup)")
    parser.add_argument("--compare-packing", action="store_true")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe_path = args.recipe
        if recipe_path is None:
            data = write_jsonl(promptcblue_like(args.samples), tmp / "data.jsonl")
            base = build_tiny_llama(tmp / "base", corpus_texts([data]), hidden_size=256, layers=4)
            recipe_path = tmp / "bench.yaml"
            recipe_path.write_text(RECIPE.format(base=base, data=data, steps=args.steps), encoding="utf-8")
        variants = VARIANTS if args.compare_packing else {"length-grouped": VARIANTS["length-grouped"]}
        for name, overrides in variants.items():
            result = run(recipe_path, overrides + [f"train.max_steps={args.steps}"], tmp / name.replace(" ", "-"))
            print(json.dumps({"variant": name, **result}), flush=True)


if __name__ == "__main__":
    main()
