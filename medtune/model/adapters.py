"""LoRA adapters on a loaded base: what predict, chat, eval, reward and merge load, and the checks before.

peft attaches and merges; this module only resizes embeddings to the vocabulary an adapter was trained with
(an extended Chinese vocabulary saved through modules_to_save) and refuses a base stored quantized."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from peft import PeftModel
from safetensors import SafetensorError, safe_open

from medtune.console import MedtuneError
from medtune.model.load import load_weights


def refuse_quantized(base: str) -> None:
    config = Path(base) / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text(encoding="utf-8")):
        raise MedtuneError(
            f"{base}: this base is stored quantized (config.json has quantization_config). Merging into "
            "4/8-bit weights rounds the LoRA update away; give the original fp16/bf16 base with --base."
        )


def adapter_vocab_size(adapter: str) -> int | None:
    """The vocabulary size an adapter was trained with, if it saved embed_tokens or lm_head. Reading the
    header also proves the file whole: a truncated or damaged one is one error naming it."""
    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    try:
        with safe_open(str(weights), framework="pt") as handle:
            sizes = [
                handle.get_slice(key).get_shape()[0]
                for key in handle.keys()
                if key.endswith(("embed_tokens.weight", "lm_head.weight")) and "lora_" not in key
            ]
    except SafetensorError as exc:
        raise MedtuneError(f"{weights}: damaged or truncated ({exc}); train or copy the adapter again") from None
    return sizes[0] if sizes else None


def apply_adapter(model, adapter: str):
    """``model`` with ``adapter`` attached (a PeftModel); embeddings are first resized to the vocabulary the
    adapter was trained with (an extended, e.g. Chinese, vocabulary saved through modules_to_save). A .bin
    adapter goes through torch's weights-only loader: a pickle that would run code is refused, in one line."""
    vocab = adapter_vocab_size(adapter)
    if vocab and vocab != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab)
    try:
        return PeftModel.from_pretrained(model, adapter).eval()
    except (pickle.UnpicklingError, SafetensorError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise MedtuneError(
            f"{adapter}: refused to load the adapter ({first}); use adapter_model.safetensors from a trusted copy"
        ) from None


def load_with_adapters(auto, info, **kwargs):
    """The base a ModelSource names, its adapters merged in memory, in order: what predict, chat, eval and
    reward run (``kwargs`` go to the weights loader: dtype, num_labels, quantization_config, ...)."""
    model = load_weights(auto, info.base, **kwargs)
    for adapter in info.adapters:
        model = apply_adapter(model, adapter).merge_and_unload()
    return model
