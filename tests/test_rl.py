"""Online RL (GRPO, RLOO): the math by hand, the losses and gradients against TRL's, and whole runs."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import DEMO_DATA, SMALL_RECIPE, write_recipe

from medtune.training.rollout import (
    clipped_surrogate,
    completion_mask,
    group_advantages,
    grpo_loss_sum,
    k3_kl,
    leave_one_out_advantages,
    reply_logps,
    rloo_loss_sum,
)


def test_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0])
    # groups of 3: [1, 2, 3] mean 2, std 1; [6, 0, 0] mean 2, std sqrt(12) = 3.4641
    expected = torch.tensor(
        [-1 / 1.0001, 0.0, 1 / 1.0001, 4 / (12**0.5 + 1e-4), -2 / (12**0.5 + 1e-4), -2 / (12**0.5 + 1e-4)]
    )
    assert torch.allclose(group_advantages(rewards, 3), expected)
    assert torch.allclose(group_advantages(rewards, 3, scale=False), torch.tensor([-1.0, 0, 1, 4, -2, -2]))
    # leave one out: 1 - (2+3)/2 = -1.5, 2 - 2 = 0, 3 - 1.5 = 1.5; 6 - 0 = 6, 0 - 3 = -3, -3
    assert torch.allclose(leave_one_out_advantages(rewards, 3), torch.tensor([-1.5, 0.0, 1.5, 6.0, -3.0, -3.0]))


def test_clipped_surrogate_and_kl_by_hand() -> None:
    ratio = torch.tensor([0.5, 1.0, 1.5, 1.5, 0.5])
    advantage = torch.tensor([1.0, 2.0, 1.0, -1.0, -1.0])
    # A>0 and ρ>1+ε: clipped at 1.2 → -1.2; A<0 and ρ<1-ε: clipped at 0.8 → 0.8; otherwise -ρA
    assert torch.allclose(clipped_surrogate(ratio, advantage, 0.2), torch.tensor([-0.5, -2.0, -1.2, 1.5, 0.8]))
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0])
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([0.0, math.e - 1 - 1]))
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9]])
    assert completion_mask(ids, [2]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def fixed_rollout(tiny_base, seed: int = 0):
    """A LoRA policy whose adapter is not a no-op, and a fixed rollout: prompts, replies, rewards."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(5, 200, (4, 6), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_ids[0, :2], prompt_mask[0, :2] = tokenizer.pad_token_id, 0  # a left-padded prompt
    completion_ids = torch.randint(5, 200, (4, 7), generator=generator)
    completion_ids[1, 3] = tokenizer.eos_token_id  # a reply that ends early: masked after its EOS
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask(completion_ids, [tokenizer.eos_token_id]),
        "rewards": torch.tensor([1.0, -0.5, 0.25, 2.0]),
    }
    batch["reward_std"] = batch["rewards"].view(-1, 4).std(dim=1)
    return model, tokenizer, batch


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def compare(ours_loss, ours_grads, trl_loss, trl_grads, what: str) -> None:
    gap = max((ours_grads[n] - trl_grads[n]).abs().max().item() for n in ours_grads)
    scale = max(g.abs().max().item() for g in trl_grads.values())
    print(f"{what}: loss medtune {ours_loss:.7f} TRL {trl_loss:.7f}; max |Δgrad| {gap:.2e} (max |grad| {scale:.2e})")
    assert ours_loss == pytest.approx(trl_loss, abs=1e-6)
    assert ours_grads.keys() == trl_grads.keys() and gap <= 1e-6 * max(scale, 1.0)


def trl_setup(config_cls, trainer_cls, model, tokenizer, batch, tmp_path: Path, **config):
    """A TRL trainer over ``model`` with our settings (fp32: TRL's bf16 default off), and the rollout as its inputs."""
    from datasets import Dataset

    args = config_cls(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=7,
        report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, **config,
    )  # fmt: skip
    trainer = trainer_cls(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["头痛怎么办"] * 4}),
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
    return trainer, {k: batch[k] for k in keys}


