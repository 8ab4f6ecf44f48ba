"""A model ready to generate in its training format, and how it generates: one `GenerationSettings` that
predict, eval (exam and dialogue), chat and serve all read, and one place that turns it into generate()'s
keywords.

A prompt's ids are those training used (the run's template and system prompt), and a reply stops where the
template's replies end as well as at the model's own stop ids.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from medtune.console import MedtuneError
from medtune.data.jinja_templates import JinjaTemplate, prompt_opens_think, split_reasoning, template_source
from medtune.data.rows import padded
from medtune.data.templates import Template, encode_conversation, get_template, stop_token_ids
from medtune.data.tokenizer import decode, load_tokenizer
from medtune.model.adapters import load_with_adapters
from medtune.model.load import DTYPES
from medtune.rundir import ModelSource, describe_source
from medtune.stages import get_stage


@dataclass(frozen=True)
class GenerationSettings:
    """How replies are generated. Greedy unless ``do_sample``; a server reads these as its limits and each
    request's sampling as its own settings (temperature 0 there means greedy)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7  # sampling only
    top_p: float = 0.9  # sampling only
    seed: int | None = None  # sampling only: the torch seed set before generating
    batch_size: int = 8  # prompts generated together (a server: requests decoded together)

    def check(self) -> GenerationSettings:
        """Settings a person gave on a command line, or one error naming the option."""
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise MedtuneError("--batch-size and --max-new-tokens must be at least 1")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise MedtuneError("--temperature must be positive and --top-p in (0, 1] when sampling")
        return self

    def recorded(self) -> dict[str, Any]:
        """What the replies depend on, as a results file's fingerprint records it (not the batch size)."""
        sampling = {"temperature": self.temperature, "top_p": self.top_p} if self.do_sample else {}
        seed = {"seed": self.seed} if self.do_sample and self.seed is not None else {}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, **sampling, **seed}

    def seed_torch(self) -> None:
        """Before the first batch: sampling with a seed draws the same replies for the same prompts and batches."""
        if self.do_sample and self.seed is not None:
            torch.manual_seed(self.seed)

    def generate_kwargs(self, pad_id: int, stop_ids: list[int]) -> dict[str, Any]:
        """transformers' generate() keywords: the one copy of them."""
        kwargs: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, pad_token_id=pad_id, eos_token_id=stop_ids
        )
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


def add_generation_arguments(
    parser: argparse.ArgumentParser, max_new_tokens: int, sampling: bool = True, batches: bool = True
) -> None:
    """--max-new-tokens; --batch-size with ``batches``; --do-sample/--temperature/--top-p/--seed with ``sampling``."""
    if batches:
        parser.add_argument("--batch-size", type=int, default=GenerationSettings.batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    if sampling:
        parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
        parser.add_argument("--temperature", type=float, default=GenerationSettings.temperature)
        parser.add_argument("--top-p", type=float, default=GenerationSettings.top_p)
        parser.add_argument("--seed", type=int, help="with --do-sample: the torch seed set before generating")


def generation_from_args(args: argparse.Namespace) -> GenerationSettings:
    """The settings add_generation_arguments' options describe (greedy where sampling was not offered)."""
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        do_sample=getattr(args, "do_sample", False),
        temperature=getattr(args, "temperature", GenerationSettings.temperature),
        top_p=getattr(args, "top_p", GenerationSettings.top_p),
        seed=getattr(args, "seed", None),
        batch_size=getattr(args, "batch_size", GenerationSettings.batch_size),
    )


@dataclass
class InferenceModel:
    """A model ready to generate in its training format: the ids of a prompt are those training used."""

    model: Any  # a transformers causal LM, adapters merged, in eval mode on its device
    tokenizer: PreTrainedTokenizerBase
    template: Template
    system_prompt: str | None
    source: ModelSource

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_conversation(self.tokenizer, self.template, messages, self.system_prompt)[0]

    # Facts of the template, worked out once: split() runs for every reply and serve's stream for every delta.
    @cached_property
    def thinks(self) -> bool:
        """The template has a <think> block: replies are split into reasoning and answer."""
        return isinstance(self.template, JinjaTemplate) and "<think>" in template_source(self.tokenizer, self.template)

    @cached_property
    def prompt_opens_think(self) -> bool:
        """The generation prompt already writes <think> (DeepSeek-R1): replies start inside the block."""
        return self.thinks and prompt_opens_think(self.tokenizer, self.template, self.system_prompt)

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning, answer) of a generated reply; (None, text) for a template without reasoning."""
        return split_reasoning(text, self.prompt_opens_think) if self.thinks else (None, text)

    @cached_property
    def stop_ids(self) -> list[int]:
        """EOS, the template's end markers, and the model's own generation_config eos ids."""
        return stop_token_ids(self.tokenizer, self.template, self.model.generation_config.eos_token_id)


def load_model_for_inference(
    source: str, dtype: str, template_name: str | None, trust_remote_code: bool = False
) -> InferenceModel:
    """A run dir, merged dir or hub id, with its template, system prompt and tokenizer; adapters merged in memory."""
    info = describe_source(source)
    if not get_stage(info.stage).generates:
        raise MedtuneError(f"{source}: a reward model scores replies, it does not generate them")
    template_name = template_name or info.template
    if template_name is None:
        raise MedtuneError(f"{source}: no chat template is recorded for this model; pass --template")
    trust_remote_code = trust_remote_code or info.trust_remote_code
    tokenizer = load_tokenizer(info.tokenizer, info.tokenizer_kind, trust_remote_code)
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    model = load_with_adapters(AutoModelForCausalLM, info, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return InferenceModel(model.to(device).eval(), tokenizer, get_template(template_name), info.system_prompt, info)


@torch.no_grad()
def generate_batch(loaded: InferenceModel, batch: list[dict], settings: GenerationSettings) -> list[str]:
    """Left-padded batch generation from the training-format prompt ids; stops at the template's end."""
    model, tokenizer = loaded.model, loaded.tokenizer
    encoded = [loaded.prompt_ids(p["messages"]) for p in batch]
    input_ids, attention = padded(encoded, tokenizer.pad_token_id, left=True, device=model.device)
    kwargs = settings.generate_kwargs(tokenizer.pad_token_id, loaded.stop_ids)
    output = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
    return [decode(tokenizer, row[input_ids.shape[1] :].tolist()).strip() for row in output]


def generate_all(loaded: InferenceModel, prompts: list[dict], settings: GenerationSettings) -> list[str]:
    """Replies to every prompt, settings.batch_size at a time (seeded once, before the first batch)."""
    settings.seed_torch()
    replies: list[str] = []
    for start in range(0, len(prompts), settings.batch_size):
        replies += generate_batch(loaded, prompts[start : start + settings.batch_size], settings)
    return replies
