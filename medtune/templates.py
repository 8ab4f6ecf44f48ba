"""Chat templates as data, and the one function that turns messages into ids and labels.

Each turn is tokenized on its own, so that a marker such as ``答：`` always maps
to the same ids whatever text stands next to it; the BOS/EOS tokens are added
as ids, never as text, so a tokenizer that splits ``</s>`` into pieces cannot
break the stop signal. The same template is also written as a Jinja
``chat_template`` into the saved tokenizer, so inference elsewhere
(``tokenizer.apply_chat_template``) renders exactly the training format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Sequence

IGNORE_INDEX = -100
Message = dict[str, str]


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    user: str  # a user turn, ending with the assistant's cue: {content} is the text
    assistant: str = "{content}"  # the reply; the EOS token follows it and is trained
    system: str = ""  # the system block; "" = this template has none
    default_system: str = ""  # used when the conversation has no system message
    system_in_first_user: bool = False  # llama2: the system block sits inside the first [INST]
    bos: Literal["none", "once", "every_turn"] = "once"
    turn_separator: str = ""  # text between a reply's EOS and the next user turn
    source: str = ""  # where the format comes from


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            name="ziya",
            user="<human>:{content}\n<bot>:",
            source="Ziya-LLaMA-13B model card; Zhongjing",
        ),
        ChatTemplate(
            name="chatmed",
            user="问：\n{content}\n答：\n",
            assistant="{content}\n",
            source="ChatMed-Consult/TCM; PromptCBLUE LLaMA baseline (<s>问：\\n{q}\\n答：\\n{a}\\n</s>)",
        ),
        ChatTemplate(
            name="chinese_alpaca",
            system="{content}\n\n",
            default_system="Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.",
            user="### Instruction:\n{content}\n\n### Response: ",
            turn_separator="\n\n",
            source="Chinese-LLaMA-Alpaca v1/Plus",
        ),
        ChatTemplate(
            name="llama2_zh",
            system="<<SYS>>\n{content}\n<</SYS>>\n\n",
            default_system="You are a helpful assistant. 你是一个乐于助人的助手。",
            system_in_first_user=True,
            user="[INST] {content} [/INST] ",
            bos="every_turn",
            source="Chinese-LLaMA-Alpaca-2",
        ),
        ChatTemplate(
            name="chatml",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            default_system="You are a helpful assistant.",
            user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
            assistant="{content}<|im_end|>",
            bos="none",
            turn_separator="\n",
            source="ChatML (Qwen and others)",
        ),
    )
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}") from None


# A segment is (text or a special token name, trained?). BOS/EOS are names, not text.
Segment = tuple[str, bool]
BOS, EOS = "\x00bos", "\x00eos"


def render_segments(
    template: ChatTemplate,
    messages: Sequence[Message],
    system_prompt: str | None = None,
    train_on: Literal["all_turns", "last_turn"] = "all_turns",
) -> list[Segment]:
    """Lay out a conversation as segments; the trailing user turn (if any) is the generation prompt."""
    messages = list(messages)
    system = system_prompt if system_prompt is not None else template.default_system
    if messages and messages[0]["role"] == "system":
        system = messages[0]["content"]
        messages = messages[1:]
    _check_alternation(messages)
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    system_block = template.system.format(content=system) if template.system and system else ""
    segments: list[Segment] = []
    if template.bos == "once":
        segments.append((BOS, False))
    if system_block and not template.system_in_first_user:
        segments.append((system_block, False))
    for i, message in enumerate(messages):
        if message["role"] == "user":
            if i > 0 and template.turn_separator:
                segments.append((template.turn_separator, False))
            if template.bos == "every_turn":
                segments.append((BOS, False))
            content = message["content"]
            if i == 0 and template.system_in_first_user:
                content = system_block + content
            segments.append((template.user.format(content=content), False))
        else:
            trained = train_on == "all_turns" or i == last_reply
            segments.append((template.assistant.format(content=message["content"]), trained))
            segments.append((EOS, trained))
    return segments


def _check_alternation(messages: Sequence[Message]) -> None:
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise ValueError(f"message {i}: expected role {expected!r}, got {message.get('role')!r} (turns must alternate user/assistant)")


def encode_conversations(
    tokenizer, template: ChatTemplate, conversations: Sequence[Sequence[Message]], system_prompt: str | None = None,
    train_on: Literal["all_turns", "last_turn"] = "all_turns",
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (-100 where no loss) for many conversations, with one batched tokenizer call."""
    layouts = [render_segments(template, messages, system_prompt, train_on) for messages in conversations]
    texts = list({text for layout in layouts for text, _ in layout if text not in (BOS, EOS)})
    pieces = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else {}
    pieces[BOS] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pieces[EOS] = [tokenizer.eos_token_id]
    encoded = []
    for layout in layouts:
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in layout:
            piece = pieces[text]
            ids.extend(piece)
            labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
        encoded.append((ids, labels))
    return encoded


def encode_conversation(
    tokenizer, template: ChatTemplate, messages: Sequence[Message], system_prompt: str | None = None,
    train_on: Literal["all_turns", "last_turn"] = "all_turns",
) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where no loss) for one conversation."""
    return encode_conversations(tokenizer, template, [messages], system_prompt, train_on)[0]


def render_text(template: ChatTemplate, messages: Sequence[Message], bos_token: str, eos_token: str,
                system_prompt: str | None = None) -> str:
    """The conversation as one string, with BOS/EOS written as the tokenizer's token strings."""
    special = {BOS: bos_token or "", EOS: eos_token}
    return "".join(special.get(text, text) for text, _ in render_segments(template, messages, system_prompt))


def jinja_chat_template(template: ChatTemplate, system_prompt: str | None = None) -> str:
    """The same format as a Jinja template for ``tokenizer.chat_template``."""
    q = lambda s: json.dumps(s, ensure_ascii=False)  # noqa: E731 - a Jinja string literal
    user_before, user_after = template.user.split("{content}")
    reply_before, reply_after = template.assistant.split("{content}")
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
        if not template.system_in_first_user:
            parts.append(sys_block)
    user = "{{ " + q(user_before) + " }}"
    if template.system_in_first_user:
        user += "{% if loop.first %}" + sys_block + "{% endif %}"
    user += "{{ message['content'] + " + q(user_after) + " }}"
    parts.append(
        "{% for message in ns.msgs %}{% if message['role'] == 'user' %}"
        + ("{% if not loop.first %}{{ " + q(template.turn_separator) + " }}{% endif %}" if template.turn_separator else "")
        + ("{{ bos_token }}" if template.bos == "every_turn" else "")
        + user
        + "{% else %}{{ " + q(reply_before) + " + message['content'] + " + q(reply_after) + " + eos_token }}"
        + "{% endif %}{% endfor %}"
    )
    return "".join(parts)
