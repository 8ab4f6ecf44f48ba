"""The Accelerator a recipe asks for, and the DeepSpeed launch environment it needs without a launcher.

accelerate owns devices, DDP, DeepSpeed and mixed precision; this module only translates the recipe's train
group into its plugins, and sets (then puts back) the variables `accelerate launch --use_deepspeed` would set.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DeepSpeedPlugin
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

from medtune.recipe import Recipe

LAUNCH_VARIABLES = ("ACCELERATE_USE_DEEPSPEED", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def launch_variables_restored() -> Iterator[None]:
    """The launch variables set for DeepSpeed are put back afterwards: a second train() in this process starts
    clean."""
    before = {key: os.environ.get(key) for key in LAUNCH_VARIABLES}
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def deepspeed_plugin(recipe: Recipe) -> DeepSpeedPlugin | None:
    """train.deepspeed's config as accelerate's plugin, with the environment a launcher would have set."""
    train = recipe.train
    if not train.deepspeed:
        return None
    # What `accelerate launch --use_deepspeed` sets: without it, processes started by torchrun
    # on a machine without CUDA never join DeepSpeed's process group.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    if "WORLD_SIZE" not in os.environ:
        # Started without a launcher (python/medtune train): DeepSpeed still needs a process group,
        # so this process is rank 0 of 1 (what a launcher with --num_processes 1 would set).
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    return DeepSpeedPlugin(
        hf_ds_config=train.deepspeed,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        gradient_clipping=train.max_grad_norm or None,
    )


def build_accelerator(recipe: Recipe, dtype: str) -> Accelerator:
    # accelerate keeps process-wide singletons; a second train() in the same process (a notebook,
    # the tests) may ask for another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    train = recipe.train
    launched_with_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"  # accelerate launch --use_deepspeed
    deepspeed = deepspeed_plugin(recipe)
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
        # Windows are always exactly N micro-batches (see medtune/train.py's micro_batches), so syncing
        # on the step count alone is right, also across epoch boundaries.
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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
