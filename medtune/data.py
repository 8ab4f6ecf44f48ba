"""Instruction JSONL → token ids and labels → padded batches.

Reads records through medtune.records (the format shared with data_prep), so a
malformed line fails here with its file and line. The collator is a pure
function of a list of examples.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from medtune.records import RecordError, read_records
from medtune.templates import IGNORE_INDEX, ChatTemplate, encode_conversation

Example = dict[str, list[int]]


@dataclass
class TokenizeReport:
    """What happened to each record: kept, cut to max_length, or dropped (with why)."""

    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        return f"{self.kept} examples ({self.truncated} cut to max_length); dropped: {dropped}"


def load_chat_records(files: Sequence[str]) -> list[dict[str, Any]]:
    """All chat records of the files; anything else is an error naming file and line."""
    records = []
    for path in files:
        for lineno, record in read_records(path):
            messages = record.get("messages")
            if messages is None or "chosen" in record:
                raise RecordError(f"{path}:{lineno}: SFT needs chat records (messages ending with an assistant reply)")
            if messages[-1]["role"] != "assistant":
                raise RecordError(f"{path}:{lineno}: field 'messages': the last message must be the assistant's reply to train on it")
            records.append(record)
    if not records:
        raise RecordError(f"no records in {', '.join(files)}")
    return records


def split_eval(records: list[dict], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A deterministic held-out split (at least one record when ratio > 0)."""
    if ratio <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(records) * ratio))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def tokenize_chat(
    records: Sequence[dict], tokenizer, template: ChatTemplate, max_length: int,
    system_prompt: str | None = None, train_on: str = "all_turns",
) -> tuple[list[Example], TokenizeReport]:
    """Encode each conversation; cut at max_length, drop it if no trained token is left."""
    report = TokenizeReport()
    examples: list[Example] = []
    for record in records:
        ids, labels = encode_conversation(tokenizer, template, record["messages"], system_prompt, train_on)
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            report.truncated += 1
        if sum(label != IGNORE_INDEX for label in labels[1:]) == 0:
            report.dropped["with no answer token left within max_length"] += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
        report.kept += 1
    return examples, report


def pad_batch(examples: Sequence[Example], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch (not to max_length: padding is wasted compute)."""
    longest = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
