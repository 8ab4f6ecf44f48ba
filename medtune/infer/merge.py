"""Merge LoRA adapters into an unquantized base and save a plain transformers model.

    medtune merge RUN_DIR_OR_ADAPTER [--base MODEL] [--adapter MORE ...] --out DIR [--dtype fp16]

Adapters are applied in order (e.g. a Chinese-LLaMA-Alpaca LoRA onto LLaMA-7B, then a
ChatMed LoRA), each merged before the next. The base is always loaded unquantized:
merging into 4/8-bit weights would round the update away (and peft refuses or warns),
which is why an adapter trained with QLoRA is merged into the fp16/bf16/fp32 base.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from medtune.console import MedtuneError, quiet_libraries, run_command
from medtune.data.templates import chat_template_text, encode_conversation, get_template, stop_token_ids
from medtune.data.tokenizer import load_tokenizer, tokenizer_kind
from medtune.model.adapters import apply_adapter, refuse_quantized
from medtune.model.load import DTYPES, base_config_summary, check_model_path, load_weights
from medtune.rundir import MERGE_INFO, ModelSource, RunDir, describe_source, read_json
from medtune.stages import get_stage

PARITY_PROMPTS = ["头痛发烧两天了，需要去医院吗？", "高血压患者饮食要注意什么？", "孩子咳嗽有痰怎么办？"]


def parity_prompts(tokenizer, source: ModelSource) -> list[list[int]]:
    if source.template is None:
        return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PARITY_PROMPTS]
    template = get_template(source.template)
    return [
        encode_conversation(tokenizer, template, [{"role": "user", "content": p}], source.system_prompt)[0]
        for p in PARITY_PROMPTS
    ]


def merge(
    source: str,
    out: Path,
    extra_adapters: list[str],
    base: str | None = None,
    dtype: str | None = None,
    shard_size: str = "5GB",
    trust_remote_code: bool = False,
) -> dict:
    """Merge and save; returns what was done, including the parity check's max logit gap."""
    info = describe_source(source, check_model_path(base, "--base") if base else None)
    reward_model = get_stage(info.stage).reward_head  # a reward model keeps its score head, not an LM head
    adapters = list(info.adapters) + list(extra_adapters)
    if not adapters:
        raise MedtuneError(f"{source}: no adapter to merge (give a run directory, an adapter directory, or --adapter)")
    refuse_quantized(info.base)
    check_out(out, [source, info.base, *adapters])
    if base:
        check_same_base(source, info.base)
    dtype = dtype or info.dtype or "fp32"  # by default, the precision the run trained in
    inputs = merge_inputs(info.base, adapters, dtype)
    earlier = read_json(out / MERGE_INFO) if (out / MERGE_INFO).is_file() else {}
    if earlier.get("inputs") == inputs:
        return {**earlier, "up_to_date": True}
    model, tokenizer, gap = merged_in_memory(info, adapters, dtype, trust_remote_code or info.trust_remote_code)
    if info.template:
        tokenizer.chat_template = chat_template_text(tokenizer, get_template(info.template), info.system_prompt)
    if not reward_model:
        model_stops = model.generation_config.eos_token_id  # the base's own (Llama 3: <|eot_id|>, <|end_of_text|>)
        model.generation_config.eos_token_id = (
            stop_token_ids(tokenizer, get_template(info.template), model_stops)
            if info.template
            else model_stops or tokenizer.eos_token_id
        )
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    merged = dataclasses.replace(
        info, base="", adapters=(), tokenizer="", dtype=dtype, tokenizer_kind=tokenizer_kind(tokenizer)
    )
    summary = {
        "inputs": inputs,
        "source": merged.to_json(),
        "merged_from": {"base": info.base, "adapters": adapters},
        "parity_max_abs_logit_diff": gap,
    }
    write_merged(out, model, tokenizer, summary, shard_size)
    return summary


