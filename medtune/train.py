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
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from medtune import __version__
from medtune.data import LengthGroupedSampler, load_datasets, pad_batch, pad_pairs, row_lengths
from medtune.losses import causal_lm_loss_sum, count_target_tokens, dpo_loss_sum, reward_loss_sum, sequence_logps
from medtune.model import ModelError, check_model_path, attach_lora, count_parameters, load_base_model, resolve_base, resolve_dtype
from medtune.recipe import Recipe, RecipeError, check_data_files, load_recipe
from medtune.records import RecordError
from medtune.rundir import RunDir, TRAINER_STATE, plot_loss
from medtune.tiny_model import TINY_NAME
from medtune.templates import get_template, jinja_chat_template
from medtune.tokenizer import TokenizerError, load_tokenizer, tokenizer_kind


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
        deepspeed = DeepSpeedPlugin(
            hf_ds_config=train.deepspeed, gradient_accumulation_steps=train.gradient_accumulation_steps,
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
            num_steps=train.gradient_accumulation_steps, sync_with_dataloader=False,
        ),
        # A seeded sampler makes each epoch's order a function of (seed, epoch): a resumed run replays it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        deepspeed_plugin=deepspeed,
        log_with="wandb" if train.report_to == "wandb" else None,
        project_dir=recipe.output.dir,
    )


