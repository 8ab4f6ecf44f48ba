"""The closed table of training stages, as facts: what each trains on and how the rest of medtune treats it.

This is the only place a stage's name is looked at. Everything else asks the stage's row for a fact
(``get_stage(name).reward_head``), so a module on any floor can ask without importing the training code:
this file imports nothing of medtune but the error type. What each stage *computes* lives with the code
that computes it, keyed by the same names: its rows and collator in medtune/data/rows.py
(``ROW_KINDS``, by ``rows``), its loss in medtune/training/objectives.py (``OBJECTIVES``). A test holds
those tables to this one, so adding a stage (say KTO) is one row here, one loss there, and its test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medtune.console import MedtuneError


@dataclass(frozen=True)
class Stage:
    name: str
    records: Literal["text", "chat", "preference"]  # the record kind it trains on (medtune/data/records.py)
    rows: Literal["text", "chat", "pairs", "prompts"]  # how records become rows and rows a batch (data/rows.py)
    reward_head: bool = False  # a one-output score head instead of the LM head
    value_head: bool = False  # a value head beside the LM head, trained too (PPO's critic)
    packs: bool = False  # data.packing applies
    blocks: bool = False  # rows are one stream cut into data.max_length blocks (continued pre-training)
    generates: bool = True  # predict/chat can use the result
    dropout: bool = True  # train.disable_dropout's default is its opposite: off for preference and RL stages
    refines: str | None = None  # the stage whose merged model it starts from (a base that is not one is warned about)
    rollout: bool = False  # micro-batches are prompts, turned into scored replies (training/rollout.py) first
    advantages: Literal["gae", "group", "leave_one_out", None] = None  # how a rollout's rewards become advantages
    min_generations: int = 1  # rl.num_generations at least this: group baselines compare replies to one prompt
    reuses_rollouts: bool = False  # rl.ppo_epochs optimisation passes over each rollout instead of one


# What every online RL stage shares: prompts rolled out, refining the SFT model, no dropout against the reference.
ONLINE = {"dropout": False, "refines": "sft", "rollout": True}

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("pt", "text", "text", blocks=True),
        Stage("sft", "chat", "chat", packs=True),
        Stage("rm", "preference", "pairs", reward_head=True, generates=False, dropout=False),
        Stage("dpo", "preference", "pairs", dropout=False, refines="sft"),
        Stage("ppo", "chat", "prompts", **ONLINE, value_head=True, advantages="gae", reuses_rollouts=True),
        Stage("grpo", "chat", "prompts", **ONLINE, advantages="group", min_generations=2),
        Stage("rloo", "chat", "prompts", **ONLINE, advantages="leave_one_out", min_generations=2),
    )
}

STAGE_NAMES: tuple[str, ...] = tuple(STAGES)  # recipe.py's train.stage accepts exactly these


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise MedtuneError(f"train.stage: unknown stage {name!r}; known: {', '.join(STAGES)}") from None
