"""Batched generation with the training template, resumable, in the official PromptCBLUE format.

    medtune predict MODEL_OR_RUN_DIR --data FILE --out FILE [--batch-size 8 --max-new-tokens 256]

MODEL_OR_RUN_DIR is a run directory (base + adapter), a merged model directory, or a hub
id / model path (then give --template). FILE is instruction JSONL written by data_prep
(records ending with a user turn) or a raw PromptCBLUE file. For PromptCBLUE records the
output line is the official predictions format: the original sample with `target` set to
the generated text. Re-running skips ids already in --out; a crash loses at most the batch
in flight; at the end the file is rewritten in input order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from medtune.console import MedtuneError, quiet_libraries, run_command
from medtune.data.records import RecordError, iter_json_lines, validate_record
from medtune.infer.generation import (
    GenerationSettings,
    add_generation_arguments,
    generate_batch,
    generation_from_args,
    load_model_for_inference,
)
from medtune.infer.resumable import (
    answer_in_batches,
    check_resumable,
    fingerprint,
    prediction_id,
    read_done,
    rewrite_in_order,
)
from medtune.model.load import DTYPES


def load_prompts(path: Path, strip_answer_cue: bool = False) -> list[dict[str, Any]]:
    """Each input line → {id, messages (ending with the user turn), line (what to write back)}."""
    prompts = [_prompt_of(row, f"{path}:{lineno}", strip_answer_cue) for lineno, row in iter_json_lines(path)]
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise MedtuneError(f"{path}: duplicate ids; predictions could not be matched back to inputs")
    return prompts


def _prompt_of(row: Any, where: str, strip_answer_cue: bool) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise MedtuneError(f"{where}: expected a JSON object, got {json.dumps(row)[:40]}")
    if "messages" in row:  # instruction record
        try:
            validate_record(row)
        except RecordError as exc:
            raise MedtuneError(f"{where}: {exc}") from None
        messages = [m for m in row["messages"]]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # a training/dev record: predict its last reply
        meta = row.get("meta", {})
        if "sample_id" in meta and "task_dataset" in meta:  # converted PromptCBLUE: write the official format
            back = {
                "input": meta.get("input", messages[-1]["content"]),
                "target": "",
                "answer_choices": meta.get("answer_choices"),
                "task_type": meta.get("task_type"),
                "task_dataset": meta["task_dataset"],
                "sample_id": meta["sample_id"],
            }
        else:
            back = {"id": row["id"], "messages": messages, "prediction": ""}
        return {"id": row["id"], "messages": messages, "line": back}
    if "input" in row and "task_dataset" in row:  # raw PromptCBLUE
        if not isinstance(row.get("sample_id"), str) or not isinstance(row["input"], str):
            raise MedtuneError(f"{where}: a PromptCBLUE sample needs a sample_id and an input text")
        text = row["input"].replace("答：", "").strip() if strip_answer_cue else row["input"]
        return {"id": row["sample_id"], "messages": [{"role": "user", "content": text}], "line": dict(row)}
    raise MedtuneError(
        f"{where}: neither an instruction record (messages) nor a PromptCBLUE sample (input, task_dataset)"
    )


def write_prediction(line: dict, text: str, reasoning: str | None = None) -> dict:
    """The output line: the answer where the format wants it, and the reasoning apart when there is one."""
    out = dict(line)
    out["target" if "target" in out else "prediction"] = text
    if reasoning is not None:
        out["reasoning"] = reasoning
    return out


def predict(
    source: str,
    data: Path,
    out: Path,
    generation: GenerationSettings | None = None,
    dtype: str = "fp32",
    template: str | None = None,
    strip_answer_cue: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> int:
    """Generate for every prompt not yet in ``out``; returns how many were generated now."""
    generation = (generation or GenerationSettings()).check()
    prompts = load_prompts(data, strip_answer_cue)
    if not prompts:
        raise MedtuneError(f"{data}: no prompt in it")
    settings = {"template": template, "dtype": dtype, "strip_answer_cue": strip_answer_cue, **generation.recorded()}
    check_resumable(out, fingerprint(source, data, settings), overwrite)
    done = read_done(out)
    todo = [p for p in prompts if p["id"] not in done]
    if todo:
        loaded = load_model_for_inference(source, dtype, template)
        todo.sort(key=lambda p: sum(len(m["content"]) for m in p["messages"]))  # similar lengths pad less

        def answer(batch: list[dict]) -> list[dict]:
            texts = generate_batch(loaded, batch, generation)
            return [
                write_prediction(p["line"], *reversed(loaded.split(text)))
                for p, text in zip(batch, texts, strict=True)
            ]

        generation.seed_torch()
        rows = answer_in_batches(out, todo, len(prompts), generation.batch_size, answer, "sample", progress)
        done.update((prediction_id(row), row) for row in rows)
    rewrite_in_order(out, done, [p["id"] for p in prompts])  # the official format keeps test.json's order
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune predict", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="run directory, merged model directory, or hub id / model path")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    add_generation_arguments(parser, max_new_tokens=256)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--template", help="chat template, when the model does not record one")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start --out again instead of resuming it (needed when it was made otherwise)",
    )
    parser.add_argument(
        "--strip-answer-cue",
        action="store_true",
        help="raw PromptCBLUE input: remove '答：' as data_prep --strip-answer-cue did for training",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    quiet_libraries()
    args = parser.parse_args(argv)
    if args.data.resolve() == args.out.resolve():
        print("error: --out must not be the input file", file=sys.stderr)
        return 2

    def work() -> int:
        n = predict(
            args.model,
            args.data,
            args.out,
            generation_from_args(args),
            args.dtype,
            args.template,
            args.strip_answer_cue,
            overwrite=args.overwrite,
        )
        print(f"generated {n} predictions; {args.out} is complete")
        return 0

    return run_command(work, args.debug)


if __name__ == "__main__":
    sys.exit(main())
