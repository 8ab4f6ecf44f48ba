"""Rebuild a model released as delta weights: target = base + delta, tensor by tensor.

    medtune apply-delta --base LLAMA-13B --delta Ziya-LLaMA-13B-v1 --out DIR [--dtype fp16]

Ziya-LLaMA-13B-v1 is published as the difference to LLaMA-13B, with an extended Chinese
vocabulary: its embedding and LM-head deltas have more rows than the base, and the base is added to
the first rows only (the new rows are the delta itself). The tokenizer comes from the delta. Both
models are loaded whole (about 2 × 26 GB for 13B in fp16), safetensors or .bin through the weights-only
loader. The result is written like a merge output (safetensors, tokenizer, medtune_merge.json), and
read back to check it equals base + delta (max |Δ| printed; 0 when nothing was lost on the way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from medtune.console import quiet_libraries, run_command
from medtune.data.tokenizer import load_tokenizer, tokenizer_kind
from medtune.infer.merge import check_out, write_merged
from medtune.model.load import DTYPES, ModelError, check_model_path, load_weights


def add_base(target_state: dict[str, torch.Tensor], base_state: dict[str, torch.Tensor]) -> int:
    """In place: every delta tensor += its base tensor (extended rows: the first rows). Returns rows added.
    Every tensor of the base must have its delta: a delta of another shape of model (fewer layers, say) would
    otherwise make a smaller model without a word."""
    unmatched = [name for name in base_state if name not in target_state]
    if unmatched:
        raise ModelError(
            f"the delta has no tensor for {len(unmatched)} of the base's {len(base_state)} (first: {unmatched[0]}); "
            "is --delta the delta of this --base (same layers and sizes)?"
        )
    done: set[int] = set()  # tied weights appear under two names: add once
    extended = 0
    for name, delta in target_state.items():
        if delta.data_ptr() in done:
            continue
        done.add(delta.data_ptr())
        base = base_state.get(name)
        if base is None:
            raise ModelError(
                f"delta tensor {name}: the base has no such tensor; is --base the model the delta was made against?"
            )
        if delta.shape == base.shape:
            delta += base.to(delta.dtype)
        elif delta.dim() == 2 and delta.shape[1] == base.shape[1] and delta.shape[0] > base.shape[0]:
            delta[: base.shape[0]] += base.to(delta.dtype)  # an extended vocabulary: new rows stay as given
            extended = max(extended, delta.shape[0] - base.shape[0])
        else:
            raise ModelError(
                f"delta tensor {name}: shape {tuple(delta.shape)} does not fit the base's {tuple(base.shape)}"
            )
    return extended


def apply_delta(base: str, delta: str, out: Path, dtype: str = "fp16") -> dict:
    base = check_model_path(base, "--base")
    delta = check_model_path(delta, "--delta")
    check_out(out, [base, delta])
    tokenizer = load_tokenizer(delta)
    base_model = load_weights(AutoModelForCausalLM, base, dtype=DTYPES[dtype])
    model = load_weights(AutoModelForCausalLM, delta, dtype=DTYPES[dtype])
    base_state = base_model.state_dict()
    with torch.no_grad():
        extended = add_base(model.state_dict(), base_state)
    del base_model, base_state
    summary = {
        "source": {"dtype": dtype, "tokenizer_kind": tokenizer_kind(tokenizer)},
        "applied_delta": {"base": base, "delta": delta, "extended_rows": extended},
    }
    write_merged(out, model, tokenizer, summary, "5GB")
    reloaded = load_weights(AutoModelForCausalLM, str(out), dtype=DTYPES[dtype]).state_dict()
    expected = model.state_dict()
    summary["max_abs_diff_after_reload"] = max(
        (reloaded[k].float() - expected[k].float()).abs().max().item() for k in expected
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune apply-delta", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the model the delta was made against (e.g. LLaMA-13B)")
    parser.add_argument("--delta", required=True, help="the delta weights (e.g. IDEA-CCNL/Ziya-LLaMA-13B-v1)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    quiet_libraries()
    args = parser.parse_args(argv)

    def work() -> int:
        summary = apply_delta(args.base, args.delta, args.out, args.dtype)
        rows = summary["applied_delta"]["extended_rows"]
        print(f"{args.out}: base + delta written" + (f" ({rows} vocabulary rows beyond the base)" if rows else ""))
        print(f"check: max |reloaded - (base + delta)| = {summary['max_abs_diff_after_reload']:.2e}")
        return 0 if summary["max_abs_diff_after_reload"] == 0 else 1

    return run_command(work, args.debug)


if __name__ == "__main__":
    sys.exit(main())
