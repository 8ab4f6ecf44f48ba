"""What tests share besides fixtures: paths, the small recipe, writing a recipe (import from here, not conftest)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "recipes" / "data" / "demo_medical.jsonl"


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


SMALL_RECIPE = f"""
model:
  base: tiny-llama
  dtype: fp32
lora:
  r: 4
  alpha: 8
  dropout: 0.1
  target_modules: all-linear
  modules_to_save: [lm_head]
data:
  train_files: [{DEMO_DATA}]
  eval_ratio: 0.1
  template: chatmed
  max_length: 128
train:
  learning_rate: 3e-3
  max_steps: 12
  per_device_batch_size: 4
  gradient_accumulation_steps: 2
  logging_steps: 2
  save_steps: 4
  seed: 7
"""
