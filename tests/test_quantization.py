"""QLoRA on CPU: the tiny base in 4-bit and 8-bit, real training steps, merge into the unquantized base."""

import pytest
import torch

from medtune.merge import merge
from medtune.recipe import RecipeError, load_recipe
from medtune.train import train

from conftest import REPO, SMALL_RECIPE, write_recipe


@pytest.mark.parametrize("bits,layer", [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_qlora_trains_only_the_adapter_and_merges_into_the_full_base(tmp_path, tiny_base, bits, layer):
    from transformers import AutoModelForCausalLM

    path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE)
    recipe = load_recipe(path, [f"output.dir={tmp_path / 'run'}", "train.max_steps=8", "train.save_steps=4",
                                f"model.quantization={{bits: {bits}, compute_dtype: fp32}}"])
    result = train(recipe)
    model = result.model
    quantized = [m for m in model.modules() if type(m).__name__ == layer]
    assert quantized, f"no {layer} layer: the base was not quantized"
    assert all(not p.requires_grad for m in quantized for p in m.parameters(recurse=False))
    info = result.run.read_info()
    assert info["finished"] and info["final_loss"] < info["first_loss"]

    summary = merge(str(result.run.root), tmp_path / "merged", [])
    assert summary["parity_max_abs_logit_diff"] <= 1e-4  # merged vs full-precision base + adapter
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    full_base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])
    with torch.no_grad():
        trained_logits = model.eval()(input_ids=ids).logits
        with model.disable_adapter():
            quantized_base_logits = model(input_ids=ids).logits
        merged_gap = (merged(input_ids=ids).logits - trained_logits).abs().max().item()
        base_gap = (full_base(input_ids=ids).logits - quantized_base_logits).abs().max().item()
    # Against the quantized model it was trained on, the merged model differs only by the base's own
    # quantization error: merging adds nothing on top of it (margin 50% + 1e-3 for rounding).
    assert merged_gap <= 1.5 * base_gap + 1e-3, (merged_gap, base_gap)


def test_8bit_with_zero3_is_refused_early(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE)
    with pytest.raises(RecipeError, match="8-bit weights cannot be sharded by ZeRO-3"):
        load_recipe(path, ["model.quantization={bits: 8, compute_dtype: fp32}", f"train.deepspeed={REPO / 'ds_configs' / 'zero3.json'}"])
