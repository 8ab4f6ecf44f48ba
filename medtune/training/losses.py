"""One loss per stage. Each returns a *sum* over items, and the loop divides by the number of
items of the whole optimizer step (all micro-batches, all processes): target tokens for pt/sft,
preference pairs for rm/dpo. Averaging per-batch means instead would over-weight short batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from medtune.data.templates import IGNORE_INDEX


def count_target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that carry loss: label positions after the shift, not masked."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the unmasked labels (computed in fp32)."""
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss_sum(hidden: torch.Tensor, lm_head, labels: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """:func:`causal_lm_loss_sum` from the final hidden states, without the full-vocabulary logits: only the
    labelled positions go through the LM head, ``chunk_size`` of them at a time, and each chunk's logits
    are recomputed in backward (activation checkpointing) instead of kept. Peak memory is one chunk's fp32
    logits (chunk_size × vocabulary × 4 bytes) instead of the whole batch's, twice over."""
    states = hidden[:, :-1].reshape(-1, hidden.size(-1))
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    states, targets = states[keep], targets[keep]

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lm_head(h).float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        part = slice(start, start + chunk_size)
        total = total + checkpoint(chunk_loss, states[part], targets[part], use_reentrant=False)
    return total


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the summed log-probability of its labelled tokens (a reply's likelihood)."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    logps = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    picked = torch.gather(logps, 2, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_loss_sum(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023) summed over pairs; rows are [chosen..., rejected...]."""
    n = policy.shape[0] // 2
    margin = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
    return -F.logsigmoid(beta * margin).sum()


def reward_loss_sum(rewards: torch.Tensor) -> torch.Tensor:
    """Pairwise (Bradley–Terry) reward-model loss summed over pairs; rows are [chosen..., rejected...]."""
    n = rewards.shape[0] // 2
    return -F.logsigmoid(rewards[:n].float() - rewards[n:].float()).sum()
