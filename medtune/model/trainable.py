"""The model a run trains: its base checked against the stage, embeddings sized to the tokenizer, LoRA attached
(and PPO's value head), every module name the recipe gives matched, dropout as the stage wants it."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from medtune.model.load import attach_lora, count_parameters, load_base_model
from medtune.recipe import Recipe, RecipeError
from medtune.rundir import MERGE_INFO, read_json
from medtune.stages import get_stage


def build_model(
    recipe: Recipe, base: str, dtype: str, tokenizer: PreTrainedTokenizerBase, device_index: int, log: Callable
) -> torch.nn.Module:
    """The base loaded for ``recipe.train.stage`` (on GPU ``device_index`` when quantized), with the adapter."""
    quantized = recipe.model.quantization is not None
    device_map = {"": device_index} if quantized and torch.cuda.is_available() else None
    stage = get_stage(recipe.train.stage)
    reward_head = stage.reward_head
    model = load_base_model(base, recipe.model, dtype, device_map=device_map, reward_head=reward_head)
    if reward_head:
        model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at each row's last non-pad token
    rows = model.get_input_embeddings().num_embeddings  # not weight.shape: ZeRO-3 partitions the weight at load
    if len(tokenizer) > rows:  # an extended vocabulary (e.g. Chinese-LLaMA's tokenizer on LLaMA weights)
        if not {"embed_tokens", "lm_head"} <= set(recipe.lora.modules_to_save):
            raise RecipeError(
                f"lora.modules_to_save: the tokenizer has {len(tokenizer)} tokens but the model's embeddings only "
                f"{rows} rows; add [embed_tokens, lm_head] so the new rows are trained and saved with the adapter"
            )
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        log(f"embeddings resized from {rows} to {model.get_input_embeddings().num_embeddings} rows")
    check_module_names(model, recipe)
    model = attach_lora(model, recipe.lora, recipe.train.gradient_checkpointing, quantized, reward_head)
    if stage.value_head:  # PPO's critic: a value head on the policy's last hidden states, trained too
        model.v_head = torch.nn.Linear(model.config.hidden_size, 1, dtype=torch.float32)
    disable = recipe.train.disable_dropout
    if disable if disable is not None else not stage.dropout:
        for module in model.modules():  # LoRA's dropout and the base's: every nn.Dropout
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        log("dropout off (train.disable_dropout)")
    trainable, total = count_parameters(model)
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return model


def check_policy_base(base: str, recipe: Recipe, log: Callable) -> None:
    """DPO and RL start from the SFT model they refine (Zhongjing: SFT → RM → PPO/DPO): the stage table's
    ``refines``. A base that is not a medtune merge of that stage is named in a warning, or refused with
    train.require_sft_base."""
    refines = get_stage(recipe.train.stage).refines
    if refines is None:
        return
    merge_info = Path(base) / MERGE_INFO
    saved = read_json(merge_info) if merge_info.is_file() else {}
    stage = saved.get("source", saved).get("stage")
    if stage == refines:
        return
    what = f"a medtune merge of a {stage} run" if stage else f"not a medtune merge of an {refines.upper()} run"
    message = (
        f"model.base {base}: {what}; train.stage {recipe.train.stage} expects the {refines.upper()} model it refines"
    )
    if recipe.train.require_sft_base:
        raise RecipeError(f"{message} (train.require_sft_base is true)")
    log(f"warning: {message}")


def check_module_names(model, recipe: Recipe) -> None:
    """Every name in lora.target_modules and lora.modules_to_save must match a module: peft skips an
    unknown one without a word, and the run trains something else than the recipe says."""
    names = {n for n, _ in model.named_modules() if n}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    targets = [] if recipe.lora.target_modules == "all-linear" else list(recipe.lora.target_modules)
    for key, entries in (("target_modules", targets), ("modules_to_save", recipe.lora.modules_to_save)):
        for entry in entries:
            if not any(n == entry or n.endswith("." + entry) for n in names):
                close = difflib.get_close_matches(entry, leaves, n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; module names: {', '.join(leaves[:12])}"
                raise RecipeError(f"lora.{key}: {entry!r} matches no module of this model{hint}")
