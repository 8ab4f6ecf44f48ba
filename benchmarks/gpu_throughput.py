"""Training throughput and peak memory of a random-weight LLaMA-7B-shaped model: LoRA bf16 vs 4-bit QLoRA.

    python benchmarks/gpu_throughput.py                       # 7B shape, seq 2048, both modes, on CUDA
    python benchmarks/gpu_throughput.py --mode qlora --steps 20
    python benchmarks/gpu_throughput.py --hidden 256 --layers 4 --seq 256 --device cpu   # smoke run

No download: the model is built from a LlamaConfig (QLoRA saves it once to --workdir and reloads it
through bitsandbytes, exactly as a real base is loaded). Each step is one sequence of --seq tokens
with gradient checkpointing and the same LoRA (r 16 on the 7 projections) medtune trains. Prints
tokens/s, step time, peak GPU memory and MFU (model FLOPs: 6 x parameters x tokens with
checkpointing recompute + attention, over the GPU's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def build_model(args, mode: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 128),
        vocab_size=32000,
        max_position_embeddings=max(4096, args.seq),
        attn_implementation="sdpa",
    )
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if mode == "lora":
        with torch.device(args.device):
            return LlamaForCausalLM(config).to(dtype)
    path = Path(args.workdir) / f"llama-h{args.hidden}-l{args.layers}"
    if not (path / "config.json").is_file():
        LlamaForCausalLM(config).to(dtype).save_pretrained(path, safe_serialization=True)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )
    device_map = {"": 0} if args.device == "cuda" else None
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype, device_map=device_map)


def run(args, mode: str) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = build_model(args, mode)
    params = sum(p.numel() for p in model.parameters())
    if mode == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (args.batch, args.seq), device=args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_time = sum(times) / len(times)
    tokens = args.batch * args.seq
    flops = (6 * params + 12 * args.layers * args.hidden * args.seq) * tokens  # per step, recompute included
    result = {
        "mode": mode,
        "params": params,
        "seq": args.seq,
        "batch": args.batch,
        "step_s": round(step_time, 4),
        "tokens_per_s": round(tokens / step_time, 1),
    }
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        result.update(gpu=name, peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        if peak:
            result["mfu"] = round(flops / step_time / (peak * 1e12), 4)
    del model, optimizer
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["lora", "qlora", "both"], default="both")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", default="/tmp/medtune-gpu-bench")
    args = parser.parse_args()
    if args.device == "cpu" and args.intermediate == 11008 and args.hidden != 4096:
        args.intermediate = None
    for mode in ["lora", "qlora"] if args.mode == "both" else [args.mode]:
        print(json.dumps(run(args, mode)), flush=True)


if __name__ == "__main__":
    main()
