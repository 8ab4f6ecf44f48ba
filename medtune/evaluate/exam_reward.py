"""Exam answers as a verifiable reward (`rl.reward_function: medtune.evaluate.exam_reward:exam_answer`), as
HuatuoGPT-o1 and the 2025 medical-R1 work train with a verifier on exam questions.

GRPO, RLOO or PPO on exam records (data_prep cmb|cmexam|medqa-mcmle training splits): each rollout reply is read
exactly as `medtune eval exam --score` reads it — the benchmark's official extraction, compared as its own score
compares (CMB: its key as written) — after any reasoning block (the answer is what follows </think>). The rule
gets the question's record as its third argument (medtune/training/rewards.py passes it to a rule that takes one).

- ``exam_answer``: 1 if officially correct, else 0;
- ``exam_answer_strict``: 1 only if the reply is also nothing but the answer (the strict reading);
- ``exam_answer_formatted``: the official one, plus 0.1 for a reply in the strict form — a format bonus that
  gives a small model a gradient before it finds the right letter.
"""

from __future__ import annotations

from typing import Any

from medtune.console import MedtuneError
from medtune.data.jinja_templates import split_reasoning
from medtune.evaluate.exam import extracted_row

FORMAT_BONUS = 0.1


def graded(reply: str, exam: dict[str, Any] | None) -> dict[str, Any]:
    """The reply read as eval exam reads it (its answer after any <think> block)."""
    if exam is None:
        raise MedtuneError(
            "exam_answer scores exam questions: train on exam records (python -m data_prep cmb|cmexam|medqa-mcmle)"
        )
    return extracted_row(exam, split_reasoning(reply)[1])


def exam_answer(messages: list[dict], reply: str, exam: dict[str, Any] | None) -> float:
    return 1.0 if graded(reply, exam)["correct"] else 0.0


def exam_answer_strict(messages: list[dict], reply: str, exam: dict[str, Any] | None) -> float:
    return 1.0 if graded(reply, exam)["strict_correct"] else 0.0


def exam_answer_formatted(messages: list[dict], reply: str, exam: dict[str, Any] | None) -> float:
    row = graded(reply, exam)
    return float(row["correct"]) + (FORMAT_BONUS if row["strict"] else 0.0)