def prepare_run_dir(run: RunDir, recipe: Recipe, accelerator) -> tuple[str, Path | None]:
    """Decide between a fresh start, a resume, and 'already done'; never silently overwrite a run."""
    if recipe.train.resume:
        if run.is_finished():
            return "finished", None
        checkpoint = run.latest_checkpoint()
        if checkpoint is not None:
            return "resume", checkpoint
    elif run.has_training_state():
        raise RecipeError(
            f"{run.root}: a run already exists there. Continue it with --resume (train.resume=true), "
            f"or start over with another output.dir=... or after deleting the directory."
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(run.checkpoints_dir, ignore_errors=True)
        run.metrics_file.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return "fresh", None


def build_model(recipe: Recipe, base: str, dtype: str, tokenizer, accelerator):
    quantized = recipe.model.quantization is not None
    device_map = {"": accelerator.local_process_index} if quantized and torch.cuda.is_available() else None
    reward_head = recipe.train.stage == "rm"
    model = load_base_model(base, recipe.model, dtype, device_map=device_map, reward_head=reward_head)
    if reward_head:
        model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at each row's last non-pad token
    rows = model.get_input_embeddings().num_embeddings  # not weight.shape: ZeRO-3 partitions the weight at load
    if len(tokenizer) > rows:  # an extended vocabulary (e.g. Chinese-LLaMA's tokenizer on LLaMA weights)
        if not {"embed_tokens", "lm_head"} <= set(recipe.lora.modules_to_save):
            raise RecipeError(
                f"lora.modules_to_save: the tokenizer has {len(tokenizer)} tokens but the model's embeddings only "
                f"{rows} rows; add [embed_tokens, lm_head] so the new rows are trained and saved with the adapter")
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        accelerator.print(f"embeddings resized from {rows} to {model.get_input_embeddings().num_embeddings} rows")
    model = attach_lora(model, recipe.lora, recipe.train.gradient_checkpointing, quantized, reward_head)
    trainable, total = count_parameters(model)
    accelerator.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return model


def make_train_loader(train_set, recipe: Recipe, num_processes: int, collate) -> DataLoader:
    """Length-grouped batches by default (least padding without packing); shuffled rows otherwise."""
    cfg = recipe.train
    # Its own generator: an iterator without one draws from the global RNG, so a resumed run
    # (which opens one more iterator) would shift the dropout masks of every later step.
    loader_rng = torch.Generator().manual_seed(cfg.seed)
    if recipe.data.group_by_length and not recipe.data.packing:
        # Grouped over the global batch: accelerate deals consecutive batches to the processes.
        sampler = LengthGroupedSampler(row_lengths(train_set), cfg.per_device_batch_size * num_processes, cfg.seed)
        return DataLoader(train_set, batch_size=cfg.per_device_batch_size, sampler=sampler, collate_fn=collate,
                          generator=loader_rng)
    return DataLoader(train_set, batch_size=cfg.per_device_batch_size, shuffle=True, collate_fn=collate,
                      generator=loader_rng)


def keep_only_trainable():
    """Checkpoints hold only what training changes (the adapter), not a copy of the frozen base."""
    def hook(models, weights, output_dir):
        for m, state in zip(models, weights):
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


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Padded rows carry an attention mask; packed rows carry restarting position ids instead, from
    which transformers builds the per-sample (block-diagonal) causal mask. No KV cache in training."""
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 position_ids=batch.get("position_ids"), use_cache=False).logits


def count_items(batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
    """What a stage's loss is averaged over: target tokens (pt, sft) or preference pairs (rm, dpo)."""
    if stage in ("rm", "dpo"):
        return torch.tensor(batch["input_ids"].shape[0] // 2, device=batch["input_ids"].device)
    return count_target_tokens(batch["labels"])


def stage_loss_sum(model, batch: dict[str, torch.Tensor], stage: str, accelerator, dpo_beta: float) -> torch.Tensor:
    """The one place where stages differ in the loop: the summed loss of a micro-batch."""
    if stage == "rm":
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        return reward_loss_sum(rewards)
    if stage == "dpo":
        # The reference policy is the same network with the adapter switched off: no second model in memory.
        with torch.no_grad(), accelerator.unwrap_model(model).disable_adapter():
            reference = sequence_logps(forward_logits(model, batch), batch["labels"])
        return dpo_loss_sum(sequence_logps(forward_logits(model, batch), batch["labels"]), reference, dpo_beta)
    return causal_lm_loss_sum(forward_logits(model, batch), batch["labels"])


@torch.no_grad()
def evaluate(model, dataloader, accelerator, stage: str = "sft", dpo_beta: float = 0.1) -> float:
    """Mean loss per item (target token, or pair) over the whole eval set, all processes together."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    for batch in dataloader:
        total += torch.stack([stage_loss_sum(model, batch, stage, accelerator, dpo_beta).detach().float(),
                              count_items(batch, stage).float()])
    total = accelerator.reduce(total, "sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


@dataclass
class TrainResult:
    run: RunDir
    model: Any = None  # the trained PeftModel (unwrapped); None when the run had already finished


def train(recipe: Recipe) -> TrainResult:
    """Run (or resume) training to the end; the run directory holds everything it produced."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    cfg = recipe.train
    check_data_files(recipe)
    if recipe.model.base != TINY_NAME:
        check_model_path(recipe.model.base, "model.base")  # before anything is loaded or written
    dtype = resolve_dtype(recipe.model.dtype)
    accelerator = build_accelerator(recipe, dtype)
    run = RunDir(recipe.output.dir)
    mode, checkpoint = prepare_run_dir(run, recipe, accelerator)
    if mode == "finished":
        accelerator.print(f"{run.root}: this run already finished; its adapter is in {run.adapter_dir}")
        return TrainResult(run)

    # -- data and model -------------------------------------------------------
    with accelerator.main_process_first():  # the tiny base is built once, by the main process
        base = resolve_base(recipe.model, recipe.data.train_files)
    tokenizer = load_tokenizer(base, recipe.model.tokenizer, recipe.model.trust_remote_code)
    tokenizer.chat_template = jinja_chat_template(get_template(recipe.data.template), recipe.data.system_prompt)
    with accelerator.main_process_first():  # the main process tokenizes (or finds the cache); the others load it
        train_set, eval_set = load_datasets(recipe.data, cfg.seed, tokenizer, cfg.stage, accelerator.is_main_process,
                                            log=accelerator.print)
    set_seed(cfg.seed)  # right before anything random: the adapter's init, then dropout and shuffling
    model = build_model(recipe, base, dtype, tokenizer, accelerator)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
        fused=torch.cuda.is_available() and not cfg.deepspeed,  # one kernel for all parameters on a GPU
    )
    collate = partial(pad_pairs if cfg.stage in ("rm", "dpo") else pad_batch, pad_id=tokenizer.pad_token_id,
                      pad_to_multiple_of=recipe.data.pad_to_multiple_of or None)
    train_dl = make_train_loader(train_set, recipe, accelerator.num_processes, collate)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    eval_dl = None
    if len(eval_set):
        eval_dl = accelerator.prepare(DataLoader(eval_set, batch_size=cfg.per_device_batch_size, collate_fn=collate))

    accumulation = cfg.gradient_accumulation_steps
    if cfg.max_steps > 0:
        total_steps = cfg.max_steps
    else:
        total_steps = max(1, math.floor(cfg.num_epochs * len(train_dl)) // accumulation)
    # Not passed through accelerator.prepare: that would step it once per process per step.
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(keep_only_trainable())
    is_deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    save_kwargs = {"exclude_frozen_parameters": True} if is_deepspeed else {}

    step, tokens_seen = 0, 0
    if mode == "resume":
        # Checkpoints hold only the trainable weights, so the frozen base is "missing" on purpose.
        accelerator.load_state(str(checkpoint), **({"load_module_strict": False} if is_deepspeed else {"strict": False}))
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        step, tokens_seen = state["step"], state["tokens_seen"]
        accelerator.print(f"resuming {run.root} from {checkpoint.name} (step {step} of {total_steps})")
    if accelerator.is_main_process:
        run.root.mkdir(parents=True, exist_ok=True)
        run.recipe_file.write_text(recipe.to_yaml(), encoding="utf-8")
        if mode == "resume":
            run.truncate_metrics(step)
        run.write_info({
            "medtune_version": __version__, "base_model": base, "base_model_name": recipe.model.base,
            "template": recipe.data.template, "system_prompt": recipe.data.system_prompt,
            "tokenizer_kind": tokenizer_kind(tokenizer), "stage": cfg.stage, "world_size": accelerator.num_processes,
            "dtype": dtype, "total_steps": total_steps, "finished": False,
        })
    if cfg.report_to == "wandb":
        accelerator.init_trackers("medtune", config=recipe.to_dict(), init_kwargs={"wandb": {"name": run.root.name}})

    # -- the loop ---------------------------------------------------------------
    from tqdm.auto import tqdm

    model.train()
    loop_start, start_step, real_tokens = time.perf_counter(), step, 0
    stream = micro_batches(train_dl, step * accumulation)
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    # this process's (loss sum, real tokens, processed tokens) since the last log line
    window_loss = torch.zeros(3, device=accelerator.device)
    # all processes' target tokens since the last log line / in the run: tensors, read only when
    # logging or saving, so no optimizer step waits on the device
    window_tokens = torch.zeros((), device=accelerator.device)
    tokens_total = torch.tensor(float(tokens_seen), device=accelerator.device)
    last_log = time.perf_counter()
    last_eval = None
    while step < total_steps:
        window = [next(stream) for _ in range(accumulation)]
        # Normalise by the items (target tokens, or pairs) of the whole optimizer step, over all
        # micro-batches and all processes: every item weighs the same, however the batches split them.
        local_tokens = sum(count_items(b, cfg.stage) for b in window)
        step_tokens = accelerator.reduce(local_tokens.to(accelerator.device).float(), "sum").clamp(min=1)
        for batch in window:
            with accelerator.accumulate(model):
                loss_sum = stage_loss_sum(model, batch, cfg.stage, accelerator, cfg.dpo_beta)
                # backward() divides by the accumulation steps and DDP averages over processes:
                # multiply both back so the gradient is exactly d(sum of token losses)/d(w) / step_tokens.
                accelerator.backward(loss_sum * (accumulation * accelerator.num_processes) / step_tokens)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            window_loss += torch.stack([loss_sum.detach().float(), batch["real_tokens"].float(),
                                        torch.tensor(float(batch["input_ids"].numel()), device=accelerator.device)])
        scheduler.step()
        step += 1
        tokens_total += step_tokens
        window_tokens += step_tokens
        progress.update(1)

        if step % cfg.logging_steps == 0 or step == total_steps:
            loss_total, real, processed = accelerator.reduce(window_loss, "sum").tolist()
            real_tokens += int(real)
            now = time.perf_counter()
            row = {"step": step, "loss": round(loss_total / max(window_tokens.item(), 1.0), 6),
                   "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(real / (now - last_log), 1),
                   "padding_efficiency": round(real / max(processed, 1.0), 4),
                   "epoch": round(step * accumulation / len(train_dl), 4)}
            last_log = now
            window_loss.zero_()
            window_tokens.zero_()
            _log(run, accelerator, progress, row)
        if eval_dl is not None and cfg.eval_steps and step % cfg.eval_steps == 0:
            last_eval = evaluate(model, eval_dl, accelerator, cfg.stage, cfg.dpo_beta)
            _log(run, accelerator, progress, {"step": step, "eval_loss": round(last_eval, 6)})
        if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
            state = {"step": step, "tokens_seen": int(tokens_total.item()), "total_steps": total_steps}
            run.save_checkpoint(accelerator, step, state, cfg.save_total_limit, **save_kwargs)
    progress.close()
    loop_seconds = time.perf_counter() - loop_start
    tokens_seen = int(tokens_total.item())

    if eval_dl is not None and not (cfg.eval_steps and step % cfg.eval_steps == 0):
        last_eval = evaluate(model, eval_dl, accelerator, cfg.stage, cfg.dpo_beta)
        _log(run, accelerator, None, {"step": step, "eval_loss": round(last_eval, 6)})
    save_adapter(run, model, tokenizer, accelerator)
    if accelerator.is_main_process:
        rows = run.read_metrics()
        plot_loss(rows, run.loss_plot)
        info = run.read_info()
        losses = [r["loss"] for r in rows if "loss" in r]
        info.update(finished=True, steps=step, tokens_seen=tokens_seen, loop_seconds=round(loop_seconds, 2),
                    real_tokens_this_session=real_tokens,
                    steps_this_session=step - start_step, first_loss=losses[0] if losses else None,
                    final_loss=losses[-1] if losses else None, eval_loss=last_eval)
        run.write_info(info)
        accelerator.print(f"done: adapter in {run.adapter_dir}; loss {info['first_loss']} → {info['final_loss']}"
                          + (f"; eval loss {last_eval:.4f}" if last_eval is not None else ""))
    accelerator.end_training()
    return TrainResult(run, accelerator.unwrap_model(model))


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
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(run.adapter_dir, ignore_errors=True)
        os.replace(tmp, run.adapter_dir)
    accelerator.wait_for_everyone()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medtune train", description="Train a LoRA adapter from a recipe.")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="group.key=value, e.g. train.max_steps=10")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.resume:
            recipe.train.resume = True
        train(recipe)
    except (RecipeError, RecordError, ModelError, TokenizerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
