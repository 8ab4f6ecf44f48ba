"""Online RL on one frozen base: rollouts, rewards, advantages, and the policy losses of GRPO and RLOO.

The policy is the LoRA adapter being trained; the reference is the same network with the adapter off
(no second copy); the reward is a reward model (a medtune RM, merged or as a run directory, read where
its training read it) or a rule (`rl.reward_function: module:function`). A rollout turns one micro-batch
of prompts into num_generations sampled replies per prompt, scored, with the per-token log-probs the
loss needs; the loop (medtune/train.py) then treats it like any other micro-batch.

The choices follow TRL 1.16 (GRPOTrainer / RLOOTrainer), so the figures compare:
- log-probs of the sampling distribution: logits divided by the temperature, then log-softmax, the
  reply tokens up to and including the first stop token (TRL masks after EOS the same way);
- GRPO advantages (Shao et al. 2024): (r − group mean) / (group std + 1e-4), the std unbiased;
  RLOO advantages (Ahmadian et al. 2024): r − the mean of the other replies to the same prompt, with
  the KL to the reference taken into the reward as β·Σ(log π_old − log π_ref);
- the clipped surrogate (Schulman et al. 2017): −min(ρA, clip(ρ, 1−ε, 1+ε)A), per token for GRPO, per
  sequence for RLOO; GRPO's KL term is the k3 estimator exp(r)−r−1 of Schulman's "Approximating KL"
  note, added per token with weight β, times ρ by default (rl.kl_bias_correction, TRL 1.16's default
  after DeepSeek-V3.2: 1 in value, but it makes the gradient the unbiased reverse-KL gradient);
- aggregation: "dapo" (TRL's GRPO default) averages over every reply token of the optimizer step,
  "grpo" over replies of their per-token means; RLOO over replies. The loop divides the summed loss by
  these items across micro-batches and processes, as it does for every stage.
With one optimisation pass per rollout (TRL's default num_iterations = 1) π_old is π detached, so ρ = 1
in value; its gradient is the policy gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from medtune.data.tokenizer import decode
from medtune.model.load import eval_mode, reference_model
from medtune.recipe import RLConfig
from medtune.stages import Stage
from medtune.training.rewards import RewardSource

Batch = dict[str, Any]


# ----------------------------------------------------------------------------- the math


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """GRPO: each reward against its prompt's group of replies."""
    grouped = rewards.view(-1, group)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """RLOO: each reward against the mean of the other replies to the same prompt."""
    grouped = rewards.view(-1, group)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group - 1)
    return (grouped - baseline).reshape(-1)


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float) -> torch.Tensor:
    """−min(ρA, clip(ρ, 1−ε, 1+ε)A): the PPO policy loss, element-wise."""
    return -torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """exp(ref − logp) − (ref − logp) − 1 ≥ 0, per token (Schulman's k3 estimator of KL(π‖π_ref))."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation (Schulman et al. 2016) over reply tokens, right to left; rewards and
    values are 0 past each reply's end, so a reply's last token bootstraps from 0 (TRL's PPO does the same)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages


def ppo_rewards(
    scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token rewards: −β·(log π_old − log π_ref) on every reply token (the k1 KL penalty), plus the reward
    model's score on the reply's last token (its EOS, or where max_new_tokens cut it), as "The N Implementation
    Details of RLHF with PPO" places it. TRL's PPO adds it one slot later, on the first pad after EOS
    (`sequence_lengths_p1`; huggingface/trl issue 3750; the fix, PR 5338, was closed), where the loss mask then
    drops it: medtune does not follow TRL here, on purpose."""
    rewards = -beta * (logps - ref_logps) * mask
    last = (mask.sum(-1) - 1).clamp(min=0).long()
    rewards[torch.arange(len(last)), last] += scores
    return rewards


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / std over the masked entries (unbiased variance, + 1e-8), as TRL's PPO whitens."""
    n = mask.sum()
    mean = (values * mask).sum() / n
    var = (((values - mean) ** 2) * mask).sum() / n * n / (n - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> torch.Tensor:
    """½·max((V − R)², (clip(V, V_old ± c) − R)²): PPO's value loss, element-wise."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


def completion_mask(completion_ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first stop token of each row, 0 after it."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    after = torch.cumsum(is_stop.int(), dim=1) - is_stop.int()  # stops strictly before each position
    return (after == 0).long()


def reply_logps(model, batch: Batch, temperature: float, stats: dict | None = None) -> torch.Tensor:
    """Per-token log-probs (temperature-scaled) of the reply tokens, given prompt and reply: (rows, reply length).
    Inputs are only ids and mask (positions as the model derives them), as TRL computes them. With ``stats``,
    the mean entropy of the sampling distribution over reply tokens is added to it."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    n = batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -n - 1 : -1].float() / temperature
    logps = torch.log_softmax(logits, dim=-1)
    if stats is not None:
        stats["entropy"] = entropy_stat(logps, batch["completion_mask"].float())
    return logps.gather(-1, batch["completion_ids"][..., None]).squeeze(-1)


def entropy_stat(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        entropy = -(logps.exp() * logps).sum(-1)
        return mean_stat((entropy * mask).sum(), mask.sum())


# ----------------------------------------------------------------------------- the losses (stage table)


def grpo_loss_sum(model, batch: Batch, accelerator, recipe) -> tuple[torch.Tensor, dict]:
    rl = recipe.rl
    mask = batch["completion_mask"].float()
    stats = rollout_stats(batch, mask)
    logps = reply_logps(model, batch, rl.temperature, stats)
    old = batch.get("old_logps", logps.detach())
    ratio = torch.exp(logps - old)
    per_token = clipped_surrogate(ratio, batch["advantages"][:, None], rl.epsilon)
    if rl.beta:
        kl = k3_kl(logps, batch["ref_logps"])
        if rl.kl_bias_correction:  # × ρ (1 in value, not in gradient): the unbiased reverse-KL gradient
            kl = kl * ratio
        per_token = per_token + rl.beta * kl
        stats["kl"] = mean_stat((kl.detach() * mask).sum(), mask.sum())
    clipped = ((ratio < 1 - rl.epsilon) & (batch["advantages"][:, None] < 0)) | (
        (ratio > 1 + rl.epsilon) & (batch["advantages"][:, None] > 0)
    )
    stats["clip_ratio"] = mean_stat((clipped.float() * mask).sum(), mask.sum())
    if rl.loss_type == "dapo":
        return (per_token * mask).sum(), stats
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum(), stats


def rloo_loss_sum(model, batch: Batch, accelerator, recipe) -> tuple[torch.Tensor, dict]:
    rl = recipe.rl
    mask = batch["completion_mask"].float()
    stats = rollout_stats(batch, mask)
    logps = (reply_logps(model, batch, rl.temperature, stats) * mask).sum(-1)
    old = batch.get("old_seq_logps", logps.detach())
    per_sequence = clipped_surrogate(torch.exp(logps - old), batch["advantages"], rl.epsilon)
    return per_sequence.sum(), stats


def ppo_loss_sum(model, batch: Batch, accelerator, recipe) -> tuple[torch.Tensor, dict]:
    """Clipped policy loss plus vf_coef × clipped value loss, summed over reply tokens; one forward gives the
    policy's log-probs and (from the last hidden states, through the value head) its values."""
    rl = recipe.rl
    logits, values = policy_logits_and_values(model, batch, accelerator)
    logps = (
        torch.log_softmax(logits / rl.temperature, dim=-1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
    )
    mask = batch["completion_mask"].float()
    ratio = torch.exp(logps - batch["old_logps"])
    policy = clipped_surrogate(ratio, batch["advantages"], rl.epsilon)
    value = clipped_value_loss(values, batch["old_values"], batch["returns"], rl.cliprange_value)
    stats = rollout_stats(batch, mask)
    with torch.no_grad():
        clipped = (ratio - 1).abs() > rl.epsilon
        stats.update(
            kl=mean_stat((batch["old_logps"] - batch["ref_logps"]).mul(mask).sum(), mask.sum()),
            entropy=entropy_stat(torch.log_softmax(logits / rl.temperature, dim=-1), mask),
            clip_ratio=mean_stat((clipped.float() * mask).sum(), mask.sum()),
            value_loss=mean_stat((value * mask).sum(), mask.sum()),
        )
    return ((policy + rl.vf_coef * value) * mask).sum(), stats


def policy_logits_and_values(model, batch: Batch, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (fp32) and value-head values at the positions that predict each reply token."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    n = batch["completion_ids"].shape[1]
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    head = accelerator.unwrap_model(model).v_head
    hidden = out.hidden_states[-1][:, -n - 1 : -1]
    return out.logits[:, -n - 1 : -1].float(), head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def reply_tokens(batch: Batch) -> torch.Tensor:
    return batch["completion_mask"].sum()


def replies(batch: Batch) -> torch.Tensor:
    return torch.tensor(batch["completion_ids"].shape[0], device=batch["completion_ids"].device)


def mean_stat(total: torch.Tensor, count) -> torch.Tensor:
    """A logged figure as [sum, count]: the loop adds these over micro-batches and processes, then divides."""
    return torch.stack([total.detach().float(), torch.as_tensor(count, dtype=torch.float32, device=total.device)])


def rollout_stats(batch: Batch, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    rewards = batch["rewards"].float()
    n = rewards.numel()
    return {
        "reward": mean_stat(rewards.sum(), n),
        "reward_std": mean_stat(batch["reward_std"].float().sum(), batch["reward_std"].numel()),
        "completion_length": mean_stat(mask.sum(), n),
    }


# ----------------------------------------------------------------------------- the rollout


@dataclass(frozen=True)
class RolloutContext:
    """What a rollout reads beside its prompts: the policy as prepared for training, how to sample and score."""

    model: Any  # the prepared (DDP/DeepSpeed-wrapped) PeftModel; PPO's value head sits on the unwrapped one
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    rl: RLConfig
    stage: Stage  # its advantages: gae (PPO), group (GRPO) or leave_one_out (RLOO)
    seed: int  # train.seed: sampling is seeded by (seed, step, micro-batch, process)
    reward: RewardSource
    stop_ids: list[int]  # generation stops at these; a reply is cut after the first
    opens_think: bool = False  # the prompt already wrote <think> (DeepSeek-R1): a rule reads "<think>" + reply


@torch.no_grad()
def rollout(s: RolloutContext, batch: Batch, step: int, micro: int) -> Batch:
    """Sample num_generations replies per prompt of the micro-batch, score them, and add what the loss needs.

    Sampling is seeded by (seed, step, micro-batch, process): a resumed run samples what an uninterrupted
    one did at the same step, whatever happened before."""
    rl, model, accelerator = s.rl, s.model, s.accelerator
    unwrapped = accelerator.unwrap_model(model)
    group = rl.num_generations
    prompt_ids = batch["prompt_ids"].repeat_interleave(group, dim=0)
    prompt_mask = batch["prompt_mask"].repeat_interleave(group, dim=0)
    seed = (s.seed * 1_000_003 + step * 1_009 + micro) * 64 + accelerator.process_index
    with torch.random.fork_rng(devices=[] if prompt_ids.device.type == "cpu" else [prompt_ids.device]):
        torch.manual_seed(seed)
        with eval_mode(unwrapped):
            output = unwrapped.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                do_sample=True,
                temperature=rl.temperature,
                top_p=rl.top_p,
                top_k=0,
                max_new_tokens=rl.max_new_tokens,
                eos_token_id=s.stop_ids,
                pad_token_id=s.tokenizer.pad_token_id,
            )
    completion_ids = output[:, prompt_ids.shape[1] :]
    mask = completion_mask(completion_ids, s.stop_ids)
    texts = [
        decode(s.tokenizer, [t for t, m in zip(row.tolist(), keep.tolist(), strict=True) if m and t not in s.stop_ids])
        for row, keep in zip(completion_ids, mask, strict=True)
    ]
    prompts = [messages for messages in batch["prompts"] for _ in range(group)]
    references = [reference for reference in batch["references"] for _ in range(group)]
    # A rule reads the reply as the template wrote it: after a prompt that opened <think>, a reply cut off before
    # </think> is all reasoning (its answer empty), as eval exam reads it; a reward model reads the text.
    judged = ["<think>" + t for t in texts] if s.opens_think and s.reward.rule else texts
    scores = s.reward.checked(prompts, judged, references)
    rewards = torch.tensor(scores, dtype=torch.float32, device=prompt_ids.device)
    out: Batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": mask,
        "rewards": rewards,
        "reward_std": rewards.view(-1, group).std(dim=1) if group > 1 else torch.zeros_like(rewards),
        "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),  # for the loop's token counts
        "real_tokens": prompt_mask.sum() + mask.sum(),
    }
    advantages = s.stage.advantages
    if rl.beta or advantages == "gae":  # PPO's per-token rewards always hold the KL to the reference
        with reference_model(unwrapped):
            out["ref_logps"] = reply_logps(model, out, rl.temperature)
    out["token_level"] = rl.loss_type == "dapo"
    if advantages == "gae":
        return ppo_targets(s, out)
    if advantages == "leave_one_out":
        if rl.beta:  # RLOO puts the KL in the reward: the first-order estimate, summed over the reply
            current = reply_logps(model, out, rl.temperature)
            rewards = rewards - rl.beta * ((current - out["ref_logps"]) * mask).sum(-1)
        out["advantages"] = leave_one_out_advantages(rewards, group)
    else:
        out["advantages"] = group_advantages(rewards, group, rl.scale_rewards)
    return out


def ppo_targets(s: RolloutContext, out: Batch) -> Batch:
    """What PPO's epochs learn from, fixed at rollout time (Huang et al. 2024, "The N Implementation Details
    of RLHF with PPO", and TRL 1.12's PPO): π_old's log-probs and values, per-token rewards = −β·(log π_old −
    log π_ref) with the reward model's score added at the reply's last token (its EOS; TRL's one slot later,
    see ppo_rewards), GAE advantages (whitened per micro-batch, over its reply tokens; TRL whitens over its
    whole rollout batch) and returns = advantages + values (before whitening)."""
    rl, model, accelerator = s.rl, s.model, s.accelerator
    unwrapped = accelerator.unwrap_model(model)
    mask = out["completion_mask"].float()
    with eval_mode(unwrapped):
        logits, values = policy_logits_and_values(model, out, accelerator)
    ids = out["completion_ids"][..., None]
    old_logps = torch.log_softmax(logits / rl.temperature, dim=-1).gather(-1, ids).squeeze(-1)
    values = values * mask
    rewards = ppo_rewards(out["rewards"], old_logps, out["ref_logps"], mask, rl.beta)
    if rl.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False) * mask
    advantages = gae(rewards, values, rl.gamma, rl.lam)
    out.update(
        old_logps=old_logps,
        old_values=values,
        returns=advantages + values,
        advantages=whiten(advantages, mask) * mask,
    )
    return out
