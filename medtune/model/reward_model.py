"""A trained reward model, read as the RM stage trained it: loaded with its adapters, scoring conversations.

`medtune reward` scores files with it and online RL (medtune/training/rewards.py) scores rollouts with it."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification

from medtune.console import MedtuneError
from medtune.data.rows import padded
from medtune.data.templates import IGNORE_INDEX, encode_conversations, get_template
from medtune.data.tokenizer import load_tokenizer
from medtune.model.adapters import load_with_adapters
from medtune.model.load import DTYPES, quantization_config
from medtune.rundir import describe_source
from medtune.stages import get_stage


def load_reward_model(source: str, dtype: str, quantization=None):
    """The score model (base + adapters merged in memory), its tokenizer and its description. With
    ``quantization`` (a QuantizationConfig) a merged RM loads k-bit, as the policy's base does in RL."""
    info = describe_source(source)
    if not get_stage(info.stage).reward_head:
        raise MedtuneError(f"{source}: a {info.stage} model, not a reward model (train one with train.stage: rm)")
    if info.template is None:
        raise MedtuneError(f"{source}: no chat template is recorded; score a run directory or a medtune-merged RM")
    tokenizer = load_tokenizer(info.tokenizer, info.tokenizer_kind, info.trust_remote_code)
    if quantization is not None and info.adapters:
        raise MedtuneError(f"{source}: a quantized reward model must be merged first (medtune merge {source} --out …)")
    extra = {"quantization_config": quantization_config(quantization)} if quantization is not None else {}
    model = load_with_adapters(
        AutoModelForSequenceClassification,
        info,
        dtype=DTYPES[dtype],
        num_labels=1,
        trust_remote_code=info.trust_remote_code,
        **extra,
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at each row's last non-pad token
    if quantization is None:
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    return model.eval(), tokenizer, info


@torch.no_grad()
def score_conversations(model, tokenizer, template_name: str, system_prompt, conversations, batch_size: int):
    """One score per conversation (its last turn being the reply), read as the RM stage reads it."""
    encoded = encode_conversations(tokenizer, get_template(template_name), conversations, system_prompt, "last_turn")
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    for i, (ids, labels) in enumerate(encoded):
        if len(ids) > context:
            raise MedtuneError(f"conversation {i}: {len(ids)} tokens, over the model's context of {context}")
        if all(label == IGNORE_INDEX for label in labels):
            raise MedtuneError(f"conversation {i}: the reply has no tokens")
    scores: list[float] = []
    for start in range(0, len(encoded), batch_size):
        chunk = [ids for ids, _ in encoded[start : start + batch_size]]
        ids, mask = padded(chunk, tokenizer.pad_token_id, device=model.device)
        scores += model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float().tolist()
    return scores
