"""The closed table of training stages: what each reads, how it batches, what loss it sums.

A stage only swaps the rows and the loss on the one loop (medtune/train.py); this table is the
only place a stage name is looked at, so adding a stage is adding a row. Losses are *sums* over
the stage's items (target tokens, or preference pairs); the loop divides by the items of the whole
optimizer step (medtune/losses.py says why).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from medtune.console import MedtuneError
from medtune.data import chat_rows, pad_batch, pad_pairs, pair_rows, text_rows
from medtune.losses import causal_lm_loss_sum, count_target_tokens, dpo_loss_sum, reward_loss_sum, sequence_logps

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


def lm_loss(model, batch: Batch, accelerator, dpo_beta: float) -> torch.Tensor:
    return causal_lm_loss_sum(forward_logits(model, batch), batch["labels"])


def reward_loss(model, batch: Batch, accelerator, dpo_beta: float) -> torch.Tensor:
    rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    return reward_loss_sum(rewards)


def dpo_loss(model, batch: Batch, accelerator, dpo_beta: float) -> torch.Tensor:
    # The reference policy is the same network with the adapter switched off: no second model in memory.
    with torch.no_grad(), accelerator.unwrap_model(model).disable_adapter():
        reference = sequence_logps(forward_logits(model, batch), batch["labels"])
    return dpo_loss_sum(sequence_logps(forward_logits(model, batch), batch["labels"]), reference, dpo_beta)


def target_tokens(batch: Batch) -> torch.Tensor:
    return count_target_tokens(batch["labels"])


def pairs(batch: Batch) -> torch.Tensor:
    """Rows are [chosen_1..chosen_n, rejected_1..rejected_n]: n pairs."""
    return torch.tensor(batch["input_ids"].shape[0] // 2, device=batch["input_ids"].device)


@dataclass(frozen=True)
class Stage:
    name: str
    records: str  # the record kind it trains on: chat | text | preference (medtune/records.py)
    rows: Callable[..., Iterator[list[dict]]]  # (records, data_cfg, tokenizer, report) → chunks of rows
    collate: Callable[..., Batch]  # pad_batch or pad_pairs
    loss_sum: Callable[..., torch.Tensor]  # (model, batch, accelerator, dpo_beta) → summed loss
    items: Callable[[Batch], torch.Tensor]  # what the loss is averaged over
    reward_head: bool = False  # a one-output score head instead of the LM head
    packs: bool = False  # data.packing applies
    generates: bool = True  # predict/chat can use the result


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("pt", "text", text_rows, pad_batch, lm_loss, target_tokens),
        Stage("sft", "chat", chat_rows, pad_batch, lm_loss, target_tokens, packs=True),
        Stage("rm", "preference", pair_rows, pad_pairs, reward_loss, pairs, reward_head=True, generates=False),
        Stage("dpo", "preference", pair_rows, pad_pairs, dpo_loss, pairs),
    )
}


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise MedtuneError(f"train.stage: unknown stage {name!r}; known: {', '.join(STAGES)}") from None
