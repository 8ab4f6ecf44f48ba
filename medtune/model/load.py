"""Load the base (dtype, attention, quantization) and attach the LoRA adapter.

transformers loads, bitsandbytes quantizes, peft builds the adapter: this module
only maps the recipe's model and lora groups onto them.
"""

from __future__ import annotations

import functools
import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub import constants
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

from medtune.console import MedtuneError
from medtune.model.tiny import TINY_NAME, ensure_tiny_llama
from medtune.paths import looks_local
from medtune.recipe import LoraSettings, ModelConfig, QuantizationConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@contextmanager
def eval_mode(module) -> Iterator[None]:
    """``module`` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@contextmanager
def reference_model(model) -> Iterator[None]:
    """The reference policy of DPO and RL: the same (unwrapped) PeftModel with the adapter switched off (no
    second model in memory), without gradients and in eval mode (no dropout), as TRL runs its reference model."""
    with eval_mode(model), torch.no_grad(), model.disable_adapter():
        yield


def resolve_dtype(name: str) -> str:
    """`auto` → bf16 on a GPU that has it, else fp32 (CPU bf16 is slow and fp16 on CPU is unsupported)."""
    if name == "fp16" and not torch.cuda.is_available():
        raise MedtuneError("model.dtype: fp16 mixed precision needs a CUDA GPU; use bf16 or fp32 on this machine")
    if name == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise MedtuneError("model.dtype: this GPU has no bf16 (pre-Ampere); use fp16 or fp32")
    if name != "auto":
        return name
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_base(model: ModelConfig, train_files: list[str]) -> str:  # paths (recipe.train_paths)
    """The absolute path or hub id to load (an absolute path keeps a run directory usable from anywhere);
    the built-in tiny model is built (once) from the training files."""
    if model.base == TINY_NAME:
        return str(ensure_tiny_llama(train_files))
    return check_model_path(model.base, "model.base")


class ModelError(MedtuneError):
    """A model that cannot be loaded as asked; the message names the key and what to do."""


def check_model_path(base: str, key: str) -> str:
    """A local model directory as an absolute path, or a hub id; a path that does not exist is an error
    now, not a hub look-up that times out a minute later."""
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{key}: {base}: a directory without config.json is not a model directory")
        return str(path.resolve())
    if looks_local(base):
        raise ModelError(f"{key}: {base}: no such model directory; a hub id looks like org/name")
    problem = hub_model_problem(base)
    if problem:
        raise ModelError(f"{key}: {base}: no such model directory, and {problem}")
    return base


@functools.cache
def hub_model_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` cannot be loaded from the hub, or None: a cached copy, or one request that finds it
    (instead of from_pretrained's retries and a traceback a minute later). Asked once per process: train
    checks model.base before anything is written and again when it resolves the base."""
    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
        return None
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set with no cached copy of a hub model by that id"
    try:
        found = huggingface_hub.repo_exists(repo_id)
    except Exception as exc:  # noqa: BLE001 - network, auth, rate limit: all mean "cannot be fetched now"
        return f"the hub cannot be reached to look it up ({type(exc).__name__})"
    return None if found else "no hub model by that id (or it is private: log in with `hf auth login`)"


def load_weights(auto, base: str, **kwargs):
    """``auto.from_pretrained`` from safetensors, or from ``.bin`` through torch's weights-only loader
    (transformers' default): a pickle that would run code is refused, never executed."""
    try:
        with score_head_report_quiet(auto):
            return auto.from_pretrained(base, **kwargs)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"{base}: refused to load a .bin checkpoint that is not plain tensors ({first}); "
            "convert it to safetensors from a trusted copy"
        ) from None
    except SafetensorError as exc:  # a copy or download that stopped: name the file that is cut short
        raise ModelError(f"{damaged_weights(base)}: damaged or truncated ({exc}); copy the model again") from None


@contextmanager
def score_head_report_quiet(auto) -> Iterator[None]:
    """A reward model is loaded as a sequence classifier over a causal LM's weights: transformers then reports
    its score head as "MISSING … newly initialized" in a LOAD REPORT. It is new on purpose (an RM being trained)
    or comes next from the adapter (merge, reward, RL), so that report says nothing wrong and is not shown;
    a real problem (a size mismatch) still raises."""
    if "SequenceClassification" not in getattr(auto, "__name__", ""):
        yield
        return
    logger = logging.getLogger("transformers.modeling_utils")  # a filter, not a level: transformers reads the level
    logger.addFilter(_drop_load_report)
    try:
        yield
    finally:
        logger.removeFilter(_drop_load_report)


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def damaged_weights(base: str) -> str:
    """The first safetensors file of ``base`` whose header cannot be read (else the directory itself)."""
    for path in sorted(Path(base).glob("*.safetensors")) if Path(base).is_dir() else []:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError:
            return str(path)
    return base


def quantization_config(quant: QuantizationConfig):
    """The BitsAndBytesConfig for a k-bit base."""

    if find_spec("bitsandbytes") is None:
        raise MedtuneError("model.quantization needs bitsandbytes: pip install 'medtune[quant]'")
    if quant.compute_dtype == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise MedtuneError("model.quantization.compute_dtype: this GPU has no bf16; use fp16")
    compute = DTYPES[quant.compute_dtype]
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,  # ZeRO-3 can shard 4-bit weights only if they are stored in a float dtype
    )


def load_base_model(base: str, model: ModelConfig, dtype: str, device_map=None, reward_head: bool = False):
    """The frozen base (safetensors preferred; ``.bin`` only through the weights-only loader).

    ``reward_head``: a reward model, i.e. the base with a one-output score head on its last token.
    """
    auto = AutoModelForSequenceClassification if reward_head else AutoModelForCausalLM
    kwargs = dict(
        dtype=DTYPES[dtype],
        attn_implementation=model.attn_implementation,
        trust_remote_code=model.trust_remote_code,
    )
    if model.quantization is not None:
        kwargs["quantization_config"] = quantization_config(model.quantization)
        if device_map is not None:
            kwargs["device_map"] = device_map
    if reward_head:
        kwargs["num_labels"] = 1
    return load_weights(auto, base, **kwargs)


def attach_lora(model, lora: LoraSettings, gradient_checkpointing: bool, quantized: bool, reward_head: bool = False):
    """Wrap the base with a trainable LoRA adapter; everything else stays frozen."""
    if quantized:
        # Casts norms to fp32 and enables input grads, which k-bit + checkpointing need.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (no enable_input_require_grads needed).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if gradient_checkpointing:
        model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        # SEQ_CLS makes peft train and save the new score head too
        modules_to_save=lora.modules_to_save or None,
        task_type="SEQ_CLS" if reward_head else "CAUSAL_LM",
    )
    return get_peft_model(model, config)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def base_config_summary(base: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """The shape of the base an adapter fits: merge refuses a --base of another shape or vocabulary."""
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    keys = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
    )
    return {k: getattr(config, k, None) for k in keys}
