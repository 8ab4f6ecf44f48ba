"""Chat templates as data, and the one function that turns messages into the authors' ids and labels.

A template is right when its **ids** equal what the model's authors trained on, not only its text.
With SentencePiece the ids of a string depend on where the tokenizer call starts: every call puts a
dummy-prefix ``▁`` in front of its text. So a template records, besides its text, which parts the
authors tokenized in one call and which in separate calls:

- a reply is its own call (its dummy prefix is part of what the model learned), unless
  ``reply_joins_prompt`` (ChatMed/PromptCBLUE tokenized prompt + reply as one string);
- ``CALL`` inside a template string starts a new call (Zhongjing encoded every piece alone);
- BOS/EOS are ids, never text, and always end a call.

The same layout gives the prediction prompt (everything before the reply), so training ids and
inference ids cannot drift apart. The template is also saved as a Jinja ``chat_template``; its text
is tokenized by ``apply_chat_template`` as one string, which gives the same generation-prompt ids
for every template on a conversation's first turn (tests check this on the real tokenizers).

Each template names its reference in ``reference`` and where medtune's labels differ in ``labels``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from medtune.console import MedtuneError
from medtune.data.jinja_templates import (
    IGNORE_INDEX,
    MODEL,
    JinjaTemplate,
    encode_jinja,
    first_difference,
    model_template,
    named_jinja_templates,
    saved_chat_template,
    template_stop_ids,
)
from medtune.data.tokenizer import encode_texts

CALL = "\x1f"  # in a template string: the authors tokenized what follows in a separate call
Message = dict[str, str]


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    user: str  # a user turn, ending with the assistant's cue: {content} is the text
    assistant: str = "{content}"  # the reply, trained
    system: str = ""  # the system block; "" = this template has none
    default_system: str = ""  # used when the conversation has no system message
    system_in_first_user: bool = False  # llama2: the system block sits inside the first [INST]
    bos: Literal["none", "once", "every_turn"] = "once"
    eos: bool = True  # the tokenizer's EOS follows every reply (trained); chatml ends replies with a marker
    turn_separator: str = ""  # text before every later user turn (before its BOS)
    reply_joins_prompt: bool = False  # the authors tokenized a turn's prompt and reply as one string
    reply_text_prefix: str = ""  # what one-string renderings write before a reply for its dummy prefix
    stop: str = ""  # a marker token that ends a reply besides EOS (chatml: <|im_end|>)
    reference: str = ""  # whose ids this reproduces
    labels: str = "prompt masked, every reply and its end token trained"  # how medtune labels; why


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            name="chatmed",
            user="问：\n{content}\n答：\n",
            assistant="{content}\n",
            reply_joins_prompt=True,
            reference="PromptCBLUE LLaMA baseline (michael-wzhu/PromptCBLUE src/ft_llama_lora): "
            "tokenizer('<s>问：\\n{q}\\n答：\\n' + '{a}\\n</s>', add_special_tokens=False); the first "
            "len(tokenizer(prompt)) labels masked. ChatMed (michael-wzhu/ChatMed) tokenizes the same string",
            labels="as PromptCBLUE: the prompt masked. ChatMed trains every token of the string and packs "
            "samples into blocks (data.packing: concat gives its blocks); its ids are the same",
        ),
        ChatTemplate(
            name="chinese_alpaca",
            system="{content}\n\n",
            default_system="Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.",
            user="### Instruction:\n{content}\n\n### Response: ",
            turn_separator="\n\n",
            reference="Chinese-LLaMA-Alpaca (ymcui, scripts/training/build_dataset.py): source = preamble + "
            "instruction, tokenized with BOS; target = tokenizer(output + '</s>', add_special_tokens=False), so "
            "the reply starts with its own dummy prefix. Multi-turn (not in the reference): later turns "
            "'\\n\\n### Instruction:…' after the EOS, each prompt and reply a call of its own",
        ),
        ChatTemplate(
            name="llama2_zh",
            system="<<SYS>>\n{content}\n<</SYS>>\n\n",
            default_system="You are a helpful assistant. 你是一个乐于助人的助手。",
            system_in_first_user=True,
            user="[INST] {content} [/INST]",
            reply_text_prefix=" ",
            bos="every_turn",
            reference="Chinese-LLaMA-Alpaca-2 (ymcui, scripts/training/build_dataset.py): source "
            "'[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{instruction} [/INST]' with BOS, target = "
            "tokenizer(output + '</s>', add_special_tokens=False); multi-turn as its gradio demo writes it: "
            "'… [/INST] {a}</s><s>[INST] {q} [/INST]'",
        ),
        ChatTemplate(
            name="ziya",
            system="{content}" + CALL + "\n" + CALL,
            user="<human>" + CALL + ":{content}\n" + CALL + "<bot>" + CALL + ":",
            reply_text_prefix=" ",
            turn_separator="\n",
            bos="every_turn",
            reference="Zhongjing (SupritYoung/Zhongjing, LLaMA-Efficient-Tuning 'ziya' template): prefix = BOS "
            "(+ system + '\\n') on the first turn, '\\n' + BOS on later turns; query = <human> + ':{q}\\n' + "
            "<bot> + ':'; answer = '{a}' + EOS; every piece encoded alone with add_special_tokens=False. "
            "<human>/<bot> are single tokens in Ziya's vocabulary; in one without them they are encoded as text",
        ),
        ChatTemplate(
            name="chatml",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            default_system="You are a helpful assistant.",
            user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
            assistant="{content}<|im_end|>\n",
            bos="none",
            eos=False,
            stop="<|im_end|>",
            reference="Qwen (QwenLM finetune script, Qwen2-Instruct chat_template): "
            "'<|im_start|>{role}\\n{content}<|im_end|>\\n' per message, a default system message, no EOS",
            labels="the reply with its '<|im_end|>\\n' trained; Qwen's script also trains the markers of user turns",
        ),
    )
}


Template = ChatTemplate | JinjaTemplate


def template_names() -> list[str]:
    """Every name data.template takes: the 2023 templates, the named Jinja ones, and ``model``."""
    return [*TEMPLATES, *named_jinja_templates(), MODEL]


def get_template(name: str) -> Template:
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name == MODEL:
        return model_template()
    if name in named_jinja_templates():
        return named_jinja_templates()[name]
    raise MedtuneError(f"unknown chat template {name!r}; known: {', '.join(template_names())}")


# A part of a laid-out conversation: (text, trained). BOS and EOS are names, never text; CALL
# (alone) ends a tokenizer call. Consecutive text parts are one call.
Part = tuple[str, bool]
BOS, EOS = "\x00bos", "\x00eos"
SPECIALS = (BOS, EOS, CALL)


def render_parts(
    template: ChatTemplate,
    messages: Sequence[Message],
    system_prompt: str | None = None,
    train_on: Literal["all_turns", "last_turn"] = "all_turns",
) -> list[Part]:
    """Lay out a conversation; a trailing user turn (if any) is the generation prompt."""
    messages = list(messages)
    system = system_prompt if system_prompt is not None else template.default_system
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    _check_alternation(messages)
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    has_system = bool(template.system and system)
    parts: list[Part] = [(BOS, False)] if template.bos == "once" else []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            trained = train_on == "all_turns" or i == last_reply
            if not template.reply_joins_prompt:
                parts.append((CALL, False))
            parts += _fill(template.assistant, message["content"], trained)
            parts.append((EOS, trained) if template.eos else (CALL, False))
            continue
        if i > 0:
            parts += _fill(template.turn_separator, "", False)
        if template.bos == "every_turn":
            parts.append((BOS, False))
        if i == 0 and has_system and template.system_in_first_user:  # llama2: [INST] <<SYS>>…<</SYS>>\n\n{q}
            system_block = "".join(text for text, _ in _fill(template.system, system, False))
            parts += _fill(template.user, system_block + message["content"], False)
            continue
        if i == 0 and has_system:
            parts += _fill(template.system, system, False)
        parts += _fill(template.user, message["content"], False)
    return parts


def _fill(template_text: str, content: str, trained: bool) -> list[Part]:
    """A template string as parts: split at its CALL marks first, then ``{content}`` put in (without
    str.format, which user text with braces would break)."""
    parts: list[Part] = []
    for i, piece in enumerate(template_text.split(CALL)):
        if i:
            parts.append((CALL, False))
        piece = piece.replace("{content}", content)
        if piece:
            parts.append((piece, trained))
    return parts


def _check_alternation(messages: Sequence[Message]) -> None:
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise MedtuneError(
                f"message {i}: expected role {expected!r}, got {message.get('role')!r} "
                "(turns must alternate user/assistant)"
            )


# A tokenizer call: its text, and how much of its start is not trained (the prompt of a joined turn).
Call = tuple[str, str]


def _calls(parts: Sequence[Part]) -> list[tuple[str, Call | str, bool]]:
    """Group parts into tokenizer calls and special tokens: [(kind, call or name, trained)]."""
    out: list[tuple[str, Call | str, bool]] = []
    text, untrained, trained = "", "", False
    for piece, is_trained in list(parts) + [(CALL, False)]:
        if piece in SPECIALS:
            if text:
                out.append(("call", (text, untrained if trained else text), trained))
            text, untrained, trained = "", "", False
            if piece != CALL:
                out.append(("special", piece, is_trained))
            continue
        if is_trained and not trained:
            untrained, trained = text, True
        elif not is_trained and trained:
            raise ValueError("a template call may not continue untrained text after a reply")
        text += piece
    return out


def encode_conversations(
    tokenizer,
    template: Template,
    conversations: Sequence[Sequence[Message]],
    system_prompt: str | None = None,
    train_on: Literal["all_turns", "last_turn"] = "all_turns",
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (-100 where no loss) for many conversations, with one batched tokenizer call.

    A call whose start is prompt and whose end is reply (``reply_joins_prompt``) is tokenized whole, and
    its first len(tokenize(prompt)) labels are masked, as PromptCBLUE's baseline does. A Jinja template
    (a model's own or a named one) is rendered and its labels derived: see medtune.data.jinja_templates.
    """
    if isinstance(template, JinjaTemplate):
        return encode_jinja(tokenizer, template, conversations, system_prompt, train_on)
    for messages in conversations:
        if any(m.get("reasoning") for m in messages):
            raise MedtuneError(
                f"template {template.name} has no place for reasoning (a record's reply has a 'reasoning' field): "
                "use a template with a reasoning block (qwen3, glm4, or the model's own), or drop the field"
            )
    layouts = [_calls(render_parts(template, messages, system_prompt, train_on)) for messages in conversations]
    texts = {text for layout in layouts for kind, item, _ in layout if kind == "call" for text in item if text}
    texts = list(texts)
    pieces = dict(zip(texts, encode_texts(tokenizer, texts), strict=True))
    pieces[""] = []
    special = {
        BOS: [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [],
        EOS: [tokenizer.eos_token_id],
    }
    encoded = []
    for layout in layouts:
        ids: list[int] = []
        labels: list[int] = []
        for kind, item, trained in layout:
            if kind == "special":
                piece, masked = special[item], 0 if trained else len(special[item])
            else:
                text, untrained = item
                piece = pieces[text]
                masked = len(pieces[untrained]) if trained else len(piece)
            ids.extend(piece)
            labels.extend([IGNORE_INDEX] * masked + piece[masked:])
        encoded.append((ids, labels))
    return encoded


def encode_conversation(
    tokenizer,
    template: Template,
    messages: Sequence[Message],
    system_prompt: str | None = None,
    train_on: Literal["all_turns", "last_turn"] = "all_turns",
) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where no loss) for one conversation."""
    return encode_conversations(tokenizer, template, [messages], system_prompt, train_on)[0]


def stop_token_ids(tokenizer, template: Template, model_stops: Sequence[int] | int | None = ()) -> list[int]:
    """The ids that end a reply in generation: EOS, the template's end marker(s), and every id of the model's
    own ``generation_config.eos_token_id`` (Llama 3: <|eot_id|> and <|end_of_text|>), in that order."""
    ids = [tokenizer.eos_token_id]
    extra = [model_stops] if isinstance(model_stops, int) else list(model_stops or ())
    if isinstance(template, JinjaTemplate):
        ids += template_stop_ids(tokenizer, template)
    elif template.stop:
        marker = tokenizer.convert_tokens_to_ids(template.stop)
        if marker is None or marker == tokenizer.unk_token_id:
            raise MedtuneError(
                f"template {template.name}: {template.stop} is not a token of this tokenizer; "
                f"a {template.name} model's vocabulary has it"
            )
        ids.append(marker)
    return list(dict.fromkeys(i for i in ids + extra if i is not None))


def chat_template_text(tokenizer, template: Template, system_prompt: str | None) -> str:
    """The Jinja chat template saved beside an adapter or merged model: what training rendered."""
    if isinstance(template, JinjaTemplate):
        return saved_chat_template(tokenizer, template, system_prompt)
    return jinja_chat_template(template, system_prompt)


def render_text(
    template: ChatTemplate,
    messages: Sequence[Message],
    bos_token: str,
    eos_token: str,
    system_prompt: str | None = None,
) -> str:
    """The conversation as one string, BOS/EOS written as the tokenizer's token strings (what the saved
    Jinja template renders)."""
    special = {BOS: bos_token or "", EOS: eos_token, CALL: ""}
    parts = render_parts(template, messages, system_prompt)
    out, after_call = [], False
    for text, trained in parts:
        if text == CALL:
            after_call = True
            continue
        if after_call and trained and template.reply_text_prefix:
            out.append(template.reply_text_prefix)
        after_call = False
        out.append(special.get(text, text))
    return "".join(out)


def jinja_chat_template(template: ChatTemplate, system_prompt: str | None = None) -> str:
    """The same format as a Jinja template for ``tokenizer.chat_template`` (text as :func:`render_text`)."""
    q = lambda s: json.dumps(s.replace(CALL, ""), ensure_ascii=False)  # noqa: E731 - a Jinja string literal
    user_before, user_after = template.user.split("{content}")
    reply_before, reply_after = template.assistant.split("{content}")
    if not template.reply_joins_prompt:
        reply_before = template.reply_text_prefix + reply_before
    system = system_prompt if system_prompt is not None else template.default_system
    parts = [
        "{% set ns = namespace(system=" + q(system) + ", msgs=messages) %}",
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set ns.system = messages[0]['content'] %}{% set ns.msgs = messages[1:] %}{% endif %}",
    ]
    if template.bos == "once":
        parts.append("{{ bos_token }}")
    sys_block = ""
    if template.system:
        sys_before, sys_after = template.system.split("{content}")
        sys_block = "{% if ns.system %}{{ " + q(sys_before) + " + ns.system + " + q(sys_after) + " }}{% endif %}"
    separator = (
        "{% if not loop.first %}{{ " + q(template.turn_separator) + " }}{% endif %}" if template.turn_separator else ""
    )
    user = separator + ("{{ bos_token }}" if template.bos == "every_turn" else "")
    if not template.system_in_first_user:
        user += "{% if loop.first %}" + sys_block + "{% endif %}"
    user += "{{ " + q(user_before) + " }}"
    if template.system_in_first_user:
        user += "{% if loop.first %}" + sys_block + "{% endif %}"
    user += "{{ message['content'] + " + q(user_after) + " }}"
    reply = (
        "{{ "
        + q(reply_before)
        + " + message['content'] + "
        + q(reply_after)
        + (" + eos_token" if template.eos else "")
        + " }}"
    )
    parts.append(
        "{% for message in ns.msgs %}{% if message['role'] == 'user' %}"
        + user
        + "{% else %}"
        + reply
        + "{% endif %}{% endfor %}"
    )
    return "".join(parts)


def warn_if_not_models_own(tokenizer, template: Template, system_prompt: str | None, warn) -> None:
    """A model that ships a chat template was trained on its ids: say where a recipe's other template gives
    other ids, on a sample conversation (first differing token)."""
    if template.name == MODEL or not getattr(tokenizer, "chat_template", None):
        return
    sample = [
        {"role": "user", "content": "我头痛三天了，怎么办？"},
        {"role": "assistant", "content": "建议先测量血压。"},
    ]
    try:
        ours = encode_conversation(tokenizer, template, sample, system_prompt)[0]
        theirs = encode_conversation(tokenizer, model_template(), sample, system_prompt)[0]
    except MedtuneError as exc:
        warn(f"warning: cannot compare data.template {template.name} with the model's own chat template: {exc}")
        return
    if ours != theirs:
        warn(
            f"warning: data.template {template.name} gives other ids than the chat template this model ships, "
            f"on a sample conversation ({first_difference(tokenizer, ours, theirs)}); "
            "data.template: model trains on the model's own"
        )
