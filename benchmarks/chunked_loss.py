"""Peak memory of one training step's loss: the full-vocabulary logits against medtune's chunked loss.

    python benchmarks/chunked_loss.py [--vocab 55296] [--tokens 2048] [--hidden 512]

A one-layer LLaMA-shaped model with a real-size vocabulary (Chinese-LLaMA-2's 55,296 rows by default),
one row of --tokens labelled tokens; each mode runs forward + backward in a fresh process and reports the
process's peak RSS above what the model and the batch already took (CPU; on a GPU the same shapes apply to
torch.cuda.max_memory_allocated). The figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_step(mode: str, vocab: int, tokens: int, hidden: int, chunk: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medtune.training.losses import causal_lm_loss_sum, chunked_lm_loss_sum

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=tokens,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, vocab, (1, tokens))
    before = peak_mb()
    if mode == "plain":
        loss = causal_lm_loss_sum(model(input_ids=ids, use_cache=False).logits, ids)
    else:
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        loss = chunked_lm_loss_sum(out.hidden_states[-1], model.get_output_embeddings(), ids, chunk)
    loss.backward()
    label = f"chunked ({chunk} positions a chunk)" if mode == "chunked" else "full logits"
    print(f"{label}: loss {loss.item() / (tokens - 1):.4f} per token, peak RSS +{peak_mb() - before:,.0f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=55_296)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=0, help="positions a chunk (default: medtune's LOSS_CHUNK)")
    parser.add_argument("--mode", choices=("plain", "chunked"))
    args = parser.parse_args()
    if not args.chunk:
        from medtune.training.objectives import LOSS_CHUNK

        args.chunk = LOSS_CHUNK
    if args.mode:
        one_step(args.mode, args.vocab, args.tokens, args.hidden, args.chunk)
        return 0
    logits_mb = args.vocab * args.tokens * 4 / 2**20
    print(f"vocabulary {args.vocab:,} × {args.tokens:,} tokens: {logits_mb:,.0f} MB of fp32 logits per row")
    for mode in ("plain", "chunked"):
        command = [sys.executable, __file__, "--mode", mode]
        command += ["--vocab", str(args.vocab), "--tokens", str(args.tokens), "--hidden", str(args.hidden)]
        command += ["--chunk", str(args.chunk)]
        subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
