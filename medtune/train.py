"""Train a LoRA adapter from a recipe: recipe → Accelerator → data → model → loop → run dir.

    accelerate launch medtune/train.py recipes/demo.yaml [group.key=value ...] [--resume]

One explicit loop for every stage. accelerate owns devices, DDP, DeepSpeed,
mixed precision and checkpoint state; peft owns the adapter; this file only
decides what happens in which order.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator, skip_first_batches
from tqdm.auto import tqdm

from medtune.console import quiet_libraries, run_command
from medtune.model.load import check_model_path, resolve_dtype
from medtune.model.tiny import TINY_NAME
from medtune.processes import die_with_parent, started_by_a_launcher
from medtune.recipe import Recipe, check_data_files, load_recipe
from medtune.rundir import RunDir, RunLock, plan_start, plot_loss, restore
from medtune.training.accelerator import build_accelerator, launch_variables_restored
from medtune.training.rollout import rollout
from medtune.training.setup import Setup, check_tracker, setup, write_run_start


def micro_batches(dataloader, start: int) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of micro-batches over epochs, starting after ``start`` of them."""
    epoch, skip = divmod(start, len(dataloader))
    while True:
        dataloader.set_epoch(epoch)
        yield from (skip_first_batches(dataloader, skip) if skip else dataloader)
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def evaluate(s: Setup) -> float:
    """Mean loss per item (target token, or pair) over the whole eval set, all processes together."""
    model, accelerator, objective = s.model, s.accelerator, s.objective
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    for batch in s.eval_dl:
        loss = objective.loss_sum(model, batch, accelerator, s.recipe)[0].detach().float()
        total += torch.stack([loss, objective.items(batch).float()])
    total = accelerator.reduce(total, "sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


@dataclass
class TrainResult:
    run: RunDir
    model: Any = None  # the trained PeftModel (unwrapped); None when the run had already finished


def train(recipe: Recipe) -> TrainResult:
    """Run (or resume) training to the end; the run directory holds everything it produced. The launch
    variables set for DeepSpeed are put back afterwards: a second train() in this process starts clean."""
    with launch_variables_restored():
        return _train(recipe)


def _train(recipe: Recipe) -> TrainResult:
    check_data_files(recipe)
    if recipe.model.base != TINY_NAME:
        check_model_path(recipe.model.base, "model.base")  # before anything is loaded or written
    check_tracker(recipe)
    dtype = resolve_dtype(recipe.model.dtype)
    accelerator = build_accelerator(recipe, dtype)
    run = RunDir(recipe.output.dir)
    mode, checkpoints = plan_start(run, recipe)  # every process decides before anyone writes
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
            state = restore(accelerator, s.scheduler, checkpoints, deepspeed=bool(s.save_kwargs))
            s.step, s.tokens_seen = state["step"], state["tokens_seen"]
            accelerator.print(f"resuming {run.root} from {state['checkpoint']} (step {s.step} of {s.total_steps})")
        elif mode == "restart":
            logged = max((r["step"] for r in run.read_metrics()), default=0)
            partial = run.remove_partial_checkpoints() if accelerator.is_main_process else []
            removed = f" (removed the partial {', '.join(partial)})" if partial else ""
            accelerator.print(
                f"{run.root}: no complete checkpoint (the run had logged step {logged}){removed}; "
                "starting again from step 0"
            )
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
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def optimizer_step(s: Setup, window: list[dict[str, torch.Tensor]], meter: Meter, last: bool = True) -> None:
    """One optimizer step over an accumulation window of micro-batches; the schedule and the item count move
    on the ``last`` pass over a window (PPO makes several)."""
    cfg, accelerator, model, objective = s.recipe.train, s.accelerator, s.model, s.objective
    # Normalise by the items (target tokens, or pairs) of the whole optimizer step, over all
    # micro-batches and all processes: every item weighs the same, however the batches split them.
    local_items = sum(objective.items(b) for b in window)
    step_items = accelerator.reduce(local_items.to(accelerator.device).float(), "sum").clamp(min=1)
    for batch in window:
        with accelerator.accumulate(model):
            loss_sum, stats = objective.loss_sum(model, batch, accelerator, s.recipe)
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
    cfg, accelerator, run, stage = s.recipe.train, s.accelerator, s.run, s.stage
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
            window = [rollout(s.rollout, batch, s.step, i) for i, batch in enumerate(window)]
        epochs = s.recipe.rl.ppo_epochs if stage.reuses_rollouts else 1  # PPO learns from each rollout several times
        for epoch in range(epochs):
            optimizer_step(s, window, meter, last=epoch == epochs - 1)
        s.step += 1
        progress.update(1)
        if s.step == 1 or s.step % cfg.logging_steps == 0 or s.step == s.total_steps:  # first and last always
            epoch = s.step * accumulation / len(s.train_dl)
            row = meter.line(accelerator, s.step, s.scheduler.get_last_lr()[0], epoch)
            if stage.rollout:
                row["peak_memory_mb"] = peak_memory_mb(accelerator.device)
            _log(run, accelerator, progress, row)
        if s.eval_dl is not None and cfg.eval_steps and s.step % cfg.eval_steps == 0:
            last_eval = evaluate(s)
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
        last_eval = evaluate(s)
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


def _log(run: RunDir, accelerator: Accelerator, progress: tqdm | None, row: dict[str, Any]) -> None:
    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    if accelerator.is_main_process:
        run.append_metrics(row)
        if progress is not None:
            progress.set_postfix({k: v for k, v in row.items() if k in ("loss", "eval_loss")})


def save_adapter(run: RunDir, model: torch.nn.Module, tokenizer, accelerator: Accelerator) -> None:
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
    if started_by_a_launcher():  # a SIGKILLed `accelerate launch` takes its training process with it
        die_with_parent(os.getppid())
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
