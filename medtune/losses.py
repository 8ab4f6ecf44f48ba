"""One loss per stage. Each returns a *sum* over items, and the loop divides by the number of
items of the whole optimizer step (all micro-batches, all processes): target tokens for pt/sft,
preference pairs for rm/dpo. Averaging per-batch means instead would over-weight short batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medtune.templates import IGNORE_INDEX


def count_target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that carry loss: label positions after the shift, not masked."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the unmasked labels (computed in fp32)."""
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")


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
