"""Chat templates written in Jinja: a model's own (``data.template: model``) and medtune's named ones for
today's bases (Qwen2.5, Qwen3, Llama 3.x, DeepSeek-R1 distills, GLM-4, Gemma), with ids and labels
taken from the rendering itself.

Why this way: for a byte-level BPE model the ids of a conversation are the tokenizer's ids of the text
its chat template renders, ``apply_chat_template(messages, tokenize=True)``. medtune tokenizes exactly
that text, so training ids cannot drift from the model's own format. Which tokens are trained is not
written in most templates (few have ``{% generation %}`` marks), so it is derived by rendering growing
prefixes of the conversation:

- a reply starts where the generation prompt before it (``messages[:i]`` with ``add_generation_prompt``)
  stops agreeing with the conversation rendered up to and including it (``messages[:i+1]``): the ids of
  the prompt are the ids predict and serve start from, the ones after it are the model's to produce;
- it ends where ``messages[:i+1]`` ends: the reply, the template's end marker, and what the template
  writes after it (chatml's ``<|im_end|>\\n``);
- that rendering must be a prefix of the whole conversation's ids. Where it is not, the template writes
  this reply otherwise once later turns follow (Qwen3 and GLM-4 drop the reasoning of earlier replies):
  such a reply is left untrained, since what the conversation holds is not what the model produces
  when it writes that turn.

Named templates are medtune's own Jinja text (tools left out); the tests prove each gives the ids of the
published template it names, on that family's real vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from medtune.console import MedtuneError
from medtune.data.tokenizer import encode_texts

IGNORE_INDEX = -100
Message = dict[str, str]
MODEL = "model"  # data.template: model — the chat template the base model ships
FIXED_DATE = "26 Jul 2024"  # Llama 3.x templates print a date: the templates' own fallback, so ids never change
_DIR = Path(__file__).with_name("chat_templates")


@dataclass(frozen=True)
class JinjaTemplate:
    name: str
    source: str = ""  # the Jinja text; "" = the tokenizer's own chat template (data.template: model)
    variables: tuple[tuple[str, Any], ...] = ()  # template variables medtune sets (enable_thinking, date_string)
    stop: tuple[str, ...] = ()  # tokens that end a reply besides EOS (named templates; a model's are derived)
    final_stop: str = ""  # appended (trained) after a conversation's last reply whose template writes no end
    reference: str = ""  # whose format this is, and how it was checked
    labels: str = "each reply and its end marker trained; prompts masked"


def _named(name: str, **fields: Any) -> JinjaTemplate:
    return JinjaTemplate(name=name, source=(_DIR / f"{fields.pop('file', name)}.jinja").read_text("utf-8"), **fields)


@cache
def named_jinja_templates() -> dict[str, JinjaTemplate]:
    qwen3_labels = (
        "each reply with its <think> block and <|im_end|>\\n trained; replies before the last user message are "
        "written without reasoning once a later turn follows, so in multi-turn records only the replies after "
        "the last user message are trained"
    )
    templates = (
        _named(
            "qwen2_5",
            stop=("<|im_end|>", "<|endoftext|>"),
            reference="Qwen2.5-Instruct's chat_template (Qwen/Qwen2.5-7B-Instruct): chatml with Qwen's default "
            "system message",
        ),
        _named(
            "qwen3",
            stop=("<|im_end|>", "<|endoftext|>"),
            reference="Qwen3's chat_template (Qwen/Qwen3-0.6B), thinking mode",
            labels=qwen3_labels,
        ),
        _named(
            "qwen3_nothink",
            file="qwen3",
            variables=(("enable_thinking", False),),
            stop=("<|im_end|>", "<|endoftext|>"),
            reference="Qwen3's chat_template (Qwen/Qwen3-0.6B) with enable_thinking=False: the generation prompt "
            "holds an empty <think> block",
            labels=qwen3_labels,
        ),
        _named(
            "llama3",
            variables=(("date_string", FIXED_DATE),),
            stop=("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"),
            reference=f"Llama 3.1/3.2/3.3 Instruct's chat_template (meta-llama), date_string fixed to {FIXED_DATE!r}",
        ),
        _named(
            "deepseek_r1",
            stop=("<｜end▁of▁sentence｜>",),
            reference="DeepSeek-R1-Distill-Qwen/-Llama's chat_template (deepseek-ai): replies keep only the text "
            "after </think>, so no reasoning is rendered; the generation prompt opens <think>",
        ),
        _named(
            "glm4",
            stop=("<|user|>", "<|observation|>", "<|endoftext|>"),
            final_stop="<|user|>",
            reference="GLM-4.5/4.6's chat_template (zai-org): [gMASK]<sop>, <|role|>\\ncontent, a <think> block "
            "in every reply; replies end when the model writes <|user|>",
            labels="each reply with its <think> block trained, and the <|user|> that follows it (GLM's stop "
            "token, as THUDM's GLM-4 finetune trains it; after the last reply, where the template writes "
            "nothing, medtune appends it: the one place ids go beyond apply_chat_template); earlier replies "
            "lose their reasoning once a later turn follows, so only replies after the last user message are "
            "trained in multi-turn records",
        ),
        _named(
            "gemma",
            stop=("<end_of_turn>", "<eos>"),
            reference="Gemma 2's chat_template (google/gemma-2-2b-it); no system role",
        ),
    )
    return {t.name: t for t in templates}


def model_template() -> JinjaTemplate:
    return JinjaTemplate(
        name=MODEL,
        variables=(("date_string", FIXED_DATE),),
        reference="the chat template the base model ships (tokenizer_config.json or chat_template.jinja)",
    )


def template_source(tokenizer, template: JinjaTemplate) -> str:
    """The Jinja text to render: the named template's, or the tokenizer's own."""
    if template.source:
        return template.source
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one is the chat template
        own = own.get("default")
    if not own:
        where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise MedtuneError(
            f"data.template: model: {where} ships no chat template (no chat_template in tokenizer_config.json, no "
            "chat_template.jinja); name a template instead (medtune template list)"
        )
    return own


def prompt_opens_think(tokenizer, template, system_prompt: str | None) -> bool:
    """The generation prompt already writes <think> (DeepSeek-R1): replies start inside the block."""
    if not isinstance(template, JinjaTemplate) or "<think>" not in template_source(tokenizer, template):
        return False
    probe = template_messages([{"role": "user", "content": "?"}], system_prompt)
    return render(tokenizer, template, probe, add_generation_prompt=True).rstrip().endswith("<think>")


def template_messages(messages: Sequence[Message], system_prompt: str | None) -> list[dict[str, Any]]:
    """medtune messages as templates read them: reasoning as OpenAI's ``reasoning_content``; a system
    prompt put first when the conversation has none."""
    out: list[dict[str, Any]] = []
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        out.append({"role": "system", "content": system_prompt})
    for message in messages:
        item: dict[str, Any] = {"role": message["role"], "content": message["content"]}
        if message.get("reasoning") is not None:
            item["reasoning_content"] = message["reasoning"]
        out.append(item)
    return out


def render(tokenizer, template: JinjaTemplate, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
    """The template's text for ``messages`` (already in template form), as apply_chat_template renders it."""
    try:
        return tokenizer.apply_chat_template(
            list(messages),
            chat_template=template_source(tokenizer, template),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **dict(template.variables),
        )
    except MedtuneError:
        raise
    except Exception as exc:  # jinja2's TemplateError and raise_exception(...) inside the template
        raise MedtuneError(f"template {template.name}: cannot render this conversation: {exc}") from None


