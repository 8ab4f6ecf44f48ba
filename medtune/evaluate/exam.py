"""`medtune eval exam`: medical exam benchmarks, scored as their publishers score them.

    medtune eval exam RUN_OR_MODEL --data exam.jsonl --out DIR [--mode loglik|generate] [--shots K]
    medtune eval exam --score PREDICTIONS.jsonl --data exam.jsonl --out DIR [--extractor first_option]

exam.jsonl comes from `python -m data_prep cmb|cmexam|medqa-mcmle|cmmlu|ceval`. Each question is the
user turn of the model's own chat template (few-shot examples as earlier turns).

- loglik: each candidate answer is scored as the model's reply: the sum of the log-probabilities of the
  reply tokens training would have put a loss on (the letters and the end of the reply). Single-choice
  candidates are the option letters; a multi-answer question's candidates are every non-empty set of
  letters ("AC"), because the end-of-reply token is what tells "A" from "AC", so the best-scoring set
  is the model's answer — no extraction, no luck.
- generate: greedy replies, read by each benchmark's official extraction (evaluate/extract.py), and
  by the strict rule beside it. --extractor first_capital|first_option reads the OpenCompass benchmarks
  (MedQA-MCMLE, CMMLU, C-Eval) with the other OpenCompass function; scores.json names, per benchmark,
  the function, the published config that uses it and the commit medtune reproduces.
- --score: the same extraction and aggregation on saved replies ({"id", "output"} lines, from medtune or
  any other system), so published outputs can be rescored on equal terms.

DIR/predictions.jsonl holds one row per question, DIR/scores.json the figures. A run resumes where it
stopped only when model, data and settings are unchanged (predict's fingerprint rule).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from medtune.console import MedtuneError, quiet_libraries, run_command
from medtune.data.exam_prompts import PROMPT_VERSION, conversation
from medtune.data.overlap import contamination_line
from medtune.data.records import RecordError, iter_json_lines, read_kind
from medtune.data.rows import padded
from medtune.data.templates import IGNORE_INDEX, encode_conversations
from medtune.evaluate.contamination import contamination_of
from medtune.evaluate.exam_scores import benchmark_scores
from medtune.evaluate.extract import EXTRACTORS, OFFICIAL, extraction_for, official_gold, strict_extract
from medtune.evaluate.outputs import check_covers, prepare_out_dir, read_outputs
from medtune.infer.generation import (
    GenerationSettings,
    InferenceModel,
    add_generation_arguments,
    generate_all,
    generation_from_args,
    load_model_for_inference,
)
from medtune.infer.resumable import answer_in_batches, check_resumable, fingerprint, read_done, rewrite_in_order
from medtune.model.load import DTYPES
from medtune.rundir import atomic_write_text

EXAM_HINT = "convert the benchmark first: python -m data_prep cmb|cmexam|medqa-mcmle|cmmlu|ceval FILE --out exam.jsonl"
EXAM_ONLY = {"question", "answer", "multi"}  # fields only an exam record has: with them, a record is one


def load_exams(path: Path) -> list[dict[str, Any]]:
    """Exam records of a data_prep file; anything else names its line."""
    refuse_missing_options(path)
    records = read_kind(path, "exam", EXAM_HINT)
    for record in records:
        if record["source"] not in OFFICIAL:
            known = ", ".join(OFFICIAL)
            raise MedtuneError(
                f"{path}: id {record['id']}: source {record['source']!r} has no scoring; known: {known}"
            )
    return records


def refuse_missing_options(path: Path) -> None:
    """A record is told an exam by its "options"; an exam record without them would be read as a chat record
    and refused for a missing 'messages'. Name the field it lacks instead."""
    for lineno, record in iter_json_lines(path):
        if isinstance(record, dict) and EXAM_ONLY & record.keys() and not {"options", "messages"} & record.keys():
            raise RecordError(
                f"{path}:{lineno}: field 'options': missing; an exam record needs an object of at least two "
                f'lettered options ({{"A": ..., "B": ...}}); {EXAM_HINT}'
            )


def pick_shots(records: list[dict], pool: list[dict], k: int) -> dict[str, list[dict]]:
    """For each question, the first k pool questions of its benchmark and category (else of its benchmark),
    never the question itself: deterministic, so a resumed run asks the same prompts."""
    if k == 0:
        return {r["id"]: [] for r in records}
    shots = {}
    for record in records:
        same = [p for p in pool if p["source"] == record["source"] and p["id"] != record["id"]]
        close = [p for p in same if p["category"][:1] == record["category"][:1]]
        chosen = (close + [p for p in same if p not in close])[:k]
        if len(chosen) < k:
            raise MedtuneError(f"--shots {k}: only {len(chosen)} other {record['source']} questions to draw from")
        shots[record["id"]] = chosen
    return shots


def candidates(record: dict) -> list[str]:
    letters = list(record["options"])
    if not record["multi"]:
        return letters
    return ["".join(c) for n in range(1, len(letters) + 1) for c in itertools.combinations(letters, n)]


def extracted_row(record: dict, output: str, extractor: str = "official") -> dict[str, Any]:
    """One generated (or rescored) reply, read by the benchmark's official rule (or --extractor's) and by the
    strict rule, and compared with the gold answer as the benchmark's own score compares it (CMB: the key's
    string as written).

    Strictly correct = officially correct *and* the reply is nothing but that answer, so the strict figure
    is the official one minus what lenient reading added (never more)."""
    extracted = extraction_for(record["source"], extractor).read(output, record)
    strict = strict_extract(output, record)
    gold = official_gold(record)
    correct = extracted == gold
    return {
        **_question_fields(record),
        **({"answer_as_written": gold} if gold != record["answer"] else {}),
        "output": output,
        "extracted": extracted,
        "strict": strict,
        "correct": correct,
        "strict_correct": correct and strict == record["answer"],
    }


def _question_fields(record: dict) -> dict[str, Any]:
    return {k: record[k] for k in ("id", "source", "category", "answer", "multi")}


# ----------------------------------------------------------------------------- with a model


def reply_logprobs(loaded: InferenceModel, conversations: list[list[dict]], batch_size: int) -> list[float]:
    """Sum of log p over the reply tokens training puts a loss on, one figure per conversation."""
    encoded = encode_conversations(
        loaded.tokenizer, loaded.template, conversations, loaded.system_prompt, train_on="last_turn"
    )
    pad = loaded.tokenizer.pad_token_id
    pad = pad if pad is not None else loaded.tokenizer.eos_token_id
    scores: list[float] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, mask = padded([i for i, _ in chunk], pad, device=loaded.model.device)
        labels, _ = padded([lab for _, lab in chunk], IGNORE_INDEX, device=ids.device)
        with torch.no_grad():
            logits = loaded.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        targets = labels[:, 1:]
        scored = targets != IGNORE_INDEX  # only the reply's positions go through the vocabulary softmax
        logprobs = torch.log_softmax(logits[scored].float(), dim=-1).gather(-1, targets[scored][:, None])[:, 0]
        rows = scored.nonzero()[:, 0]
        sums = torch.zeros(len(chunk), device=ids.device).index_add_(0, rows, logprobs)
        scores.extend(sums.tolist())
    return scores


def loglik_rows(
    loaded: InferenceModel, records: list[dict], shots: dict[str, list[dict]], batch_size: int
) -> list[dict]:
    convs, owners = [], []
    for record in records:
        asked = conversation(record, shots[record["id"]])
        for candidate in candidates(record):
            convs.append(asked + [{"role": "assistant", "content": candidate}])
            owners.append((record["id"], candidate))
    logprobs: dict[str, dict[str, float]] = {r["id"]: {} for r in records}
    for (rid, candidate), score in zip(owners, reply_logprobs(loaded, convs, batch_size), strict=True):
        logprobs[rid][candidate] = score
    rows = []
    for record in records:
        scores = logprobs[record["id"]]
        chosen = max(scores, key=scores.__getitem__)  # ties: the first candidate, as argmax does
        rows.append(
            {**_question_fields(record), "chosen": chosen, "correct": chosen == record["answer"], "logprobs": scores}
        )
    return rows


def generate_rows(
    loaded: InferenceModel,
    records: list[dict],
    shots: dict[str, list[dict]],
    generation: GenerationSettings,
    extractor: str = "official",
) -> list[dict]:
    prompts = [{"messages": conversation(r, shots[r["id"]])} for r in records]
    outputs = generate_all(loaded, prompts, generation)
    # the answer is read from the reply after its reasoning (a <think> block), as the benchmark reads a reply
    return [extracted_row(r, loaded.split(o)[1], extractor) for r, o in zip(records, outputs, strict=True)]


def evaluate(
    model: str,
    data: Path,
    out_dir: Path,
    mode: str = "loglik",
    shots: int = 0,
    shots_from: Path | None = None,
    generation: GenerationSettings | None = None,
    dtype: str = "fp32",
    template: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    extractor: str = "official",
    train_files: list[Path] | None = None,
) -> dict[str, Any]:
    """Answer every question not yet in DIR/predictions.jsonl, then score them all (greedy replies in
    generate mode: a benchmark's answer is the model's most likely one). The extractor only reads the
    replies, so it is no part of the fingerprint: another --extractor rescores a finished run."""
    generation = (generation or GenerationSettings(max_new_tokens=64)).check()
    if generation.do_sample:
        raise MedtuneError("eval exam generates greedily (a benchmark's answer is the most likely one)")
    if shots < 0:
        raise MedtuneError("--shots must be at least 0")
    records = load_exams(data)
    found = contamination_of(model, train_files, records, data.stem)  # questions the training data holds
    pool = load_exams(shots_from) if shots_from else records
    chosen_shots = pick_shots(records, pool, shots)
    settings = {
        "task": "exam",
        "mode": mode,
        "shots": shots,
        "shots_from": _file_sha(shots_from) if shots_from else None,
        "prompt_version": PROMPT_VERSION,
        "template": template,
        "dtype": dtype,
        **({"max_new_tokens": generation.max_new_tokens} if mode == "generate" else {}),
    }
    expected = fingerprint(model, data, settings)  # a model that is not there fails before DIR is made
    out = prepare_out_dir(out_dir)
    check_resumable(out, expected, overwrite)
    done = read_done(out)
    todo = [r for r in records if r["id"] not in done]
    if todo:
        loaded = load_model_for_inference(model, dtype, template)

        def answer(batch: list[dict]) -> list[dict]:
            if mode == "loglik":
                return loglik_rows(loaded, batch, chosen_shots, generation.batch_size)
            return generate_rows(loaded, batch, chosen_shots, generation, extractor)

        rows = answer_in_batches(out, todo, len(records), generation.batch_size, answer, "question", progress)
        done.update((row["id"], row) for row in rows)
    settings = {**settings, "model": model, "data": str(data.resolve()), "answered_now": len(todo)}
    return finish(out_dir, records, done, settings, extractor if mode == "generate" else None, found)


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finish(
    out_dir: Path,
    records: list[dict],
    done: dict[str, dict],
    settings: dict,
    extractor: str | None,
    contamination: dict | None = None,
) -> dict[str, Any]:
    """Rows in question order, scores per benchmark, both written atomically. Replies are read again (a run
    resumed with another --extractor, or rows an earlier medtune read), so every row follows one rule."""
    if extractor is not None:
        done = {r["id"]: extracted_row(r, done[r["id"]]["output"], extractor) for r in records}
    rewrite_in_order(out_dir / "predictions.jsonl", done, [r["id"] for r in records])
    rows = [done[r["id"]] for r in records]
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    benchmarks = {source: benchmark_scores(source, group) for source, group in by_source.items()}
    if extractor is not None:
        for source, figures in benchmarks.items():
            figures["extraction"] = extraction_for(source, extractor).describe()
    scores = {
        "settings": {**settings, **({"extractor": extractor} if extractor else {})},
        "extraction": {s: extraction_for(s, extractor).line() for s in by_source} if extractor else "none (loglik)",
        "benchmarks": benchmarks,
        **({"contamination": contamination} if contamination else {}),
    }
    atomic_write_text(out_dir / "scores.json", json.dumps(scores, ensure_ascii=False, indent=2) + "\n")
    return scores


# ----------------------------------------------------------------------------- rescoring saved outputs


def rescore(
    predictions: Path, data: Path, out_dir: Path, overwrite: bool = False, extractor: str = "official"
) -> dict[str, Any]:
    """Score saved replies; every question needs exactly one reply (a score on part of a test is not its score)."""
    records = load_exams(data)
    outputs = read_outputs(predictions)
    check_covers(outputs, [r["id"] for r in records], "--score", predictions, data)
    out = prepare_out_dir(out_dir)
    expected = {
        "model": {"rescored": str(predictions.resolve()), "sha256": _file_sha(predictions)},
        "data": {"path": str(data.resolve()), "sha256": _file_sha(data)},
        "settings": {"task": "exam", "mode": "rescore"},
    }
    check_resumable(out, expected, overwrite)
    done = {r["id"]: extracted_row(r, outputs[r["id"]], extractor) for r in records}
    return finish(
        out_dir,
        records,
        done,
        {"mode": "rescore", "predictions": str(predictions), "data": str(data.resolve())},
        extractor,
    )


def summary(scores: dict[str, Any]) -> str:
    lines = []
    for source, s in scores["benchmarks"].items():
        line = f"{source}: {s['questions']} questions, accuracy {s['accuracy']:.4f}"
        if source == "cmb":
            line += f" (medtune_average {s['medtune_average']:.4f}: medtune's mean of the categories, not CMB's)"
        if "strict_accuracy" in s:
            line += f", strict {s['strict_accuracy']:.4f}, no answer found {s['no_answer']}"
            line += f", empty replies {s['empty_replies']}"
        if "f1" in s:
            line += f", weighted F1 {s['f1']:.4f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune eval exam", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="run directory, merged model directory, or hub id / model path")
    parser.add_argument("--data", required=True, type=Path, help="exam questions from python -m data_prep")
    parser.add_argument("--out", required=True, type=Path, help="directory for predictions.jsonl and scores.json")
    parser.add_argument("--mode", choices=("loglik", "generate"), default="loglik")
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples, as earlier turns of the chat")
    parser.add_argument("--shots-from", type=Path, help="questions to draw shots from (default: --data itself)")
    add_generation_arguments(parser, max_new_tokens=64, sampling=False)  # --max-new-tokens: generate mode
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--template", help="chat template, when the model does not record one")
    parser.add_argument("--score", type=Path, metavar="PREDICTIONS", help="rescore saved {id, output} lines")
    parser.add_argument(
        "--extractor",
        choices=EXTRACTORS,
        default="official",
        help="how MedQA-MCMLE, CMMLU and C-Eval replies are read: each one's published OpenCompass config "
        "(official), or OpenCompass's first_capital_postprocess or first_option_postprocess for all three; "
        "CMB and CMExam keep their own rule",
    )
    parser.add_argument("--overwrite", action="store_true", help="start --out again instead of resuming it")
    parser.add_argument(
        "--train-files", nargs="+", type=Path, metavar="JSONL", help="count questions these hold (default: the run's)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    quiet_libraries()
    args = parser.parse_args(argv)
    if (args.model is None) == (args.score is None):
        parser.error("give a model to evaluate, or --score PREDICTIONS to rescore saved outputs (not both)")
    if args.extractor != "official" and args.model is not None and args.mode == "loglik":
        parser.error("--extractor reads generated replies: use it with --mode generate or --score")

    def work() -> int:
        if args.score:
            scores = rescore(args.score, args.data, args.out, args.overwrite, args.extractor)
        else:
            scores = evaluate(
                args.model,
                args.data,
                args.out,
                args.mode,
                args.shots,
                args.shots_from,
                generation_from_args(args),
                args.dtype,
                args.template,
                args.overwrite,
                extractor=args.extractor,
                train_files=args.train_files,
            )
        settings = scores["settings"]
        if "answered_now" in settings:  # a resumed or repeated run says what it reused
            total = sum(s["questions"] for s in scores["benchmarks"].values())
            print(f"answered {settings['answered_now']} questions now, {total - settings['answered_now']} earlier")
        print(summary(scores))
        if "contamination" in scores:
            print(contamination_line(scores["contamination"]))
        print(f"per-question rows: {args.out / 'predictions.jsonl'}; scores: {args.out / 'scores.json'}")
        return 0

    return run_command(work, args.debug)