@pytest.mark.parametrize(("loss_type", "beta"), [("dapo", 0.0), ("grpo", 0.04), ("dapo", 0.04)])
def test_grpo_loss_and_gradients_equal_trls(tiny_base, tmp_path: Path, loss_type: str, beta: float) -> None:
    trl = pytest.importorskip("trl")

    model, tokenizer, batch = fixed_rollout(tiny_base)
    twin = copy.deepcopy(model)
    temperature = 0.9
    batch["advantages"] = group_advantages(batch["rewards"], 4)
    if beta:
        with torch.no_grad(), model.disable_adapter():
            batch["ref_logps"] = reply_logps(model, batch, temperature)
    rl = dict(temperature=temperature, epsilon=0.2, beta=beta, loss_type=loss_type, kl_bias_correction=True)
    recipe = SimpleNamespace(rl=SimpleNamespace(**rl))
    model.train()
    loss_sum, _ = grpo_loss_sum(model, batch, None, recipe)
    items = batch["completion_mask"].sum() if loss_type == "dapo" else 4
    (loss_sum / items).backward()

    config = dict(temperature=temperature, beta=beta, loss_type=loss_type)
    trainer, inputs = trl_setup(trl.GRPOConfig, trl.GRPOTrainer, twin, tokenizer, batch, tmp_path, **config)
    inputs["num_items_in_batch"] = batch["completion_mask"].sum()
    if beta:
        inputs["ref_per_token_logps"] = batch["ref_logps"]
    trainer.model.train()
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()
    compare(
        (loss_sum / items).item(),
        lora_grads(model),
        trl_loss.item(),
        lora_grads(trainer.model),
        f"GRPO {loss_type} β={beta}",
    )


def test_rloo_loss_and_gradients_equal_trls(tiny_base, tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")

    model, tokenizer, batch = fixed_rollout(tiny_base, seed=1)
    twin = copy.deepcopy(model)
    batch["advantages"] = leave_one_out_advantages(batch["rewards"], 4)
    recipe = SimpleNamespace(rl=SimpleNamespace(temperature=1.0, epsilon=0.2, beta=0.05, loss_type="dapo"))
    model.train()
    loss_sum, _ = rloo_loss_sum(model, batch, None, recipe)
    (loss_sum / 4).backward()

    trainer, inputs = trl_setup(trl.RLOOConfig, trl.RLOOTrainer, twin, tokenizer, batch, tmp_path)
    with torch.no_grad():  # π_old as TRL computes it at generation time (its own log-prob function)
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        old, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, ids.shape[1] - 6)
        inputs["old_logps"] = (old * batch["completion_mask"]).sum(-1)
    trainer.model.train()
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()
    compare((loss_sum / 4).item(), lora_grads(model), trl_loss.item(), lora_grads(trainer.model), "RLOO")


# ----------------------------------------------------------------------------- whole runs

RL_RECIPE = (
    SMALL_RECIPE.replace("eval_ratio: 0.1", "eval_ratio: 0.0")
    + """
rl:
  reward_function: rewards:shorter
  num_generations: 4
  max_new_tokens: 12
  temperature: 1.0
"""
)


