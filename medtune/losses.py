"""One loss function per stage. Each returns a *sum* and a count, so the loop can
normalise by the number of target tokens of the whole optimizer step (all
micro-batches, all processes) instead of averaging per-batch means, which would
over-weight the tokens of short batches."""

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
