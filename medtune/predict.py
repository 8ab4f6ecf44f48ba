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
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from medtune.console import MedtuneError, quiet_libraries, run_command
from medtune.data import padded
from medtune.jinja_templates import JinjaTemplate, render, split_reasoning, template_messages, template_source
from medtune.model import DTYPES
from medtune.records import RecordError, iter_json_lines, validate_record, write_jsonl_line
from medtune.rundir import ModelSource, describe_source
from medtune.stages import get_stage
from medtune.templates import Template, encode_conversation, get_template, stop_token_ids
from medtune.tokenizer import decode, load_tokenizer


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


def prediction_id(row: dict) -> str:
    return row.get("sample_id") or row["id"]


@dataclass
class InferenceModel:
    """A model ready to generate in its training format: the ids of a prompt are those training used."""

    model: Any
    tokenizer: Any
    template: Template
    system_prompt: str | None
    source: ModelSource

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_conversation(self.tokenizer, self.template, messages, self.system_prompt)[0]

    # Facts of the template, worked out once: split() runs for every reply and serve's stream for every delta.
    @cached_property
    def thinks(self) -> bool:
        """The template has a <think> block: replies are split into reasoning and answer."""
        return isinstance(self.template, JinjaTemplate) and "<think>" in template_source(self.tokenizer, self.template)

    @cached_property
    def prompt_opens_think(self) -> bool:
        """The generation prompt already writes <think> (DeepSeek-R1): replies start inside the block."""
        if not self.thinks:
            return False
        probe = template_messages([{"role": "user", "content": "?"}], self.system_prompt)
        return render(self.tokenizer, self.template, probe, add_generation_prompt=True).rstrip().endswith("<think>")

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning, answer) of a generated reply; (None, text) for a template without reasoning."""
        return split_reasoning(text, self.prompt_opens_think) if self.thinks else (None, text)

    @cached_property
    def stop_ids(self) -> list[int]:
        """EOS, the template's end markers, and the model's own generation_config eos ids."""
        return stop_token_ids(self.tokenizer, self.template, self.model.generation_config.eos_token_id)


def load_model_for_inference(
    source: str, dtype: str, template_name: str | None, trust_remote_code: bool = False
) -> InferenceModel:
    """A run dir, merged dir or hub id, with its template, system prompt and tokenizer; adapters merged in memory."""
    from transformers import AutoModelForCausalLM

    from medtune.merge import load_with_adapters

    info = describe_source(source)
    if not get_stage(info.stage).generates:
        raise MedtuneError(f"{source}: a reward model scores replies, it does not generate them")
    template_name = template_name or info.template
    if template_name is None:
        raise MedtuneError(f"{source}: no chat template is recorded for this model; pass --template")
    trust_remote_code = trust_remote_code or info.trust_remote_code
    tokenizer = load_tokenizer(info.tokenizer, info.tokenizer_kind, trust_remote_code)
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    model = load_with_adapters(AutoModelForCausalLM, info, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return InferenceModel(model.to(device).eval(), tokenizer, get_template(template_name), info.system_prompt, info)


@torch.no_grad()
def generate_batch(
    loaded: InferenceModel, batch: list[dict], max_new_tokens: int, do_sample: bool, temperature: float, top_p: float
) -> list[str]:
    """Left-padded batch generation from the training-format prompt ids; stops at the template's end."""
    model, tokenizer = loaded.model, loaded.tokenizer
    encoded = [loaded.prompt_ids(p["messages"]) for p in batch]
    pad = tokenizer.pad_token_id
    input_ids, attention = padded(encoded, pad, left=True, device=model.device)
    width = input_ids.shape[1]
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=pad,
        eos_token_id=loaded.stop_ids,
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    output = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
    return [decode(tokenizer, row[width:].tolist()).strip() for row in output]