def encode_jinja(
    tokenizer,
    template: JinjaTemplate,
    conversations: Sequence[Sequence[Message]],
    system_prompt: str | None = None,
    train_on: Literal["all_turns", "last_turn"] = "all_turns",
) -> list[tuple[list[int], list[int]]]:
    """Ids (= the template's rendering tokenized) and labels of each conversation; one ending with a user
    turn is a generation prompt (rendered with ``add_generation_prompt``, nothing trained)."""
    plans = [_plan(tokenizer, template, conv, system_prompt) for conv in conversations]
    texts = sorted({text for plan in plans for text in plan.texts()})
    ids_of = dict(zip(texts, encode_texts(tokenizer, texts), strict=True))
    stops = set(template_stop_ids(tokenizer, template)) if template.stop else set()
    final_stop = tokenizer.get_vocab().get(template.final_stop) if template.final_stop else None
    return [plan.encode(ids_of, train_on, stops, template, final_stop) for plan in plans]


@dataclass
class _Plan:
    """The renderings one conversation needs: the whole, and per reply its prompt and its own end."""

    full: str
    replies: list[tuple[str, str, bool]]  # (generation prompt, conversation up to this reply, has reasoning)

    def texts(self) -> list[str]:
        return [self.full] + [t for prompt, upto, _ in self.replies for t in (prompt, upto)]

    def encode(
        self, ids_of: dict[str, list[int]], train_on: str, stops: set[int], template: JinjaTemplate, final_stop
    ) -> tuple[list[int], list[int]]:
        ids = list(ids_of[self.full])
        labels = [IGNORE_INDEX] * len(ids)
        for n, (prompt_text, upto_text, has_reasoning) in enumerate(self.replies):
            if train_on == "last_turn" and n != len(self.replies) - 1:
                continue
            prompt, upto = ids_of[prompt_text], ids_of[upto_text]
            start = _common_prefix(prompt, upto)
            if has_reasoning and start < len(prompt):
                raise MedtuneError(
                    f"template {template.name}: its generation prompt does not lead into a reply with reasoning "
                    "as it writes one (enable_thinking=false closes the <think> block): train reasoning records "
                    "with the thinking variant (e.g. qwen3)"
                )
            if upto != ids[: len(upto)]:
                continue  # written otherwise once later turns follow: see the module's docstring
            if start >= len(upto):
                raise MedtuneError(
                    f"template {template.name}: reply {n + 1} cannot be told apart from its prompt "
                    "(its rendering adds no tokens after the generation prompt); this template cannot be "
                    "split into turns"
                )
            end = len(upto)
            if end < len(ids) and ids[end] in stops and not stops.intersection(ids[start:end]):
                end += 1  # a reply with no end marker of its own (GLM): the stop token after it is learned
            labels[start:end] = ids[start:end]
        if self.replies and template.final_stop and final_stop is not None:
            ids.append(final_stop)
            labels.append(final_stop)
        return ids, labels