def rl_run(tmp_path: Path, name: str, stage: str, *extra: str):
    from medtune.recipe import load_recipe
    from medtune.train import train

    path = write_recipe(tmp_path / f"{name}.yaml", RL_RECIPE)
    overrides = [f"train.stage={stage}", f"output.dir={tmp_path / name}", "train.logging_steps=1", *extra]
    return train(load_recipe(path, overrides))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_rl_raises_a_rule_reward(tmp_path: Path, stage: str) -> None:
    result = rl_run(tmp_path, stage, stage, "train.max_steps=30", "train.learning_rate=2e-2", "train.save_steps=0")
    rows = [r for r in result.run.read_metrics() if "reward" in r]
    first, last = sum(r["reward"] for r in rows[:5]) / 5, sum(r["reward"] for r in rows[-5:]) / 5
    length = f"{rows[0]['completion_length']:.1f} → {rows[-1]['completion_length']:.1f}"
    print(f"{stage}: mean reward {first:.3f} → {last:.3f} (first/last 5 steps); reply tokens {length}")
    assert last > first + 0.3 and {"reward_std", "completion_length", "entropy", "peak_memory_mb"} <= set(rows[-1])


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_resumes_to_the_uninterrupted_adapter(tmp_path: Path, stage: str) -> None:
    """A run stopped after its step-3 checkpoint and resumed samples what the straight run sampled."""
    from safetensors.torch import load_file

    common = ["train.max_steps=6", "train.save_steps=3", "rl.beta=0.04"]
    run = rl_run(tmp_path, "run", stage, *common).run
    reference = load_file(run.adapter_dir / "adapter_model.safetensors")
    # Stop it in spirit after its step-3 checkpoint: no final adapter, not finished, later lines gone.
    shutil.rmtree(run.adapter_dir)
    info = json.loads(run.info_file.read_text())
    run.info_file.write_text(json.dumps({**info, "finished": False}))
    rows = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    run.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 3))
    rl_run(tmp_path, "run", stage, *common, "train.resume=true")
    resumed = load_file(run.adapter_dir / "adapter_model.safetensors")
    gap = max((resumed[k] - reference[k]).abs().max().item() for k in reference)
    print(f"{stage}: resumed vs straight adapter: max |Δ| {gap:.2e}")
    assert resumed.keys() == reference.keys() and gap <= 1e-6


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("nan", "error: reward rewards:nan: gave nan for reply 0 of the rollout (prompt "),
        ("nothing", "error: reward rewards:nothing: gave None for reply 0 of the rollout (prompt "),
        ("fails_later", "error: rl.reward_function rewards:fails_later: raised KeyError: 'score' on reply 0 of"),
    ],
)
def test_a_broken_reward_rule_stops_the_run_in_one_line(tmp_path: Path, capsys, rule: str, expected: str) -> None:
    """NaN, None or an exception from the rule: named with the reply, before that step's optimizer step; the
    checkpoint before it is kept (fails_later breaks at step 3 of a run saving every 2 steps)."""
    import rewards

    from medtune.train import main

    rewards.CALLS["n"] = 0
    path = write_recipe(tmp_path / "r.yaml", RL_RECIPE)
    run = tmp_path / "run"
    argv = [str(path), "train.stage=grpo", f"rl.reward_function=rewards:{rule}", f"output.dir={run}"]
    assert main([*argv, "train.max_steps=4", "train.save_steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert not (run / "adapter").exists()
    kept = sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").exists() else []
    assert kept == (["step-2"] if rule == "fails_later" else [])


def test_rl_recipe_errors_name_the_key(tmp_path: Path) -> None:
    from medtune.recipe import RecipeError, load_recipe

    path = write_recipe(tmp_path / "r.yaml", RL_RECIPE)
    with pytest.raises(RecipeError, match="rl.num_generations"):
        load_recipe(path, ["train.stage=grpo", "rl.num_generations=1"])
    with pytest.raises(RecipeError, match="exactly one of them"):
        load_recipe(path, ["train.stage=grpo", "rl.reward_model=/tmp"])
    assert DEMO_DATA.is_file()


def test_ppo_pieces_by_hand() -> None:
    from medtune.training.rollout import clipped_value_loss, gae, ppo_rewards, whiten

    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 0.0]])  # the last position is past the reply's end
    # γ = 0.9, λ = 0.5: δ2 = 1 − 0.4 = 0.6, A2 = 0.6; δ1 = 0.9·0.4 − 0.2 = 0.16, A1 = 0.16 + 0.45·0.6 = 0.43;
    # δ0 = 0.9·0.2 − 0.5 = −0.32, A0 = −0.32 + 0.45·0.43 = −0.1265
    assert torch.allclose(gae(rewards, values, 0.9, 0.5), torch.tensor([[-0.1265, 0.43, 0.6, 0.0]]))
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(whiten(x, mask)[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)  # mean 2, std 1
    assert torch.allclose(whiten(x, mask, shift_mean=False)[0, :3], torch.tensor([1.0, 2.0, 3.0]), atol=1e-6)
    # V = 1.5 from V_old = 1.0, R = 2: unclipped (1.5−2)² = 0.25, clipped V = 1.2 → 0.64; the larger, halved
    loss = clipped_value_loss(torch.tensor([1.5]), torch.tensor([1.0]), torch.tensor([2.0]), 0.2)
    assert torch.allclose(loss, torch.tensor([0.32]))
    # KL penalty −β(log π_old − log π_ref) per reply token, the score on the last one (reply 1 ends at token 1)
    logps, ref = (
        torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0]]),
        torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]]),
    )
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    shaped = ppo_rewards(torch.tensor([3.0, -1.0]), logps, ref, mask, beta=0.1)
    assert torch.allclose(shaped, torch.tensor([[-0.05, 0.1, 3.0], [-0.1, -1.0, 0.0]]))


