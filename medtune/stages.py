"""The closed table of training stages: what each reads, how it batches, what loss it sums.

A stage only swaps the rows and the loss on the one loop (medtune/train.py); this table is the
only place a stage name is looked at, so adding a stage is adding a row. Losses are *sums* over
the stage's items (target tokens, or preference pairs); the loop divides by the items of the whole
optimizer step (medtune/losses.py says why).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from medtune.console import MedtuneError
from medtune.data import chat_rows, pad_batch, pad_pairs, pad_prompts, pair_rows, prompt_rows, text_rows
from medtune.losses import (
    causal_lm_loss_sum,
    chunked_lm_loss_sum,
    count_target_tokens,
    dpo_loss_sum,
    reward_loss_sum,
    sequence_logps,
)
from medtune.model import eval_mode
from medtune.rollout import grpo_loss_sum, mean_stat, ppo_loss_sum, replies, reply_tokens, rloo_loss_sum

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
    import inspect

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


@contextmanager
def reference_model(model, accelerator) -> Iterator[None]:
    """The reference policy: the same network with the adapter switched off (no second model in memory),
    without gradients and in eval mode (no dropout), as TRL runs its reference model."""
    unwrapped = accelerator.unwrap_model(model)
    with eval_mode(unwrapped), torch.no_grad(), unwrapped.disable_adapter():
        yield


def dpo_loss(model, batch: Batch, accelerator, recipe) -> tuple[torch.Tensor, Stats]:
    dpo_beta = recipe.train.dpo_beta
    with reference_model(model, accelerator):
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
class Stage:
    name: str
    records: str  # the record kind it trains on: chat | text | preference (medtune/records.py)
    rows: Callable[..., list[dict]]  # (a chunk of records, data_cfg, tokenizer, report) → its rows
    collate: Callable[..., Batch]  # pad_batch or pad_pairs
    loss_sum: Callable[..., tuple[torch.Tensor, Stats]]  # (model, batch, accelerator, recipe) → sum, stats
    items: Callable[[Batch], torch.Tensor]  # what the loss is averaged over
    reward_head: bool = False  # a one-output score head instead of the LM head
    packs: bool = False  # data.packing applies
    blocks: bool = False  # rows are one stream cut into data.max_length blocks (continued pre-training)
    generates: bool = True  # predict/chat can use the result
    dropout: bool = True  # train.disable_dropout's default is its opposite: off for preference and RL stages
    rollout: bool = False  # micro-batches are prompts, turned into scored replies (medtune/rollout.py) first


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("pt", "text", text_rows, pad_batch, lm_loss, target_tokens, blocks=True),
        Stage("sft", "chat", chat_rows, pad_batch, lm_loss, target_tokens, packs=True),
        Stage(
            "rm",
            "preference",
            pair_rows,
            pad_pairs,
            reward_loss,
            pairs,
            reward_head=True,
            generates=False,
            dropout=False,
        ),
        Stage("dpo", "preference", pair_rows, pad_pairs, dpo_loss, pairs, dropout=False),
        Stage("ppo", "chat", prompt_rows, pad_prompts, ppo_loss_sum, reply_tokens, dropout=False, rollout=True),
        Stage("grpo", "chat", prompt_rows, pad_prompts, grpo_loss_sum, grpo_items, dropout=False, rollout=True),
        Stage("rloo", "chat", prompt_rows, pad_prompts, rloo_loss_sum, replies, dropout=False, rollout=True),
    )
}


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise MedtuneError(f"train.stage: unknown stage {name!r}; known: {', '.join(STAGES)}") from None
