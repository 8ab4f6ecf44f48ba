"""Everything before the first step of medtune/train.py's loop: the base, tokenizer and data, the model with its
adapter, optimizer, loaders and schedule, and for online RL what a rollout reads."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase, get_scheduler

from medtune import __version__
from medtune.data.jinja_templates import prompt_opens_think
from medtune.data.rows import ROW_KINDS, LengthGroupedSampler
from medtune.data.templates import chat_template_text, get_template, stop_token_ids, warn_if_not_models_own
from medtune.data.token_cache import load_datasets, row_lengths
from medtune.data.tokenizer import load_tokenizer, tokenizer_kind
from medtune.model.load import base_config_summary, resolve_base
from medtune.model.trainable import build_model, check_policy_base
from medtune.recipe import Recipe, RecipeError, train_paths
from medtune.rundir import RunDir, describe_source
from medtune.stages import Stage, get_stage
from medtune.training.objectives import Objective, objective
from medtune.training.rewards import load_reward
from medtune.training.rollout import RolloutContext


def make_train_loader(train_set, recipe: Recipe, num_processes: int, collate) -> DataLoader:
    """Length-grouped batches by default (least padding without packing); shuffled rows otherwise."""
    cfg = recipe.train
    # Its own generator: an iterator without one draws from the global RNG, so a resumed run
    # (which opens one more iterator) would shift the dropout masks of every later step.
    loader_rng = torch.Generator().manual_seed(cfg.seed)
    if recipe.data.group_by_length and not recipe.data.packing:
        # Grouped over the global batch: accelerate deals consecutive batches to the processes.
        sampler = LengthGroupedSampler(row_lengths(train_set), cfg.per_device_batch_size * num_processes, cfg.seed)
        return DataLoader(
            train_set, batch_size=cfg.per_device_batch_size, sampler=sampler, collate_fn=collate, generator=loader_rng
        )
    return DataLoader(
        train_set, batch_size=cfg.per_device_batch_size, shuffle=True, collate_fn=collate, generator=loader_rng
    )


def keep_only_trainable():
    """Checkpoints hold only what training changes (the adapter), not a copy of the frozen base."""

    def hook(models, weights, output_dir):
        for m, state in zip(models, weights, strict=False):  # DeepSpeed hands over fewer state dicts
            names = {n for n, p in m.named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in names]:
                del state[key]

    return hook


@dataclass
class Setup:
    """Everything the loop needs, built once by :func:`setup`; ``step`` is where the loop stands."""

    recipe: Recipe
    stage: Stage
    objective: Objective  # what an optimizer step minimises, and over which items
    accelerator: Accelerator
    run: RunDir
    base: str  # the resolved base: a local directory or a hub id
    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module  # prepared by accelerate (DDP / DeepSpeed engine); unwrap for the PeftModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_dl: DataLoader
    eval_dl: DataLoader | None  # None: no held-out rows, or a stage whose figure is its reward
    total_steps: int
    save_kwargs: dict  # what accelerate's save_state needs under DeepSpeed
    rollout: RolloutContext | None = None  # online RL: what a rollout reads beside its prompts
    step: int = 0
    tokens_seen: int = 0


def check_tracker(recipe: Recipe) -> None:
    """wandb online without a key would stop at a login prompt after the model has loaded: say so now."""
    if recipe.train.report_to != "wandb" or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return
    netrc = Path.home() / ".netrc"
    if not os.environ.get("WANDB_API_KEY") and not (netrc.is_file() and "api.wandb.ai" in netrc.read_text()):
        raise RecipeError("train.report_to: wandb needs WANDB_API_KEY (or `wandb login`), or WANDB_MODE=offline")


def check_reward_model(recipe: Recipe) -> None:
    """rl.reward_model names a reward model (a stage with a score head): checked before any model is loaded."""
    if get_stage(recipe.train.stage).rollout and recipe.rl.reward_model:
        scorer = describe_source(recipe.rl.reward_model)
        if not get_stage(scorer.stage).reward_head:
            raise RecipeError(f"rl.reward_model: {recipe.rl.reward_model}: a {scorer.stage} model, not a reward model")


def tokenizer_and_data(recipe: Recipe, base: str, accelerator: Accelerator):
    """The base's tokenizer carrying the run's chat template, and the tokenized train and held-out rows."""
    tokenizer = load_tokenizer(base, recipe.model.tokenizer, recipe.model.trust_remote_code)
    template = get_template(recipe.data.template)
    warn_if_not_models_own(tokenizer, template, recipe.data.system_prompt, accelerator.print)
    tokenizer.chat_template = chat_template_text(tokenizer, template, recipe.data.system_prompt)
    with accelerator.local_main_process_first():  # each machine's first process tokenizes (or finds the cache)
        train_set, eval_set = load_datasets(
            recipe.data,
            recipe.train.seed,
            tokenizer,
            recipe.train.stage,
            accelerator.is_local_main_process,
            log=accelerator.print,
        )
    return tokenizer, train_set, eval_set


def setup(recipe: Recipe, accelerator: Accelerator, run: RunDir, dtype: str) -> Setup:
    """Data, model, optimizer, loaders and schedule: everything before the first step."""
    cfg, stage = recipe.train, get_stage(recipe.train.stage)
    check_reward_model(recipe)
    with accelerator.local_main_process_first():  # the tiny base is built once per machine (its own disk)
        base = resolve_base(recipe.model, train_paths(recipe.data))
    check_policy_base(base, recipe, accelerator.print)
    tokenizer, train_set, eval_set = tokenizer_and_data(recipe, base, accelerator)
    set_seed(cfg.seed)  # right before anything random: the adapter's init, then dropout and shuffling
    model = build_model(recipe, base, dtype, tokenizer, accelerator.local_process_index, accelerator.print)
    # Generation stops where the template's replies end and at the model's own stop ids; the adapter carries them.
    generation = getattr(model, "generation_config", None)  # a reward model (score head) generates nothing
    if generation is not None:
        template = get_template(recipe.data.template)
        generation.eos_token_id = stop_token_ids(tokenizer, template, generation.eos_token_id)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        fused=torch.cuda.is_available() and not cfg.deepspeed,  # one kernel for all parameters on a GPU
    )
    collate = partial(
        ROW_KINDS[stage.rows].collate,
        pad_id=tokenizer.pad_token_id,
        pad_to_multiple_of=recipe.data.pad_to_multiple_of or None,
    )
    train_dl = make_train_loader(train_set, recipe, accelerator.num_processes, collate)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    eval_dl = None
    if len(eval_set) and not stage.rollout:  # RL has no held-out loss: its figure is the reward
        eval_dl = accelerator.prepare(DataLoader(eval_set, batch_size=cfg.per_device_batch_size, collate_fn=collate))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else total_optimizer_steps(recipe, len(train_dl))
    # Not passed through accelerator.prepare (that would step it once per process per step), and not
    # registered for accelerate's checkpoints (those are pickles): its state goes into trainer_state.json.
    scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    accelerator.register_save_state_pre_hook(keep_only_trainable())
    is_deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    return Setup(
        recipe,
        stage,
        objective(stage),
        accelerator,
        run,
        base,
        tokenizer,
        model,
        optimizer,
        scheduler,
        train_dl,
        eval_dl,
        total_steps,
        {"exclude_frozen_parameters": True} if is_deepspeed else {},
        rollout_context(recipe, stage, base, tokenizer, model, accelerator) if stage.rollout else None,
    )


def total_optimizer_steps(recipe: Recipe, micro_batches: int) -> int:
    """train.num_epochs over this process's micro-batches, in optimizer steps (at least one)."""
    return max(1, math.floor(recipe.train.num_epochs * micro_batches) // recipe.train.gradient_accumulation_steps)


def rollout_context(
    recipe: Recipe, stage: Stage, base: str, tokenizer, model, accelerator: Accelerator
) -> RolloutContext:
    """What rollouts need beside the model and the prompt rows (which carry their conversations): the reward
    and the stop ids."""
    unwrapped = accelerator.unwrap_model(model)
    reward = load_reward(recipe, unwrapped, base)
    accelerator.print(f"rewards from {reward.name}")
    return RolloutContext(
        model=model,
        accelerator=accelerator,
        tokenizer=tokenizer,
        rl=recipe.rl,
        stage=stage,
        seed=recipe.train.seed,
        reward=reward,
        stop_ids=unwrapped.generation_config.eos_token_id,
        opens_think=prompt_opens_think(tokenizer, get_template(recipe.data.template), recipe.data.system_prompt),
    )


def write_run_start(s: Setup, mode: str, dtype: str) -> None:
    """The recipe and what was actually loaded, before the first step (resume keeps earlier metrics)."""
    recipe, run = s.recipe, s.run
    if s.accelerator.is_main_process:
        run.root.mkdir(parents=True, exist_ok=True)
        run.recipe_file.write_text(recipe.to_yaml(), encoding="utf-8")
        run.truncate_metrics(s.step)
        run.write_info(
            {
                "medtune_version": __version__,
                "base_model": s.base,
                "base_model_name": recipe.model.base,
                "base_config": base_config_summary(s.base, recipe.model.trust_remote_code),
                "template": recipe.data.template,
                "system_prompt": recipe.data.system_prompt,
                "tokenizer_kind": tokenizer_kind(s.tokenizer),
                "stage": recipe.train.stage,
                "world_size": s.accelerator.num_processes,
                "dtype": dtype,
                "total_steps": s.total_steps,
                "finished": False,
            }
        )
    if recipe.train.report_to == "wandb":
        s.accelerator.init_trackers("medtune", config=recipe.to_dict(), init_kwargs={"wandb": {"name": run.root.name}})
