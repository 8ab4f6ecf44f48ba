"""Train a LoRA adapter from a recipe: recipe → Accelerator → data → model → loop → run dir.

    accelerate launch medtune/train.py recipes/demo.yaml [group.key=value ...] [--resume]

One explicit loop for every stage. accelerate owns devices, DDP, DeepSpeed,
mixed precision and checkpoint state; peft owns the adapter; this file only
decides what happens in which order.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from medtune import __version__
from medtune.console import quiet_libraries, run_command
from medtune.data import LengthGroupedSampler
from medtune.model import (
    attach_lora,
    base_config_summary,
    check_model_path,
    count_parameters,
    load_base_model,
    resolve_base,
    resolve_dtype,
)
from medtune.recipe import Recipe, RecipeError, check_data_files, load_recipe, train_paths
from medtune.rollout import rollout
from medtune.rundir import (
    MERGE_INFO,
    SAFE_TO_CHANGE_ON_RESUME,
    TRAINER_STATE,
    RunDir,
    RunLock,
    plot_loss,
    recipe_changes,
)
from medtune.stages import Stage, get_stage
from medtune.templates import chat_template_text, get_template, stop_token_ids, warn_if_not_models_own
from medtune.tiny_model import TINY_NAME
from medtune.token_cache import load_datasets, row_lengths
from medtune.tokenizer import load_tokenizer, tokenizer_kind


def build_accelerator(recipe: Recipe, dtype: str):
    from accelerate import Accelerator, DataLoaderConfiguration, DeepSpeedPlugin
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    # accelerate keeps process-wide singletons; a second train() in the same process (a notebook,
    # the tests) may ask for another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    train = recipe.train
    launched_with_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"  # accelerate launch --use_deepspeed
    deepspeed = None
    if train.deepspeed:
        # What `accelerate launch --use_deepspeed` sets: without it, processes started by torchrun
        # on a machine without CUDA never join DeepSpeed's process group.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if "WORLD_SIZE" not in os.environ:
            # Started without a launcher (python/medtune train): DeepSpeed still needs a process group,
            # so this process is rank 0 of 1 (what a launcher with --num_processes 1 would set).
            os.environ.update(
                RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
            )
        deepspeed = DeepSpeedPlugin(
            hf_ds_config=train.deepspeed,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            gradient_clipping=train.max_grad_norm or None,
        )
    use_deepspeed = deepspeed is not None or launched_with_deepspeed
    handlers = []
    if use_deepspeed and not torch.cuda.is_available():
        # DeepSpeed on CPU talks over gloo; named explicitly, or accelerate counts a single process.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        kwargs_handlers=handlers,
        # On a machine without CUDA, accelerate forms a (gloo) process group under torchrun only when
        # told it is on CPU; otherwise every process believes it is rank 0. DeepSpeed picks its own
        # CPU accelerator and must not be given this flag.
        cpu=not torch.cuda.is_available() and not use_deepspeed,
        mixed_precision={"bf16": "bf16", "fp16": "fp16"}.get(dtype, "no"),
        # Windows are always exactly N micro-batches (see micro_batches), so syncing on the
        # step count alone is right, also across epoch boundaries.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=train.gradient_accumulation_steps,
            sync_with_dataloader=False,
        ),
        # A seeded sampler makes each epoch's order a function of (seed, epoch): a resumed run replays it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        deepspeed_plugin=deepspeed,
        log_with="wandb" if train.report_to == "wandb" else None,
        project_dir=recipe.output.dir,
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_run_dir(run: RunDir, recipe: Recipe) -> tuple[str, list[Path]]:
    """Decide between a fresh start, a resume and 'already done', reading only: nothing is deleted, and a
    directory holding anything medtune did not write (or a run with other settings) is refused.

    Returns (mode, checkpoints to try newest first)."""
    where = f"{run.root}"
    saved = run.read_recipe() if run.recipe_file.is_file() else None
    if saved is None or not recipe.train.resume:
        if not run.is_empty():
            what = "a run already exists there" if saved is not None else "it is not empty"
            raise RecipeError(
                f"{where}: {what}. Continue a run with --resume (train.resume=true), or choose "
                f"another output.dir=...; medtune never deletes a folder it did not create"
            )
        return "fresh", []
    changes = {k: v for k, v in recipe_changes(saved, recipe).items() if k != "train.resume"}
    listed = "; ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in changes.items())
    if run.is_finished():
        if changes:
            raise RecipeError(
                f"{where}: this run finished with other settings ({listed}); train into another output.dir to use them"
            )
        return "finished", []
    unsafe = {k: v for k, v in changes.items() if k not in SAFE_TO_CHANGE_ON_RESUME}
    if "train.max_steps" in changes and 0 < changes["train.max_steps"][1] < max(changes["train.max_steps"][0], 0):
        unsafe["train.max_steps"] = changes["train.max_steps"]
    if unsafe:
        raise RecipeError(
            f"{where}: cannot resume with changed settings: "
            + "; ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in unsafe.items())
            + " (only how long it trains and what it logs may change; use another output.dir)"
        )
    checkpoints = run.complete_checkpoints()
    if checkpoints:
        return "resume", checkpoints
    logged = max((r["step"] for r in run.read_metrics()), default=0)
    every = recipe.train.save_steps
    if every and logged >= every:
        raise RecipeError(
            f"{where}: the run logged step {logged} but no complete checkpoint is there (one was "
            f"expected every {every} steps); refusing to start over silently. Move the directory "
            "away to start again"
        )
    return "restart", []


def build_model(recipe: Recipe, base: str, dtype: str, tokenizer, accelerator):
    quantized = recipe.model.quantization is not None
    device_map = {"": accelerator.local_process_index} if quantized and torch.cuda.is_available() else None
    reward_head = get_stage(recipe.train.stage).reward_head
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
        accelerator.print(f"embeddings resized from {rows} to {model.get_input_embeddings().num_embeddings} rows")
    check_module_names(model, recipe)
    model = attach_lora(model, recipe.lora, recipe.train.gradient_checkpointing, quantized, reward_head)
    if recipe.train.stage == "ppo":  # PPO's critic: a value head on the policy's last hidden states, trained too
        model.v_head = torch.nn.Linear(model.config.hidden_size, 1, dtype=torch.float32)
    disable = recipe.train.disable_dropout
    if disable if disable is not None else not get_stage(recipe.train.stage).dropout:
        for module in model.modules():  # LoRA's dropout and the base's: every nn.Dropout
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        accelerator.print("dropout off (train.disable_dropout)")
    trainable, total = count_parameters(model)
    accelerator.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return model


def check_policy_base(base: str, recipe: Recipe, log) -> None:
    """DPO and RL start from the SFT model they refine (Zhongjing: SFT → RM → PPO/DPO). A base that is not a
    medtune SFT merge is named in a warning, or refused with train.require_sft_base."""
    if recipe.train.stage != "dpo" and not get_stage(recipe.train.stage).rollout:
        return
    merge_info = Path(base) / MERGE_INFO
    saved = json.loads(merge_info.read_text(encoding="utf-8")) if merge_info.is_file() else {}
    stage = saved.get("source", saved).get("stage")
    if stage == "sft":
        return
    what = f"a medtune merge of a {stage} run" if stage else "not a medtune merge of an SFT run"
    message = f"model.base {base}: {what}; train.stage {recipe.train.stage} expects the SFT model it refines"
    if recipe.train.require_sft_base:
        raise RecipeError(f"{message} (train.require_sft_base is true)")
    log(f"warning: {message}")


def check_module_names(model, recipe: Recipe) -> None:
    """Every name in lora.target_modules and lora.modules_to_save must match a module: peft skips an
    unknown one without a word, and the run trains something else than the recipe says."""
    import difflib

    names = {n for n, _ in model.named_modules() if n}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    targets = [] if recipe.lora.target_modules == "all-linear" else list(recipe.lora.target_modules)
    for key, entries in (("target_modules", targets), ("modules_to_save", recipe.lora.modules_to_save)):
        for entry in entries:
            if not any(n == entry or n.endswith("." + entry) for n in names):
                close = difflib.get_close_matches(entry, leaves, n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; module names: {', '.join(leaves[:12])}"
                raise RecipeError(f"lora.{key}: {entry!r} matches no module of this model{hint}")


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


def micro_batches(dataloader, start: int) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of micro-batches over epochs, starting after ``start`` of them."""
    from accelerate import skip_first_batches

    epoch, skip = divmod(start, len(dataloader))
    while True:
        dataloader.set_epoch(epoch)
        yield from (skip_first_batches(dataloader, skip) if skip else dataloader)
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def evaluate(model, dataloader, accelerator, stage: Stage, recipe: Recipe) -> float:
    """Mean loss per item (target token, or pair) over the whole eval set, all processes together."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    for batch in dataloader:
        loss = stage.loss_sum(model, batch, accelerator, recipe)[0].detach().float()
        total += torch.stack([loss, stage.items(batch).float()])
    total = accelerator.reduce(total, "sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


@dataclass
class TrainResult:
    run: RunDir
    model: Any = None  # the trained PeftModel (unwrapped); None when the run had already finished


@dataclass
class Setup:
    """Everything the loop needs, built once by :func:`setup`; ``step`` is where the loop stands."""

    recipe: Recipe
    accelerator: Any
    run: RunDir
    base: str
    tokenizer: Any
    model: Any
    optimizer: Any
    scheduler: Any
    train_dl: Any
    eval_dl: Any
    total_steps: int
    save_kwargs: dict
    step: int = 0
    tokens_seen: int = 0
    # online RL (stages with rollouts): the reward, the ids that end a reply
    reward: Any = None
    stop_ids: list[int] | None = None


LAUNCH_VARIABLES = ("ACCELERATE_USE_DEEPSPEED", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def train(recipe: Recipe) -> TrainResult:
    """Run (or resume) training to the end; the run directory holds everything it produced. The launch
    variables set for DeepSpeed are put back afterwards: a second train() in this process starts clean."""
    before = {key: os.environ.get(key) for key in LAUNCH_VARIABLES}
    try:
        return _train(recipe)
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _train(recipe: Recipe) -> TrainResult:
    check_data_files(recipe)
    if recipe.model.base != TINY_NAME:
        check_model_path(recipe.model.base, "model.base")  # before anything is loaded or written
    check_tracker(recipe)
    dtype = resolve_dtype(recipe.model.dtype)
    accelerator = build_accelerator(recipe, dtype)
    run = RunDir(recipe.output.dir)
    mode, checkpoints = prepare_run_dir(run, recipe)  # every process decides before anyone writes
    accelerator.wait_for_everyone()
    if mode == "finished":
        accelerator.print(
            f"{run.root}: this run already finished with these settings; its adapter is in {run.adapter_dir}"
        )
        return TrainResult(run)
    lock = RunLock(run.root)
    if accelerator.is_main_process:
        lock.acquire()
    s: Setup | None = None
    try:
        s = setup(recipe, accelerator, run, dtype)
        if mode == "resume":
            restore(s, checkpoints)
        elif mode == "restart":
            accelerator.print(f"{run.root}: no checkpoint was written yet; starting again from step 0")
        write_run_start(s, mode, dtype)
        return fit(s)
    except KeyboardInterrupt:
        raise Interrupted(run, s) from None
    finally:
        lock.release()


class Interrupted(Exception):
    """Ctrl-C: where the run stood and how to go on."""

    def __init__(self, run: RunDir, s: Setup | None):
        last = run.latest_checkpoint()
        at = f"at step {s.step}" if s is not None else "before the first step"
        then = f"resume from {last.name} with --resume" if last else "no checkpoint yet: --resume starts again"
        super().__init__(f"interrupted {at}; {then}")


def check_tracker(recipe: Recipe) -> None:
    """wandb online without a key would stop at a login prompt after the model has loaded: say so now."""
    if recipe.train.report_to != "wandb" or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return
    netrc = Path.home() / ".netrc"
    if not os.environ.get("WANDB_API_KEY") and not (netrc.is_file() and "api.wandb.ai" in netrc.read_text()):
        raise RecipeError("train.report_to: wandb needs WANDB_API_KEY (or `wandb login`), or WANDB_MODE=offline")


def setup(recipe: Recipe, accelerator, run: RunDir, dtype: str) -> Setup:
    """Data, model, optimizer, loaders and schedule: everything before the first step."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    cfg = recipe.train
    if get_stage(cfg.stage).rollout and recipe.rl.reward_model:  # before any model is loaded
        from medtune.rundir import describe_source

        scorer = describe_source(recipe.rl.reward_model)
        if not get_stage(scorer.stage).reward_head:
            raise RecipeError(f"rl.reward_model: {recipe.rl.reward_model}: a {scorer.stage} model, not a reward model")
    with accelerator.local_main_process_first():  # the tiny base is built once per machine (its own disk)
        base = resolve_base(recipe.model, train_paths(recipe.data))
    check_policy_base(base, recipe, accelerator.print)
    tokenizer = load_tokenizer(base, recipe.model.tokenizer, recipe.model.trust_remote_code)
    template = get_template(recipe.data.template)
    warn_if_not_models_own(tokenizer, template, recipe.data.system_prompt, accelerator.print)
    tokenizer.chat_template = chat_template_text(tokenizer, template, recipe.data.system_prompt)
    with accelerator.local_main_process_first():  # each machine's first process tokenizes (or finds the cache)
        train_set, eval_set = load_datasets(
            recipe.data, cfg.seed, tokenizer, cfg.stage, accelerator.is_local_main_process, log=accelerator.print
        )
    set_seed(cfg.seed)  # right before anything random: the adapter's init, then dropout and shuffling
    model = build_model(recipe, base, dtype, tokenizer, accelerator)
    # Generation stops where the template's replies end and at the model's own stop ids; the adapter carries them.
    generation = getattr(model, "generation_config", None)  # a reward model (score head) generates nothing
    if generation is not None:
        generation.eos_token_id = stop_token_ids(tokenizer, template, generation.eos_token_id)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        fused=torch.cuda.is_available() and not cfg.deepspeed,  # one kernel for all parameters on a GPU
    )
    collate = partial(
        get_stage(cfg.stage).collate,
        pad_id=tokenizer.pad_token_id,
        pad_to_multiple_of=recipe.data.pad_to_multiple_of or None,
    )
    train_dl = make_train_loader(train_set, recipe, accelerator.num_processes, collate)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    eval_dl = None
    if len(eval_set) and not get_stage(cfg.stage).rollout:  # RL has no held-out loss: its figure is the reward
        eval_dl = accelerator.prepare(DataLoader(eval_set, batch_size=cfg.per_device_batch_size, collate_fn=collate))
    if cfg.max_steps > 0:
        total_steps = cfg.max_steps
    else:
        total_steps = max(1, math.floor(cfg.num_epochs * len(train_dl)) // cfg.gradient_accumulation_steps)
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
    rl = rl_parts(recipe, base, tokenizer, model, accelerator) if get_stage(cfg.stage).rollout else {}
    return Setup(
        recipe,
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
        **rl,
    )


def rl_parts(recipe: Recipe, base: str, tokenizer, model, accelerator) -> dict[str, Any]:
    """What rollouts need beside the model and the prompt rows (which carry their conversations): the reward
    and the stop ids."""
    from medtune.rollout import load_reward

    reward = load_reward(recipe, accelerator.unwrap_model(model), base)
    accelerator.print(f"rewards from {reward.name}")
    return {
        "reward": reward,
        "stop_ids": accelerator.unwrap_model(model).generation_config.eos_token_id,
    }


def restore(s: Setup, checkpoints: list[Path]) -> None:
    """Load the newest checkpoint that loads; a damaged one is named and the previous one used."""
    is_deepspeed = bool(s.save_kwargs)
    for i, checkpoint in enumerate(checkpoints):
        try:
            with checkpoint_without_pickles(checkpoint) as view:
                # Checkpoints hold only the trainable weights, so the frozen base is "missing" on purpose.
                s.accelerator.load_state(
                    str(view), **({"load_module_strict": False} if is_deepspeed else {"strict": False})
                )
            state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
            restore_schedule_and_rng(s, checkpoint, state)
        except Exception as exc:  # noqa: BLE001 - any failure to read a checkpoint means: try the one before
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            if i + 1 == len(checkpoints):
                raise RecipeError(
                    f"{checkpoint}: cannot be loaded ({reason}), and no older checkpoint is left; "
                    "move the run directory away to start again"
                ) from None
            s.accelerator.print(f"{checkpoint.name} is damaged ({reason}); resuming from {checkpoints[i + 1].name}")
            continue
        s.step, s.tokens_seen = state["step"], state["tokens_seen"]
        s.accelerator.print(f"resuming {s.run.root} from {checkpoint.name} (step {s.step} of {s.total_steps})")
        return


@contextmanager
def checkpoint_without_pickles(checkpoint: Path) -> Iterator[Path]:
    """The checkpoint as accelerate sees it, minus ``custom_checkpoint_*.pkl``: accelerate unpickles those
    with weights_only=False (code could run), and medtune registers none (its scheduler state is JSON), so
    a planted or older one is never even opened. Everything else accelerate reads with weights_only=True."""
    view = Path(tempfile.mkdtemp(prefix=".load-", dir=checkpoint.parent))
    try:
        for entry in checkpoint.iterdir():
            if not (entry.name.startswith("custom_checkpoint_") and entry.suffix == ".pkl"):
                (view / entry.name).symlink_to(entry.resolve())
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


def restore_schedule_and_rng(s: Setup, checkpoint: Path, state: dict[str, Any]) -> None:
    """The scheduler from JSON, this process's torch RNG from safetensors: nothing pickled is loaded."""
    from safetensors.torch import load_file

    if "scheduler" in state:
        s.scheduler.load_state_dict(state["scheduler"])
    else:  # a checkpoint from before medtune 0.2: the schedule is a function of the step
        for _ in range(state["step"]):
            s.scheduler.step()
    rng_file = checkpoint / f"rng_state_{s.accelerator.process_index}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state_all(list(rng["cuda"]))


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


class Meter:
    """What the log lines report. Kept as device tensors and read only when a line is written, so no
    optimizer step waits on the device."""

    def __init__(self, device, items_seen: int):
        self.window = torch.zeros(3, device=device)  # this process: loss sum, real tokens, processed tokens
        self.window_items = torch.zeros((), device=device)  # all processes: items since the last line
        self.items_total = torch.tensor(float(items_seen), device=device)  # all processes, the whole run
        self.device, self.last, self.real_tokens = device, time.perf_counter(), 0
        self.stats: dict[str, torch.Tensor] = {}  # this process: the stage's stats (sums over items)

    def micro_batch(self, loss_sum: torch.Tensor, batch: dict[str, torch.Tensor], stats: dict) -> None:
        processed = torch.tensor(float(batch["input_ids"].numel()), device=self.device)
        self.window += torch.stack([loss_sum.detach().float(), batch["real_tokens"].float(), processed])
        for name, value in stats.items():  # [sum, count] pairs
            self.stats[name] = self.stats.get(name, 0) + value.to(self.device)

    def optimizer_step(self, step_items: torch.Tensor) -> None:
        self.items_total += step_items
        self.window_items += step_items

    def line(self, accelerator, step: int, lr: float, epoch: float) -> dict[str, Any]:
        loss_total, real, processed = accelerator.reduce(self.window, "sum").tolist()
        items = max(self.window_items.item(), 1.0)
        now = time.perf_counter()
        row = {
            "step": step,
            "loss": round(loss_total / items, 6),
            "lr": lr,
            "tokens_per_s": round(real / (now - self.last), 1),
            "padding_efficiency": round(real / max(processed, 1.0), 4),
            "epoch": round(epoch, 4),
        }
        for name in sorted(self.stats):  # each stat's own mean over the window, all processes
            total, count = accelerator.reduce(self.stats[name], "sum").tolist()
            row[name] = round(total / max(count, 1.0), 6)
        self.stats = {}
        self.real_tokens += int(real)
        self.last = now
        self.window.zero_()
        self.window_items.zero_()
        return row


def peak_memory_mb(device) -> float:
    """The GPU's peak allocation since the last line (then reset), or on a CPU the process's peak RSS so far."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return round(peak / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def optimizer_step(
    s: Setup, stage: Stage, window: list[dict[str, torch.Tensor]], meter: Meter, last: bool = True
) -> None:
    """One optimizer step over an accumulation window of micro-batches; the schedule and the item count move
    on the ``last`` pass over a window (PPO makes several)."""
    cfg, accelerator, model = s.recipe.train, s.accelerator, s.model
    # Normalise by the items (target tokens, or pairs) of the whole optimizer step, over all
    # micro-batches and all processes: every item weighs the same, however the batches split them.
    local_items = sum(stage.items(b) for b in window)
    step_items = accelerator.reduce(local_items.to(accelerator.device).float(), "sum").clamp(min=1)
    for batch in window:
        with accelerator.accumulate(model):
            loss_sum, stats = stage.loss_sum(model, batch, accelerator, s.recipe)
            # backward() divides by the accumulation steps and DDP averages over processes:
            # multiply both back so the gradient is exactly d(sum of item losses)/d(w) / step_items.
            accelerator.backward(loss_sum * (len(window) * accelerator.num_processes) / step_items)
            if accelerator.sync_gradients:  # the window's last micro-batch: the summed gradient is complete
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                s.optimizer.step()
                s.optimizer.zero_grad()
        if last:  # what the line reports: the last pass over the window
            meter.micro_batch(loss_sum, batch, stats)
    if last:
        s.scheduler.step()
        meter.optimizer_step(step_items)


def fit(s: Setup) -> TrainResult:
    """The loop, from ``s.step`` to the end: steps, log lines, evaluations, checkpoints; then :func:`finish`."""
    from tqdm.auto import tqdm

    cfg, accelerator, run = s.recipe.train, s.accelerator, s.run
    stage = get_stage(cfg.stage)
    accumulation = cfg.gradient_accumulation_steps
    s.model.train()
    loop_start, start_step = time.perf_counter(), s.step
    stream = micro_batches(s.train_dl, s.step * accumulation)
    show = accelerator.is_main_process and sys.stderr.isatty()
    progress = tqdm(total=s.total_steps, initial=s.step, desc="train", disable=not show)
    meter = Meter(accelerator.device, s.tokens_seen)
    last_eval = None
    while s.step < s.total_steps:
        window = [next(stream) for _ in range(accumulation)]
        if stage.rollout:  # prompts → sampled, scored replies (the policy as it stands before this step)
            window = [rollout(s, batch, s.step, i) for i, batch in enumerate(window)]
        epochs = s.recipe.rl.ppo_epochs if cfg.stage == "ppo" else 1  # PPO learns from each rollout several times
        for epoch in range(epochs):
            optimizer_step(s, stage, window, meter, last=epoch == epochs - 1)
        s.step += 1
        progress.update(1)
        if s.step % cfg.logging_steps == 0 or s.step == s.total_steps:
            epoch = s.step * accumulation / len(s.train_dl)
            row = meter.line(accelerator, s.step, s.scheduler.get_last_lr()[0], epoch)
            if stage.rollout:
                row["peak_memory_mb"] = peak_memory_mb(accelerator.device)
            _log(run, accelerator, progress, row)
        if s.eval_dl is not None and cfg.eval_steps and s.step % cfg.eval_steps == 0:
            last_eval = evaluate(s.model, s.eval_dl, accelerator, stage, s.recipe)
            _log(run, accelerator, progress, {"step": s.step, "eval_loss": round(last_eval, 6)})
        if cfg.save_steps and s.step % cfg.save_steps == 0 and s.step < s.total_steps:
            state = {
                "step": s.step,
                "tokens_seen": int(meter.items_total.item()),
                "total_steps": s.total_steps,
                "scheduler": s.scheduler.state_dict(),
            }
            run.save_checkpoint(accelerator, s.step, state, cfg.save_total_limit, **s.save_kwargs)
    progress.close()
    session = {
        "loop_seconds": round(time.perf_counter() - loop_start, 2),
        "real_tokens_this_session": meter.real_tokens,
        "steps_this_session": s.step - start_step,
        "tokens_seen": int(meter.items_total.item()),
    }
    return finish(s, session, last_eval)


def finish(s: Setup, session: dict[str, Any], last_eval: float | None) -> TrainResult:
    """A last evaluation (unless the last step had one), the adapter, the loss curve and run_info's summary;
    the run is 'finished' only after all of them."""
    accelerator, run, cfg = s.accelerator, s.run, s.recipe.train
    if s.eval_dl is not None and not (cfg.eval_steps and s.step % cfg.eval_steps == 0):
        last_eval = evaluate(s.model, s.eval_dl, accelerator, get_stage(cfg.stage), s.recipe)
        _log(run, accelerator, None, {"step": s.step, "eval_loss": round(last_eval, 6)})
    save_adapter(run, s.model, s.tokenizer, accelerator)
    if accelerator.is_main_process:
        rows = run.read_metrics()
        plot_loss(rows, run.loss_plot)
        info = run.read_info()
        losses = [r["loss"] for r in rows if "loss" in r]
        info.update(
            finished=True,
            steps=s.step,
            first_loss=losses[0] if losses else None,
            final_loss=losses[-1] if losses else None,
            eval_loss=last_eval,
            **session,
        )
        run.write_info(info)
        accelerator.print(
            f"done: adapter in {run.adapter_dir}; loss {info['first_loss']} → {info['final_loss']}"
            + (f"; eval loss {last_eval:.4f}" if last_eval is not None else "")
        )
    accelerator.end_training()
    return TrainResult(run, accelerator.unwrap_model(s.model))


def _log(run: RunDir, accelerator, progress, row: dict[str, Any]) -> None:
    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    if accelerator.is_main_process:
        run.append_metrics(row)
        if progress is not None:
            progress.set_postfix({k: v for k, v in row.items() if k in ("loss", "eval_loss")})


def save_adapter(run: RunDir, model, tokenizer, accelerator) -> None:
    """Adapter + tokenizer, loadable by plain peft; written to a temp dir and renamed."""
    # get_state_dict gathers the full weights under ZeRO-3; every process must call it.
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = run.root / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(
            tmp, state_dict=state_dict, safe_serialization=True, selected_adapters=["default"]
        )  # only the trained adapter (RL may hold the reward model's as a second one)
        tokenizer.save_pretrained(tmp)
        generation = getattr(accelerator.unwrap_model(model), "generation_config", None)
        if generation is not None:  # its stop ids; a reward model has none
            generation.save_pretrained(tmp)
        shutil.rmtree(run.adapter_dir, ignore_errors=True)
        os.replace(tmp, run.adapter_dir)
    accelerator.wait_for_everyone()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medtune train", description="Train a LoRA adapter from a recipe.")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="group.key=value, e.g. train.max_steps=10")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    # DeepSpeed's launcher appends --local_rank=N; the same number is in the LOCAL_RANK variable accelerate reads
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_intermixed_args(argv)  # overrides may come before or after --resume


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = parse_args(argv)

    def work() -> int:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.resume:
            recipe.train.resume = True
        train(recipe)
        return 0

    try:
        return run_command(work, args.debug)
    except Interrupted as exc:
        print(f"{exc}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
