"""Synthetic Chinese medical samples with realistic length mixes, shared by the benchmark scripts."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [
    "患者",
    "头痛",
    "发热",
    "咳嗽",
    "三天",
    "医生",
    "建议",
    "检查",
    "血常规",
    "胸片",
    "治疗",
    "药物",
    "布洛芬",
    "休息",
    "饮食",
    "清淡",
    "症状",
    "加重",
    "就医",
    "高血压",
    "糖尿病",
    "胃痛",
    "腹泻",
    "复查",
    "注意",
    "病因",
    "诊断",
    "感染",
    "炎症",
    "儿童",
    "老人",
    "孕妇",
    "过敏",
    "皮疹",
    "失眠",
    "心慌",
    "头晕",
    "乏力",
    "，",
    "。",
    "？",
]


def text(rng: random.Random, chars: int) -> str:
    out = ""
    while len(out) < chars:
        out += rng.choice(WORDS)
    return out[:chars]


def promptcblue_like(n: int, seed: int = 0) -> list[dict]:
    """70% short classification prompts, 20% extraction, 10% long dialogues, as in PromptCBLUE."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        r = rng.random()
        if r < 0.7:
            q, a = text(rng, rng.randint(60, 160)), text(rng, rng.randint(2, 8))
        elif r < 0.9:
            q, a = text(rng, rng.randint(200, 400)), text(rng, rng.randint(30, 80))
        else:
            q, a = text(rng, rng.randint(700, 1400)), text(rng, rng.randint(100, 250))
        records.append(
            {
                "id": f"syn-{i}",
                "source": "synthetic",
                "meta": {},
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            }
        )
    return records


def chatmed_like(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "id": f"syn-{i}",
            "source": "synthetic",
            "meta": {},
            "messages": [
                {"role": "user", "content": text(rng, rng.randint(20, 120))},
                {"role": "assistant", "content": text(rng, rng.randint(80, 300))},
            ],
        }
        for i in range(n)
    ]


def write_jsonl(records: list[dict], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_chatmed_raw(path: Path, n: int, seed: int = 0) -> Path:
    """N rows in ChatMed_Consult's own format ({query: "<s>问：\\n…\\n答：\\n", response}), streamed to disk, with
    the length mix of the real sample in ../shared/data (450 rows: query text median 39 characters, 95th
    percentile 109; response median 136, 95th percentile 323), drawn log-normal."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(n):
            query = text(rng, max(4, round(rng.lognormvariate(3.66, 0.625))))
            response = text(rng, max(8, round(rng.lognormvariate(4.91, 0.526))))
            row = {"query": f"<s>问：\n{query}\n答：\n", "response": response}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
