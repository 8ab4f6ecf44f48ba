"""`medtune template show NAME --tokenizer PATH`: see exactly which ids a model is trained on.

    medtune template list
    medtune template show llama2_zh --tokenizer PATH [--messages FILE] [--system TEXT]

Prints the conversation as the template renders it, then every token: position, id, piece, and a `*`
where the token carries loss. FILE is a JSON list of messages, or a JSONL/JSON record with "messages".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medtune.console import MedtuneError, quiet_libraries, run_command
from medtune.templates import IGNORE_INDEX, TEMPLATES, encode_conversation, get_template, render_text

SAMPLE = [
    {"role": "user", "content": "我最近总是头痛，还有点发烧，需要去医院吗？"},
    {"role": "assistant", "content": "建议先测量体温并多休息。"},
    {"role": "user", "content": "体温38.5℃，可以吃布洛芬吗？"},
    {"role": "assistant", "content": "可以按说明书服用布洛芬退热；持续高热请就医。"},
]


def read_messages(path: Path) -> list[dict[str, str]]:
    text = path.read_text(encoding="utf-8").strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = json.loads(text.splitlines()[0])  # the first record of a JSONL file
    messages = value.get("messages") if isinstance(value, dict) else value
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise MedtuneError(f'{path}: expected a list of messages or a record with "messages"')
    return messages


def show(name: str, tokenizer_path: str, messages: list[dict[str, str]], system: str | None, kind: str) -> str:
    from medtune.tokenizer import load_tokenizer, tokenizer_kind

    template = get_template(name)
    tokenizer = load_tokenizer(tokenizer_path, kind)
    ids, labels = encode_conversation(tokenizer, template, messages, system)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    lines = [
        f"template {name}: {template.reference}",
        f"labels: {template.labels}",
        f"tokenizer: {tokenizer_path} ({tokenizer_kind(tokenizer)}, {len(tokenizer)} tokens)",
        "",
        "text:",
        render_text(template, messages, tokenizer.bos_token, tokenizer.eos_token, system),
        "",
        f"{len(ids)} tokens, {sum(label != IGNORE_INDEX for label in labels)} trained (*):",
    ]
    for i, (token, piece, label) in enumerate(zip(ids, pieces, labels, strict=True)):
        lines.append(f"{i:5d} {'*' if label != IGNORE_INDEX else ' '} {token:7d}  {piece!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune template", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the templates and whose format each reproduces")
    show_parser = sub.add_parser("show", help="render a conversation and list its ids and trained tokens")
    show_parser.add_argument("name", choices=sorted(TEMPLATES))
    show_parser.add_argument("--tokenizer", required=True, help="model or tokenizer directory, or hub id")
    show_parser.add_argument("--messages", type=Path, help="JSON list of messages or a record (default: a sample)")
    show_parser.add_argument("--system", help="system prompt (as data.system_prompt)")
    show_parser.add_argument("--tokenizer-kind", default="auto", choices=["auto", "sentencepiece", "fast"])
    quiet_libraries()
    args = parser.parse_args(argv)
    if args.action == "list":
        for template in TEMPLATES.values():
            print(f"{template.name:15s} {template.reference}")
        return 0

    def work() -> int:
        messages = read_messages(args.messages) if args.messages else SAMPLE
        print(show(args.name, args.tokenizer, messages, args.system, args.tokenizer_kind))
        return 0

    return run_command(work, also=(OSError, json.JSONDecodeError))