def _plan(tokenizer, template: JinjaTemplate, conversation: Sequence[Message], system_prompt: str | None) -> _Plan:
    messages = template_messages(conversation, system_prompt)
    if not messages or messages[-1]["role"] != "assistant":
        return _Plan(render(tokenizer, template, messages, add_generation_prompt=True), [])
    full = render(tokenizer, template, messages, add_generation_prompt=False)
    replies = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(tokenizer, template, messages[:i], add_generation_prompt=True)
            upto = full if i == len(messages) - 1 else render(tokenizer, template, messages[: i + 1], False)
            replies.append((prompt, upto, bool(message.get("reasoning_content"))))
    last = messages[-1]
    plain = {k: v for k, v in last.items() if k != "reasoning_content"}
    if last.get("reasoning_content") and render(tokenizer, template, [*messages[:-1], plain], False) == full:
        raise MedtuneError(
            f"template {template.name} renders no reasoning (the record's last reply has one): train with a "
            "template that has a reasoning block (qwen3, glm4, or the model's own if it has one), or drop the "
            "'reasoning' field"
        )
    return _Plan(full, replies)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def template_stop_ids(tokenizer, template: JinjaTemplate) -> list[int]:
    """The ids that end a reply: the named template's stop tokens that are in this vocabulary, or, for a
    model's own template, the end marker its replies are written with (found by rendering two replies
    and taking the special token of what they share at their end)."""
    if template.stop:
        vocab = tokenizer.get_vocab()
        return [vocab[token] for token in template.stop if token in vocab]
    probe = [{"role": "user", "content": "你好"}]
    ends = []
    for reply in ("A", "B"):
        ids, labels = encode_jinja(tokenizer, template, [probe + [{"role": "assistant", "content": reply}]])[0]
        ends.append([i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    shared: list[int] = []
    for a, b in zip(reversed(ends[0]), reversed(ends[1]), strict=False):
        if a != b:
            break
        shared.insert(0, a)
    special = set(tokenizer.all_special_ids) | {
        i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False)
    }
    return [i for i in shared if i in special][:1]


def saved_chat_template(tokenizer, template: JinjaTemplate, system_prompt: str | None) -> str:
    """The Jinja text saved with an adapter or merged model: the template with medtune's variables and
    system prompt set at its top, so that ``apply_chat_template`` elsewhere renders what training did."""
    head = [  # JSON literals are Jinja literals: "text", true, false
        "{%- if " + key + " is not defined -%}{%- set " + key + " = " + _jinja_literal(value) + " -%}{%- endif -%}"
        for key, value in template.variables
    ]
    if system_prompt is not None:
        head.append(
            "{%- if not messages or messages[0]['role'] != 'system' -%}{%- set messages = [{'role': 'system', "
            "'content': " + _jinja_literal(system_prompt) + "}] + messages -%}{%- endif -%}"
        )
    return "".join(head) + template_source(tokenizer, template)


def _jinja_literal(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def split_reasoning(text: str, prompt_opens_think: bool = False) -> tuple[str | None, str]:
    """(reasoning, answer) of a generated reply: what stands in its <think> block, and what follows it.
    ``prompt_opens_think``: the generation prompt already wrote <think> (DeepSeek-R1), so the reply starts
    inside the block. A reply with no </think> is all answer (or, while the block is open, all reasoning)."""
    body = text.lstrip()
    if body.startswith("<think>"):
        body, prompt_opens_think = body[len("<think>") :], True
    if "</think>" not in body:
        return (body.strip(), "") if prompt_opens_think and text.strip() else (None, text.strip())
    reasoning, answer = body.split("</think>", 1)
    return reasoning.strip(), answer.strip()


def first_difference(tokenizer, ours: list[int], theirs: list[int]) -> str:
    """Where two id lists part, as a person reads it."""
    n = _common_prefix(ours, theirs)
    piece = lambda ids: repr(tokenizer.decode(ids[n : n + 1])) + f" ({ids[n]})" if n < len(ids) else "the end"  # noqa: E731
    return f"token {n}: {piece(ours)} where the model's template has {piece(theirs)}"


def streamed_parts(text: str, prompt_opens_think: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a reply still being generated, as far as they can be sent now: what could
    still turn out to be ``<think>``/``</think>`` or trailing white space is held back, so that each part
    only grows and ends as :func:`split_reasoning` ends it."""
    body = text.lstrip()
    if not prompt_opens_think and "<think>".startswith(body):
        return "", ""  # the reply may be opening its <think> block
    if body.startswith("<think>"):
        body, prompt_opens_think = body[len("<think>") :], True
    if "</think>" in body:
        reasoning, answer = body.split("</think>", 1)
        return reasoning.strip(), answer.strip()
    if not prompt_opens_think:
        return "", body.rstrip()
    held = next((n for n in range(len("</think>"), 0, -1) if body.endswith("</think>"[:n])), 0)
    return body[: len(body) - held].strip(), ""
