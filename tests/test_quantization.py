"""QLoRA on CPU: the tiny base in 4-bit and 8-bit, real training steps, merge into the unquantized base."""

import pytest
import torch
from helpers import REPO, SMALL_RECIPE, write_recipe

from medtune.infer.merge import merge
from medtune.recipe import RecipeError, load_recipe
from medtune.train import train


def dequantized_copy(quantized, full_base):
    """The full-precision model whose weights are exactly what the quantized base computes with."""
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    weights = {}
    for name, module in quantized.named_modules():
        kind = type(module).__name__
        if kind == "Linear4bit":
            weights[f"{name}.weight"] = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        elif kind == "Linear8bitLt":
            weights[f"{name}.weight"] = bnbf.int8_vectorwise_dequant(module.weight.data, module.weight.SCB).float()
    model = AutoModelForCausalLM.from_pretrained(full_base)
    model.load_state_dict(weights, strict=False)
    return model.eval()


@pytest.mark.parametrize("bits,layer", [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_qlora_trains_only_the_adapter_and_merges_into_the_full_base(tmp_path, tiny_base, bits, layer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medtune.model.load import load_base_model

    path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE)
    recipe = load_recipe(
        path,
        [
            f"output.dir={tmp_path / 'run'}",
            "train.max_steps=12",
            "train.save_steps=6",
            f"model.quantization={{bits: {bits}, compute_dtype: fp32}}",
        ],
    )
    result = train(recipe)
    quantized = [m for m in result.model.modules() if type(m).__name__ == layer]
    assert quantized, f"no {layer} layer: the base was not quantized"
    assert all(not p.requires_grad for m in quantized for p in m.parameters(recurse=False))
    info = result.run.read_info()
    assert info["finished"] and info["final_loss"] < info["first_loss"]

    # 1. medtune merge goes into the unquantized base: exact parity with full base + adapter.
    summary = merge(str(result.run.root), tmp_path / "merged", [])
    assert summary["parity_max_abs_logit_diff"] <= 1e-4

    # 2. Against the model it was trained on: the same adapter merged into the *dequantized* base
    # reproduces the quantized base + adapter. Tolerance 1% of the logit scale: bitsandbytes' CPU
    # kernels compute 4-bit matmuls through bf16 (relative precision 2^-8) and LLM.int8 quantizes
    # activations to int8 (1/127); measured gaps are 0.2-0.6% of the largest logit.
    trained = PeftModel.from_pretrained(
        load_base_model(info["base_model"], recipe.model, "fp32"), str(result.run.adapter_dir)
    ).eval()
    dequantized = (
        PeftModel.from_pretrained(dequantized_copy(trained.base_model.model, tiny_base), str(result.run.adapter_dir))
        .merge_and_unload()
        .eval()
    )
    ids = torch.tensor([[1] + list(range(100, 140))])
    with torch.no_grad():
        reference = trained(input_ids=ids).logits
        gap = (dequantized(input_ids=ids).logits - reference).abs().max().item()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        quantization_error = (merged(input_ids=ids).logits - reference).abs().max().item()
    assert gap <= 0.01 * reference.abs().max().item(), (gap, reference.abs().max().item())
    # The merged full-precision model differs from the trained quantized one only by the base's
    # quantization error, which the dequantized reference removes.
    assert gap < quantization_error

    # 3. medtune export does the same: the GGUF holds the merge into the unquantized base, not the 4/8-bit one.
    import gguf
    import numpy as np

    from medtune.infer.export import export_gguf

    export_gguf(str(result.run.root), tmp_path / "m.gguf", "f32")
    exported = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    down = merged.model.layers[0].mlp.down_proj.weight.detach().numpy()
    assert np.array_equal(exported["blk.0.ffn_down.weight"].reshape(down.shape), down)


def test_8bit_with_zero3_is_refused_early(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE)
    with pytest.raises(RecipeError, match="8-bit weights cannot be sharded by ZeRO-3"):
        load_recipe(
            path,
            [
                "model.quantization={bits: 8, compute_dtype: fp32}",
                f"train.deepspeed={REPO / 'ds_configs' / 'zero3.json'}",
            ],
        )
