"""What tests share besides fixtures: paths, the small recipe, writing a recipe (import from here, not conftest)."""

from __future__ import annotations

import shutil
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


def random_tiny_llama(vocab_size: int, **config):
    """A random 2-layer LlamaForCausalLM (seeded) over a real vocabulary of ``vocab_size`` tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab_size, num_key_value_heads=4, tie_word_embeddings=False, **settings, **config)
    )


def tiny_llama_with_tokenizer(out, tokenizer_dir) -> None:
    """A random 2-layer LlamaForCausalLM whose vocabulary is the real tokenizer's, saved with its files."""
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model")).get_piece_size()
    random_tiny_llama(vocab, bos_token_id=1, eos_token_id=2).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, out / name)
