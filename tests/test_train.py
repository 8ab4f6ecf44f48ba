"""Training: the loss falls, only the adapter changes, the adapter reloads with plain peft."""

import json

import pytest
import torch
from safetensors.torch import load_file

from medtune.recipe import RecipeError, load_recipe
from medtune.train import train


def test_loss_falls_and_run_dir_describes_itself(trained):
    result, _, tiny_base = trained
    run = result.run
    info = run.read_info()
    assert info["finished"] and info["steps"] == 40 and info["base_model"] == str(tiny_base)
    assert info["final_loss"] < info["first_loss"] - 1.0
    assert run.loss_plot.stat().st_size > 1000 and run.recipe_file.is_file()
    rows = run.read_metrics()
    assert [r["step"] for r in rows if "loss" in r] == [1, *range(2, 41, 2)]  # the first step, then every 2
    assert any("eval_loss" in r for r in rows)
    assert run.read_recipe().train.max_steps == 40


def test_only_adapter_weights_are_trained_and_saved(trained):
    result, base_before, tiny_base = trained
    saved = load_file(result.run.adapter_dir / "adapter_model.safetensors")
    assert saved and all("lora_" in k or "lm_head" in k for k in saved), sorted(saved)[:5]
    # The frozen base on disk and in memory is untouched.
    assert all(torch.equal(base_before[k], v) for k, v in load_file(tiny_base / "model.safetensors").items())
    model = result.model
    for name, param in model.named_parameters():
        if "lora_" not in name and "modules_to_save" not in name:
            key = name.replace("base_model.model.", "", 1).replace(".base_layer", "").replace(".original_module", "")
            assert torch.equal(param.detach(), base_before[key]), name


def test_adapter_loads_with_plain_peft_and_reproduces_logits(trained, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _, tiny_base = trained
    adapter = result.run.adapter_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapter).eval()
    saved_tokenizer = AutoTokenizer.from_pretrained(adapter)
    ids = saved_tokenizer.apply_chat_template([{"role": "user", "content": "高血压要注意什么？"}], return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        expected = result.model.eval()(input_ids=ids).logits
        got = plain(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5)


def test_existing_run_is_never_overwritten(trained, tmp_path):
    from helpers import SMALL_RECIPE, write_recipe

    result, _, _ = trained
    path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE)
    same = [f"output.dir={result.run.root}", "train.max_steps=40", "train.save_steps=0"]
    with pytest.raises(RecipeError, match="--resume"):
        train(load_recipe(path, same))
    assert train(load_recipe(path, same + ["train.resume=true"])).model is None  # reported, not retrained
    with pytest.raises(RecipeError, match=r"finished with other settings \(train.max_steps: 40 → 12"):
        train(load_recipe(path, [f"output.dir={result.run.root}", "train.save_steps=0", "train.resume=true"]))


def test_checkpointing_bf16_and_offline_wandb(tmp_path, capfd, monkeypatch):
    from helpers import SMALL_RECIPE, write_recipe

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-0123456789abcdef0123456789abcdef")
    path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE)
    recipe = load_recipe(
        path,
        [
            f"output.dir={tmp_path / 'run'}",
            "train.max_steps=3",
            "train.save_steps=0",
            "train.gradient_checkpointing=true",
            "model.dtype=bf16",
            "train.report_to=wandb",
        ],
    )
    result = train(recipe)
    info = result.run.read_info()
    assert info["finished"] and info["dtype"] == "bf16"
    assert result.model.base_model.model.is_activation_checkpointing
    assert list(tmp_path.glob("wandb/offline-run-*")), "no offline wandb run was written"
    out = capfd.readouterr()
    assert "secret-key" not in out.out + out.err


def test_fp16_without_gpu_is_refused_before_loading(tmp_path):
    from helpers import SMALL_RECIPE, write_recipe

    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on a GPU")
    path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE.replace("dtype: fp32", "dtype: fp16"))
    with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA GPU"):
        train(load_recipe(path, [f"output.dir={tmp_path / 'run'}"]))


def test_a_short_run_logs_its_first_and_last_step(tmp_path, capsys):
    """logging_steps above max_steps: the first and the last step are still logged, so the curve and the done
    line show where the loss went."""
    from helpers import SMALL_RECIPE, write_recipe

    from medtune.train import main

    recipe = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE)
    argv = [str(recipe), f"output.dir={tmp_path / 'run'}", "train.max_steps=3", "train.logging_steps=10"]
    assert main([*argv, "train.save_steps=0"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 3]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["first_loss"] != info["final_loss"]
    assert f"loss {info['first_loss']} → {info['final_loss']}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "panels"),
    [({}, ["loss (per item)"]), ({"reward": 0.5, "kl": 0.01}, ["loss (per item)", "reward / KL per reply"])]
    + [
        (
            {"rewards/accuracy": 0.7, "rewards/margin": 0.2},
            ["loss (per item)", "chosen beats rejected: accuracy, margin"],
        )
    ],
)
def test_the_loss_plot_shows_what_the_stage_logs(extra: dict, panels: list[str]) -> None:
    from medtune.rundir import loss_figure

    rows = [{"step": step, "loss": 1.0 / step, **extra} for step in (1, 2, 3)]
    figure = loss_figure(rows)
    assert [ax.get_ylabel() for ax in figure.axes] == panels
    assert all(len(ax.lines) >= 1 for ax in figure.axes)