def fingerprint(source: str, data: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """What the predictions in a file depend on: the model (its description and the identity of its
    weight files), the prompts' file and the generation settings. Predictions are only resumed under
    the same fingerprint."""
    import hashlib

    info = describe_source(source)
    weights = {}
    for place in (info.base, *info.adapters):
        path = Path(place)
        if path.is_dir():
            weights[str(path.resolve())] = sorted(
                (f.name, f.stat().st_size, f.stat().st_mtime_ns)
                for f in path.iterdir()
                if f.suffix in (".safetensors", ".bin")
            )
    found = {
        "model": {**info.to_json(), "weights": weights},
        "settings": settings,
        "data": {"path": str(data.resolve()), "sha256": hashlib.sha256(data.read_bytes()).hexdigest()},
    }
    return json.loads(json.dumps(found))  # as it reads back from the file (tuples become lists)


def fingerprint_file(out: Path) -> Path:
    return out.with_name(out.name + ".medtune.json")


def check_resumable(out: Path, expected: dict[str, Any], overwrite: bool) -> None:
    """Resume ``out`` only if this model, data and settings wrote it; --overwrite starts it again."""
    sidecar = fingerprint_file(out)
    if overwrite or not out.exists():
        out.unlink(missing_ok=True)
        sidecar.write_text(json.dumps(expected, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return
    if not sidecar.is_file():
        raise MedtuneError(
            f"--out {out}: exists, and no {sidecar.name} says medtune predict wrote it with these "
            "settings; pass --overwrite to replace it, or choose another --out"
        )
    saved = json.loads(sidecar.read_text(encoding="utf-8"))
    differ = [k for k in ("model", "data", "settings") if saved.get(k) != expected[k]]
    if differ:
        detail = ", ".join(
            f"{k}.{name}"
            for k in differ
            for name in sorted(set(saved.get(k, {})) | set(expected[k]))
            if saved.get(k, {}).get(name) != expected[k].get(name)
        )
        raise MedtuneError(
            f"--out {out}: its predictions were made otherwise ({detail} changed); "
            "pass --overwrite to start again, or choose another --out"
        )


def predict(
    source: str,
    data: Path,
    out: Path,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    dtype: str = "fp32",
    template: str | None = None,
    strip_answer_cue: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> int:
    """Generate for every prompt not yet in ``out``; returns how many were generated now."""
    if batch_size < 1 or max_new_tokens < 1:
        raise MedtuneError("--batch-size and --max-new-tokens must be at least 1")
    prompts = load_prompts(data, strip_answer_cue)
    if not prompts:
        raise MedtuneError(f"{data}: no prompt in it")
    settings = {
        "template": template,
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "dtype": dtype,
        "strip_answer_cue": strip_answer_cue,
        **({"temperature": temperature, "top_p": top_p} if do_sample else {}),
    }
    check_resumable(out, fingerprint(source, data, settings), overwrite)
    done = read_done(out)
    todo = [p for p in prompts if p["id"] not in done]
    if todo:
        loaded = load_model_for_inference(source, dtype, template)
        todo.sort(key=lambda p: sum(len(m["content"]) for m in p["messages"]))  # similar lengths pad less

        def answer(batch: list[dict]) -> list[dict]:
            texts = generate_batch(loaded, batch, max_new_tokens, do_sample, temperature, top_p)
            return [
                write_prediction(p["line"], *reversed(loaded.split(text)))
                for p, text in zip(batch, texts, strict=True)
            ]

        rows = answer_in_batches(out, todo, len(prompts), batch_size, answer, "sample", progress)
        done.update((prediction_id(row), row) for row in rows)
    rewrite_in_order(out, done, [p["id"] for p in prompts])  # the official format keeps test.json's order
    return len(todo)


def answer_in_batches(
    out: Path, todo: list, total: int, batch_size: int, answer, unit: str, progress: bool = True
) -> list[dict]:
    """Run ``answer(batch) -> rows`` over ``todo`` a batch at a time, each batch's rows appended to ``out``
    and synced before the next starts (the resumable loop of predict and eval); all new rows returned."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=total - len(todo), unit=unit, disable=not progress or not sys.stderr.isatty())
    written: list[dict] = []
    with out.open("a", encoding="utf-8") as handle:
        for start in range(0, len(todo), batch_size):
            rows = answer(todo[start : start + batch_size])
            append_rows(handle, rows)
            written += rows
            bar.update(len(rows))
    bar.close()
    return written


def append_rows(handle, rows: list[dict]) -> None:
    """Write and sync a batch of result rows: what is written survives a crash; only the batch in flight is lost."""
    handle.write("".join(write_jsonl_line(row) for row in rows))
    handle.flush()
    os.fsync(handle.fileno())


def rewrite_in_order(out: Path, done: dict[str, dict], ids: list[str]) -> None:
    """The finished file in input order, atomically (a resumed run appended in the order it ran)."""
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(write_jsonl_line(done[i]) for i in ids), encoding="utf-8")
    os.replace(tmp, out)


def read_done(out: Path) -> dict[str, dict]:
    """Predictions already written; a torn last line (killed mid-write) is dropped and redone."""
    done: dict[str, dict] = {}
    if not out.is_file():
        return done
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[prediction_id(row)] = row
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        out.write_text("".join(kept), encoding="utf-8")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune predict", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="run directory, merged model directory, or hub id / model path")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
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
            args.batch_size,
            args.max_new_tokens,
            args.do_sample,
            args.temperature,
            args.top_p,
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
