"""Where online RL's rewards come from: a reward model (a medtune RM, read where its training read it) or a rule
(`rl.reward_function: module:function`).

A reward model trained on the policy's own base (an RM run or adapter directory, as Zhongjing's RM is trained on
the SFT model) is loaded as a second adapter on the policy's network: no second copy of the base. Any other RM
(a merged directory) loads in the policy's dtype and quantization."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file

from medtune.console import MedtuneError
from medtune.data.rows import padded
from medtune.data.templates import encode_conversations, get_template
from medtune.data.tokenizer import load_tokenizer
from medtune.model.load import eval_mode, resolve_dtype
from medtune.model.reward_model import load_reward_model, score_conversations
from medtune.rundir import describe_source


@dataclass
class RewardSource:
    """Scores (prompt messages, reply text) pairs: a reward model read as the RM stage trained it, or a rule."""

    score: Callable[[list[list[dict]], list[str], list[dict | None]], list[float]]  # prompts, replies, references
    name: str
    rule: bool = False  # a rule (rl.reward_function) rather than a reward model

    def checked(self, prompts: list[list[dict]], texts: list[str], references: list[dict | None]) -> list[float]:
        """The scores, each a finite number, or one error naming the reward, the reply and the value: a NaN
        would poison the loss and every later step, so the run stops before the optimizer step."""
        scores = self.score(prompts, texts, references)
        for i, value in enumerate(scores):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise MedtuneError(
                    f"reward {self.name}: gave {value!r} for reply {i} of the rollout (prompt "
                    f"{prompts[i][-1]['content'][:40]!r}); a reward is a finite number. The run stopped before "
                    "this step; its last checkpoint is kept"
                )
        return [float(v) for v in scores]


def takes_a_third_argument(rule: Callable) -> bool:
    """Whether a rule asks for the prompt's reference: a third positional parameter without a default, or *args.
    An optional third parameter (``scale=2.0``) is the rule's own, and a signature that cannot be read is taken
    as two arguments."""
    try:
        parameters = list(inspect.signature(rule).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return True
    return len(positional) >= 3 and positional[2].default is inspect.Parameter.empty


def rule_scores(
    rule: Callable,
    name: str,
    takes_reference: bool,
    prompts: list[list[dict]],
    texts: list[str],
    references: list[dict | None],
) -> list:
    """A reward rule's values; an exception inside it is the rule's, named with the reply it failed on. A rule of
    three parameters also gets the prompt's reference (an exam question's record, its gold answer), else None."""
    values = []
    for i, (prompt, text, reference) in enumerate(zip(prompts, texts, references, strict=True)):
        try:
            values.append(rule(prompt, text, reference) if takes_reference else rule(prompt, text))
        except Exception as exc:  # noqa: BLE001 - the user's rule: any failure is reported as its own
            raise MedtuneError(
                f"rl.reward_function {name}: raised {type(exc).__name__}: {exc} on reply {i} of the rollout "
                f"(prompt {prompt[-1]['content'][:40]!r}); the run stopped before this step"
            ) from exc
    return values


def load_reward(recipe, policy, base: str) -> RewardSource:
    """The recipe's reward: its rule, its RM as a second adapter on the policy (same base), or its own RM."""
    rl = recipe.rl
    if rl.reward_function:
        module, _, function = rl.reward_function.partition(":")
        try:
            rule = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as exc:
            raise MedtuneError(f"rl.reward_function {rl.reward_function}: {exc}") from None
        score = partial(rule_scores, rule, rl.reward_function, takes_a_third_argument(rule))  # read once
        return RewardSource(score, rl.reward_function, rule=True)
    info = describe_source(rl.reward_model)
    same_base = len(info.adapters) == 1 and _same_model(info.base, base)
    if same_base:
        return shared_reward_adapter(policy, info)
    dtype = resolve_dtype(recipe.model.dtype)
    model, tokenizer, info = load_reward_model(rl.reward_model, dtype, recipe.model.quantization)

    def score(prompts: list[list[dict]], texts: list[str], references: list) -> list[float]:  # an RM reads text
        conversations = [p + [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts, strict=True)]
        return score_conversations(model, tokenizer, info.template, info.system_prompt, conversations, 16)

    return RewardSource(score, f"{rl.reward_model} (its own copy of {info.base})")


def _same_model(a: str, b: str) -> bool:
    return a == b or (Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve())


def shared_reward_adapter(policy, info) -> RewardSource:
    """The RM's LoRA as adapter "reward" on the policy's PeftModel, frozen; its score head applied to the base's
    last hidden state at each row's last non-pad token (where AutoModelForSequenceClassification reads it)."""
    adapter = Path(info.adapters[0])
    state = load_file(adapter / "adapter_model.safetensors")
    score_weight = state.pop("base_model.model.score.weight").float()
    config = LoraConfig.from_pretrained(adapter)
    config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, True
    policy.add_adapter("reward", config)
    set_peft_model_state_dict(policy, state, adapter_name="reward")
    policy.set_adapter("default")  # the policy stays the trained adapter; "reward" is frozen
    tokenizer = load_tokenizer(info.tokenizer, info.tokenizer_kind)
    template = get_template(info.template)
    backbone = policy.get_base_model().model  # LlamaModel (or the causal LM's own backbone)

    @torch.no_grad()
    def score(prompts: list[list[dict]], texts: list[str], references: list) -> list[float]:  # an RM reads text
        conversations = [p + [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts, strict=True)]
        encoded = [ids for ids, _ in encode_conversations(tokenizer, template, conversations, info.system_prompt)]
        pad = tokenizer.pad_token_id
        device = score_weight.device if score_weight.device.type != "cpu" else next(policy.parameters()).device
        ids, mask = padded(encoded, pad, device=device)
        with eval_mode(policy):
            policy.set_adapter("reward", inference_mode=True)
            try:
                hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            finally:
                policy.set_adapter("default")
        positions = torch.arange(ids.shape[1], device=device)
        last = (positions * (ids != pad).int()).argmax(-1)  # the classification head's rule
        pooled = hidden[torch.arange(len(encoded), device=device), last].float()
        return (pooled @ score_weight.to(device).T).squeeze(-1).tolist()

    return RewardSource(score, f"{info.adapters[0]} (a second adapter on the policy's base)")
