"""What each stage's optimizer step computes: its loss sum and the items that sum is averaged over.

The stage's facts (what it trains on, which head, whether it rolls out) are the table in medtune/stages.py;
this is the other half of its row, kept with the losses it names. Losses are *sums* over the stage's items
(target tokens, preference pairs, replies); the loop divides by the items of the whole optimizer step
(medtune/training/losses.py says why).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from medtune.console import MedtuneError
from medtune.model.load import reference_model
from medtune.stages import Stage
from medtune.training.losses import (
    causal_lm_loss_sum,
    chunked_lm_loss_sum,
    count_target_tokens,
    dpo_loss_sum,
    reward_loss_sum,
    sequence_logps,
)
from medtune.training.rollout import grpo_loss_sum, mean_stat, ppo_loss_sum, replies, reply_tokens, rloo_loss_sum

Batch = dict[str, torch.Tensor]


def forward_logits(model, batch: Batch) -> torch.Tensor:
    """Padded rows carry an attention mask; packed rows carry restarting position ids instead, from
    which transformers builds the per-sample (block-diagonal) causal mask. No KV cache in training."""
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    ).logits


Stats = dict[str, torch.Tensor]  # name → [sum, count]: the loop adds them up and logs sum / count


def lm_loss(model, batch: Batch, accelerator, recipe) -> tuple[torch.Tensor, Stats]:
    if not chunked_loss(recipe, accelerator.unwrap_model(model)):
        return causal_lm_loss_sum(forward_logits(model, batch), batch["labels"]), {}
    # Through the model's own forward (so DDP and ZeRO-3 see it), keeping the logits of one position only.
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    head = accelerator.unwrap_model(model).get_output_embeddings()
    return chunked_lm_loss_sum(out.hidden_states[-1], head, batch["labels"], LOSS_CHUNK), {}


LOSS_CHUNK = 256  # labelled positions a chunk: 56 MB of fp32 logits at 55,296 rows (155 MB at Qwen's 151,646)
CHUNKED_LOSS_FROM = 1 << 26  # vocabulary × max_length from which the loss is chunked: 256 MB of fp32 logits a row


def chunked_loss(recipe, model) -> bool:
    """train.chunked_loss, or when unset: on when one row's fp32 logits would pass 256 MB (e.g.
    Chinese-LLaMA-2's 55,296 × 2,048; Qwen's 151,646 × 1,024)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    supported = "logits_to_keep" in inspect.signature(base.forward).parameters  # remote-code models may lack it
    if recipe.train.chunked_loss is not None:
        if recipe.train.chunked_loss and not supported:
            raise MedtuneError(f"train.chunked_loss: {type(base).__name__} takes no logits_to_keep; set it to false")
        return recipe.train.chunked_loss
    return supported and model.config.vocab_size * recipe.data.max_length >= CHUNKED_LOSS_FROM


def preference_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> Stats:
    """The figures people read for RM and DPO (TRL's names): mean rewards of each side, how often the
    chosen one wins, by how much."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    n = chosen.numel()
    return {
        "rewards/chosen": mean_stat(chosen.sum(), n),
        "rewards/rejected": mean_stat(rejected.sum(), n),
        "rewards/accuracy": mean_stat((chosen > rejected).float().sum(), n),
        "rewards/margin": mean_stat((chosen - rejected).sum(), n),
    }


def reward_loss(model, batch: Batch, accelerator, recipe) -> tuple[torch.Tensor, Stats]:
    rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    n = rewards.shape[0] // 2
    return reward_loss_sum(rewards), preference_stats(rewards[:n], rewards[n:])


def dpo_loss(model, batch: Batch, accelerator, recipe) -> tuple[torch.Tensor, Stats]:
    dpo_beta = recipe.train.dpo_beta
    with reference_model(accelerator.unwrap_model(model)):
        reference = sequence_logps(forward_logits(model, batch), batch["labels"])
    policy = sequence_logps(forward_logits(model, batch), batch["labels"])
    n = policy.shape[0] // 2
    implicit = dpo_beta * (policy - reference)  # DPO's implicit rewards
    return dpo_loss_sum(policy, reference, dpo_beta), preference_stats(implicit[:n], implicit[n:])


def target_tokens(batch: Batch) -> torch.Tensor:
    return count_target_tokens(batch["labels"])


def pairs(batch: Batch) -> torch.Tensor:
    """Rows are [chosen_1..chosen_n, rejected_1..rejected_n]: n pairs."""
    return torch.tensor(batch["input_ids"].shape[0] // 2, device=batch["input_ids"].device)


def grpo_items(batch: Batch) -> torch.Tensor:
    """dapo: every reply token of the step weighs the same; grpo: every reply does."""
    return reply_tokens(batch) if batch["token_level"] else replies(batch)


@dataclass(frozen=True)
class Objective:
    """What a stage's optimizer step minimises: a loss *sum* and the items it is averaged over."""

    loss_sum: Callable[..., tuple[torch.Tensor, Stats]]  # (model, batch, accelerator, recipe) → sum, stats
    items: Callable[[Batch], torch.Tensor]  # target tokens, pairs, replies or reply tokens


# One row per stage of medtune/stages.py, under the same name (a test holds the two tables to each other).
OBJECTIVES: dict[str, Objective] = {
    "pt": Objective(lm_loss, target_tokens),
    "sft": Objective(lm_loss, target_tokens),
    "rm": Objective(reward_loss, pairs),
    "dpo": Objective(dpo_loss, pairs),
    "ppo": Objective(ppo_loss_sum, reply_tokens),
    "grpo": Objective(grpo_loss_sum, grpo_items),
    "rloo": Objective(rloo_loss_sum, replies),
}


def objective(stage: Stage) -> Objective:
    return OBJECTIVES[stage.name]
