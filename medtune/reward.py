"""`medtune reward RUN_OR_MERGED --data FILE --out scores.jsonl`: what a reward model says.

FILE holds preference records (prompt, chosen, rejected) — then each pair gets both scores, the margin
and whether the chosen reply wins, and the summary is accuracy, mean margin and a histogram — or chat
records ending with a reply, which get one score each. Records are encoded as the RM stage encoded
them (tokenize_pairs / the reply as the last turn, the run's template and system prompt) and the score
is read where training read it: the score head at each row's last non-pad token of a right-padded batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from medtune.console import MedtuneError, quiet_libraries, run_command
from medtune.data import padded
from medtune.model import DTYPES, quantization_config
from medtune.records import read_records, record_kind, write_jsonl_line
from medtune.rundir import describe_source
from medtune.stages import get_stage
from medtune.templates import IGNORE_INDEX, encode_conversations, get_template
from medtune.tokenizer import load_tokenizer


def load_reward_model(source: str, dtype: str, quantization=None):
    """The score model (base + adapters merged in memory), its tokenizer and its description. With
    ``quantization`` (a QuantizationConfig) a merged RM loads k-bit, as the policy's base does in RL."""
    from transformers import AutoModelForSequenceClassification

    from medtune.merge import load_with_adapters

    info = describe_source(source)
    if not get_stage(info.stage).reward_head:
        raise MedtuneError(f"{source}: a {info.stage} model, not a reward model (train one with train.stage: rm)")
    if info.template is None:
        raise MedtuneError(f"{source}: no chat template is recorded; score a run directory or a medtune-merged RM")
    tokenizer = load_tokenizer(info.tokenizer, info.tokenizer_kind, info.trust_remote_code)
    if quantization is not None and info.adapters:
        raise MedtuneError(f"{source}: a quantized reward model must be merged first (medtune merge {source} --out …)")
    extra = {"quantization_config": quantization_config(quantization)} if quantization is not None else {}
    model = load_with_adapters(
        AutoModelForSequenceClassification,
        info,
        dtype=DTYPES[dtype],
        num_labels=1,
        trust_remote_code=info.trust_remote_code,
        **extra,
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at each row's last non-pad token
    if quantization is None:
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    return model.eval(), tokenizer, info


def read_scoring_records(path: Path) -> tuple[str, list[dict[str, Any]]]:
    records = [record for _, record in read_records(path)]
    kinds = {record_kind(r) for r in records}
    if not records:
        raise MedtuneError(f"{path}: no records")
    if len(kinds) > 1 or kinds & {"text", "exam"}:
        raise MedtuneError(f"{path}: give preference records, or chat records ending with a reply (found {kinds})")
    kind = kinds.pop()
    if kind == "chat" and any(r["messages"][-1]["role"] != "assistant" for r in records):
        raise MedtuneError(f"{path}: every chat record must end with the assistant reply to score")
    return kind, records


@torch.no_grad()
def score_conversations(model, tokenizer, template_name: str, system_prompt, conversations, batch_size: int):
    """One score per conversation (its last turn being the reply), read as the RM stage reads it."""
    encoded = encode_conversations(tokenizer, get_template(template_name), conversations, system_prompt, "last_turn")
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    for i, (ids, labels) in enumerate(encoded):
        if len(ids) > context:
            raise MedtuneError(f"conversation {i}: {len(ids)} tokens, over the model's context of {context}")
        if all(label == IGNORE_INDEX for label in labels):
            raise MedtuneError(f"conversation {i}: the reply has no tokens")
    scores: list[float] = []
    for start in range(0, len(encoded), batch_size):
        chunk = [ids for ids, _ in encoded[start : start + batch_size]]
        ids, mask = padded(chunk, tokenizer.pad_token_id, device=model.device)
        scores += model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float().tolist()
    return scores


def histogram(values: list[float], bins: int = 10, width: int = 40) -> str:
    low, high = min(values), max(values)
    step = (high - low) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - low) / step), bins - 1)] += 1
    top = max(counts)
    return "\n".join(
        f"  [{low + i * step:8.3f}, {low + (i + 1) * step:8.3f}) {'#' * round(width * c / top):<{width}} {c}"
        for i, c in enumerate(counts)
    )


def score_file(
    source: str, data: Path, out: Path, batch_size: int = 8, dtype: str = "fp32", overwrite: bool = False
) -> dict[str, Any]:
    from medtune.predict import check_resumable, fingerprint

    kind, records = read_scoring_records(data)
    expected = fingerprint(source, data, {"task": "reward", "dtype": dtype})
    check_resumable(out, expected, overwrite)  # refuses a file medtune reward did not write
    model, tokenizer, info = load_reward_model(source, dtype)
    if kind == "preference":
        conversations = [
            r["messages"] + [{"role": "assistant", "content": r[side]}]
            for r in records
            for side in ("chosen", "rejected")
        ]
    else:
        conversations = [r["messages"] for r in records]
    scores = score_conversations(model, tokenizer, info.template, info.system_prompt, conversations, batch_size)
    if kind == "preference":
        rows = [
            {"id": r["id"], "chosen_score": c, "rejected_score": j, "margin": c - j, "correct": c > j}
            for r, c, j in zip(records, scores[0::2], scores[1::2], strict=True)
        ]
        summary = {
            "pairs": len(rows),
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "mean_margin": sum(r["margin"] for r in rows) / len(rows),
        }
    else:
        rows = [{"id": r["id"], "score": s} for r, s in zip(records, scores, strict=True)]
        summary = {"replies": len(rows), "mean_score": sum(scores) / len(scores)}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(write_jsonl_line(r) for r in rows), encoding="utf-8")
    tmp.replace(out)
    return {**summary, "histogram": histogram(scores)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune reward", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a reward-model run directory or its medtune-merged directory")
    parser.add_argument("--data", required=True, type=Path, help="preference records, or chat records with replies")
    parser.add_argument("--out", required=True, type=Path, help="scores, one JSON line per record")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even if made otherwise")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    quiet_libraries()
    args = parser.parse_args(argv)

    def work() -> int:
        summary = score_file(args.model, args.data, args.out, args.batch_size, args.dtype, args.overwrite)
        histogram_text = summary.pop("histogram")
        print(json.dumps(summary, ensure_ascii=False))
        print("scores:\n" + histogram_text)
        print(f"per-record scores: {args.out}")
        return 0

    return run_command(work, args.debug)


if __name__ == "__main__":
    sys.exit(main())
