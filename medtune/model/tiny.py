"""The built-in `tiny-llama` base: a random-weight LlamaForCausalLM and a BPE tokenizer trained on the data.

It exists so the whole pipeline (train, resume, merge, predict, score) runs on a
CPU with no download. It goes through exactly the same loading code as a real
base: it is saved as an ordinary model directory (safetensors) and loaded back
with ``from_pretrained``. The directory is cached under ``$MEDTUNE_CACHE``
(default ``~/.cache/medtune``), keyed by the corpus content, so a second run
reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from medtune.data.templates import TEMPLATES
from medtune.paths import cache_root

TINY_NAME = "tiny-llama"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
_BUILD_VERSION = "1"  # bump when the tiny architecture or tokenizer recipe changes


def tiny_model_dir(corpus_files: Iterable[str | Path], hidden_size: int = 64, layers: int = 2) -> Path:
    """Where the tiny model for this corpus lives (it may not be built yet)."""
    digest = hashlib.sha256(f"{_BUILD_VERSION}:{hidden_size}:{layers}".encode())
    for path in sorted(str(p) for p in corpus_files):
        digest.update(Path(path).read_bytes())
    return cache_root() / f"{TINY_NAME}-{digest.hexdigest()[:16]}"


def corpus_texts(corpus_files: Iterable[str | Path]) -> Iterable[str]:
    """Every string inside the JSONL records, plus the chat templates' literal markers."""
    for template in TEMPLATES.values():
        yield template.user + template.assistant + template.system + template.default_system
    for path in corpus_files:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield from _strings(json.loads(line))


def _strings(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """A byte-level BPE (every string round-trips exactly) with LLaMA's special tokens."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


def tiny_llama_config(tokenizer, hidden_size: int = 64, layers: int = 2) -> LlamaConfig:
    """The tiny LLaMA's shape over ``tokenizer``'s vocabulary (rounded up to a multiple of 64: bitsandbytes' CPU
    4-bit kernel needs it), with its special ids."""
    return LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_llama(
    out_dir: Path, texts: Iterable[str], hidden_size: int = 64, layers: int = 2, seed: int = 0
) -> Path:
    """Write a tokenizer and a random LlamaForCausalLM to ``out_dir`` (atomically: temp dir, then rename)."""
    if out_dir.is_dir():
        return out_dir
    tokenizer = train_tokenizer(texts)
    config = tiny_llama_config(tokenizer, hidden_size, layers)
    with torch.random.fork_rng():  # leave the caller's RNG alone: building must not change training
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
    try:
        # Not model.save_pretrained: under torch.distributed, transformers 5 writes weights on global rank 0
        # only, and this runs on each machine's first process (rank 1 on the second machine).

        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors", {"format": "pt"}
        )
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (tmp / n).is_file()]
        if missing:
            raise RuntimeError(f"building the tiny model wrote no {', '.join(missing)}")
        os.replace(tmp, out_dir)
    except OSError:
        if not out_dir.is_dir():  # another process may have won the race; that is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_tiny_llama(corpus_files: list[str]) -> Path:
    """The cached tiny model for this corpus, built on first use."""
    out_dir = tiny_model_dir(corpus_files)
    if not out_dir.is_dir():
        build_tiny_llama(out_dir, corpus_texts(corpus_files))
    return out_dir