@pytest.mark.slow
def test_ppo_raises_the_reward_with_bounded_kl(tmp_path: Path) -> None:
    extra = ["train.max_steps=50", "train.learning_rate=1e-2", "train.save_steps=0", "rl.beta=0.05"]
    result = rl_run(tmp_path, "ppo", "ppo", *extra, "rl.num_generations=2", "rl.ppo_epochs=2")
    rows = [r for r in result.run.read_metrics() if "reward" in r]
    first, last = sum(r["reward"] for r in rows[:5]) / 5, sum(r["reward"] for r in rows[-5:]) / 5
    kls = [r["kl"] for r in rows]
    print(
        f"ppo: mean reward {first:.3f} → {last:.3f} (first/last 5 of 50 steps); KL max {max(kls):.3f}, "
        f"last {kls[-1]:.3f}; value loss {rows[0]['value_loss']:.3f} → {rows[-1]['value_loss']:.3f}"
    )
    assert last > first + 0.3 and max(kls) < 5.0
    assert {"entropy", "clip_ratio", "value_loss", "peak_memory_mb"} <= set(rows[-1])


@pytest.mark.slow
def test_ppo_killed_and_resumed_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """SIGKILL after the first checkpoint, `--resume`: the adapter of a run that never stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO
    from safetensors.torch import load_file

    path = write_recipe(tmp_path / "ppo.yaml", RL_RECIPE)
    common = ["train.stage=ppo", "train.max_steps=12", "train.save_steps=3", "rl.beta=0.05", "rl.ppo_epochs=2"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "medtune/train.py", str(path), *common, f"output.dir={killed}"]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("step-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not json.loads((killed / "run_info.json").read_text())["finished"], "the kill came too late"
    resumed = subprocess.run([*command, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    straight = rl_run(tmp_path, "straight", "ppo", *common[1:]).run
    reference = load_file(straight.adapter_dir / "adapter_model.safetensors")
    got = load_file(killed / "adapter" / "adapter_model.safetensors")
    gap = max((got[k] - reference[k]).abs().max().item() for k in reference)
    print(f"ppo killed at a checkpoint and resumed vs uninterrupted: max |Δ adapter| {gap:.2e}")
    assert got.keys() == reference.keys() and gap <= 1e-6


def test_ppo_with_one_reply_per_prompt(tmp_path: Path) -> None:
    """PPO needs no group (Zhongjing's recipe samples one reply per prompt): every figure stays finite."""
    run = rl_run(tmp_path, "ppo1", "ppo", "train.max_steps=2", "rl.num_generations=1", "rl.ppo_epochs=1").run
    rows = [r for r in run.read_metrics() if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
