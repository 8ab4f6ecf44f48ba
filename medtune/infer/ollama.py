"""An Ollama Modelfile whose TEMPLATE renders a run's training format, in Ollama's Go template syntax.

Ollama renders a conversation with Go's text/template over ``.Messages`` (each with ``.Role`` and
``.Content``; system messages among them) and ``.System`` (the request's system message, or the
Modelfile's SYSTEM when there is none), then tokenizes the text, adding BOS itself when the GGUF says so
(``tokenizer.ggml.add_bos_token``). So the template writes exactly what medtune's Jinja template writes
(:func:`medtune.data.templates.jinja_chat_template`) except a leading BOS. Every piece of template text is
a Go string literal inside an action, so no whitespace trimming or stray newline can change it.
"""

from __future__ import annotations

import json

from medtune.console import MedtuneError
from medtune.data.templates import CALL, ChatTemplate

MARKER = "# Written by medtune export ollama"  # the first line: an earlier export medtune may replace


def go_template(template: ChatTemplate, bos_token: str, eos_token: str) -> str:
    """The Go template of a medtune template (one line: text between actions would be output)."""

    def text(value: str) -> str:
        value = value.replace(CALL, "")
        return "{{ " + json.dumps(value, ensure_ascii=False) + " }}" if value else ""

    user_before, user_after = template.user.split("{content}")
    reply_before, reply_after = template.assistant.split("{content}")
    if not template.reply_joins_prompt:
        reply_before = template.reply_text_prefix + reply_before
    system = ""
    if template.system:
        system_before, system_after = template.system.split("{content}")
        system = "{{ if $.System }}" + text(system_before) + "{{ $.System }}" + text(system_after) + "{{ end }}"
    later_turn = text(template.turn_separator) + (text(bos_token) if template.bos == "every_turn" else "")
    user = "{{ if not $first }}" + later_turn + "{{ end }}" if later_turn else ""
    if system and not template.system_in_first_user:
        user += "{{ if $first }}" + system + "{{ end }}"
    user += text(user_before)
    if system and template.system_in_first_user:  # llama2: [INST] <<SYS>>…<</SYS>>\n\n{q} [/INST]
        user += "{{ if $first }}" + system + "{{ end }}"
    user += "{{ .Content }}" + text(user_after) + "{{ $first = false }}"
    reply = text(reply_before) + "{{ .Content }}" + text(reply_after) + (text(eos_token) if template.eos else "")
    return (
        '{{ $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}'
        + user
        + '{{ else if eq .Role "assistant" }}'
        + reply
        + "{{ end }}{{ end }}"
    )


def modelfile(
    template: ChatTemplate, system: str, bos_token: str, eos_token: str, stops: list[str], about: str
) -> str:
    """The Modelfile beside ``model.gguf``: FROM, TEMPLATE, SYSTEM and one stop line per end marker."""
    body = go_template(template, bos_token, eos_token)
    for what, value in (("the template", body), ("the system prompt", system)):
        if '"""' in value:
            raise MedtuneError(f'{what} contains """, which a Modelfile cannot quote')
    lines = [
        f"{MARKER} from {about}. Create the model with:",
        "#   ollama create NAME -f Modelfile",
        "FROM ./model.gguf",
        f'TEMPLATE """{body}"""',
    ]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    return "\n".join(lines) + "\n"