def merged_in_memory(info: ModelSource, adapters: list[str], dtype: str, trust_remote_code: bool):
    """The unquantized base with ``adapters`` merged in, in order, its tokenizer, and the largest logit gap
    between each peft model and its merged result on a few training-format prompts (what merge and export
    both check before they write anything)."""
    reward_model = get_stage(info.stage).reward_head  # a reward model keeps its score head, not an LM head
    tokenizer = load_tokenizer(info.tokenizer, info.tokenizer_kind, trust_remote_code)
    auto = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
    model = load_weights(
        auto,
        info.base,
        dtype=DTYPES[dtype],
        trust_remote_code=trust_remote_code,
        **({"num_labels": 1} if reward_model else {}),
    ).eval()
    if reward_model:
        model.config.pad_token_id = tokenizer.pad_token_id
    prompts = parity_prompts(tokenizer, info)
    gap = 0.0
    with torch.no_grad():
        for adapter in adapters:
            peft_model = apply_adapter(model, adapter)
            reference = [peft_model(input_ids=torch.tensor([ids])).logits.float() for ids in prompts]
            model = peft_model.merge_and_unload()
            for ids, expected in zip(prompts, reference, strict=True):
                gap = max(gap, (model(input_ids=torch.tensor([ids])).logits.float() - expected).abs().max().item())
    return model, tokenizer, gap


def merge_inputs(base: str, adapters: list[str], dtype: str) -> dict:
    """What a merge output is a function of: the base, each adapter's weights (hashed: small files) and
    the dtype. The same inputs again leave an earlier output as it is (predictions made from it stay valid)."""
    hashes = []
    for adapter in adapters:
        weights = Path(adapter) / "adapter_model.safetensors"
        digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
        hashes.append([str(Path(adapter).resolve()), digest])
    return {"base": base, "adapters": hashes, "dtype": dtype}


def check_same_base(source: str, base: str) -> None:
    """A --base must have the shape and vocabulary of the base the run trained on: peft would merge an
    adapter into another model of the same layer sizes without a word."""
    info_file = RunDir(source).info_file
    if not info_file.is_file():
        return
    trained = read_json(info_file).get("base_config")
    if not trained:
        return
    given = base_config_summary(base)
    differ = [f"{k} {trained[k]} → {given.get(k)}" for k in trained if given.get(k) != trained[k]]
    if differ:
        raise MedtuneError(f"--base {base}: not the base this run trained on ({', '.join(differ)})")


def check_out(out: Path, inputs: list[str]) -> None:
    """--out may be new, empty, or an earlier merge output (it has medtune_merge.json); never a folder
    medtune did not write, and never one of the inputs or a folder holding them."""
    target = out.resolve()
    for item in inputs:
        path = Path(item)
        if path.exists() and (path.resolve() == target or target in path.resolve().parents):
            raise MedtuneError(f"--out {out}: that is (or holds) the input {item}; merging there would destroy it")
    if out.exists() and not out.is_dir():
        raise MedtuneError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MERGE_INFO).is_file():
        raise MedtuneError(
            f"--out {out}: a non-empty directory that is not an earlier merge output "
            f"(no {MERGE_INFO}); medtune replaces only what it wrote. Choose a new directory"
        )


def write_merged(out: Path, model, tokenizer, summary: dict, shard_size: str) -> None:
    """Save into a temp dir beside ``out``, then rename; an earlier merge output is replaced only once the
    new one is complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=shard_size)
        tokenizer.save_pretrained(tmp)
        (tmp / MERGE_INFO).write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune merge", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run directory, or adapter directory")
    parser.add_argument("--base", help="base model (default: the one the run or adapter names)")
    parser.add_argument("--adapter", action="append", default=[], help="another adapter to apply after, in order")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="dtype to load, merge and save in (default: the run's training dtype, else fp32)",
    )
    parser.add_argument("--shard-size", default="5GB")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    quiet_libraries()
    args = parser.parse_args(argv)

    def work() -> int:
        summary = merge(
            args.source, args.out, args.adapter, args.base, args.dtype, args.shard_size, args.trust_remote_code
        )
        merged_from = summary["merged_from"]
        if summary.get("up_to_date"):
            print(f"{args.out} is up to date: merged earlier from the same base, adapters and dtype")
            return 0
        print(f"merged {len(merged_from['adapters'])} adapter(s) into {merged_from['base']} → {args.out}")
        gap = summary["parity_max_abs_logit_diff"]
        print(f"parity check: max |logits(merged) - logits(base + adapter)| = {gap:.2e}")
        return 0

    return run_command(work, args.debug)


if __name__ == "__main__":
    sys.exit(main())
