"""`medtune template`: see exactly which ids a model is trained and prompted on, and check them.

    medtune template list
    medtune template show NAME|model --tokenizer DIR [--messages FILE] [--system TEXT] [--json OUT.jsonl]
    medtune template check DIR [--template NAME]

``show`` prints each conversation as the template renders it, then every token: position, id, piece, and a
`*` where the token carries loss; with ``--json`` it writes one line per conversation instead: exactly the
``ids`` and ``labels`` training uses and the ``prompt_ids`` predict, chat and serve start from, so another
tool's ids can be compared with medtune's. FILE is JSONL of records (or message lists), or one JSON record.

``check`` compares medtune's ids with the chat template DIR ships, through transformers' own
``apply_chat_template(tokenize=True)``, on built-in conversations (Chinese, system prompt, multi-turn,
reasoning): "N of N identical" or the first difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from medtune.console import MedtuneError, quiet_libraries, run_command
from medtune.data.jinja_templates import JinjaTemplate, first_difference, render, template_messages
from medtune.data.records import RecordError, validate_record
from medtune.data.templates import (
    IGNORE_INDEX,
    Template,
    encode_conversation,
    get_template,
    render_text,
    template_names,
)
from medtune.data.tokenizer import decode, load_tokenizer, tokenizer_kind
from medtune.rundir import describe_source

SAMPLE = [
    {"role": "user", "content": "我最近总是头痛，还有点发烧，需要去医院吗？"},
    {"role": "assistant", "content": "建议先测量体温并多休息。"},
    {"role": "user", "content": "体温38.5℃，可以吃布洛芬吗？"},
    {"role": "assistant", "content": "可以按说明书服用布洛芬退热；持续高热请就医。"},
]
CHECKS: list[tuple[str, list[dict[str, str]]]] = [
    ("single turn", SAMPLE[:2]),
    ("multi-turn", SAMPLE),
    ("system prompt", [{"role": "system", "content": "你是一名耐心的全科医生。"}, *SAMPLE[:2]]),
    ("system, multi-turn", [{"role": "system", "content": "请用中文回答。"}, *SAMPLE]),
    ("generation prompt", SAMPLE[:3]),
    (
        "reasoning",
        [
            SAMPLE[0],
            {
                "role": "assistant",
                "content": "建议先测量体温并多休息。",
                "reasoning": "头痛伴发热，先区分感冒与其他感染，需要体温数据。",
            },
        ],
    ),
    (
        "reasoning, multi-turn",
        [
            *SAMPLE[:3],
            {"role": "assistant", "content": SAMPLE[3]["content"], "reasoning": "38.5℃属中度发热，布洛芬可用。"},
        ],
    ),
]


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """A JSON record or message list, or JSONL of them (blank lines skipped); errors name file and line."""
    if not path.is_file():
        raise MedtuneError(f"--messages {path}: file not found")
    text = path.read_text(encoding="utf-8").strip()
    try:
        values = [(1, json.loads(text))]
    except json.JSONDecodeError:
        values = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    values.append((lineno, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise MedtuneError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
    conversations = []
    for lineno, value in values:
        messages = value.get("messages") if isinstance(value, dict) else value
        try:  # the record contract training reads: roles, alternation, string contents, reasoning
            validate_record({"id": "-", "source": "-", "messages": messages})
        except RecordError as exc:
            raise MedtuneError(f'{path}:{lineno}: {exc} (a list of messages or a record with "messages")') from None
        conversations.append(messages)
    if not conversations:
        raise MedtuneError(f"{path}: no conversation in it")
    return conversations


def encoded(tokenizer, template: Template, messages: list[dict[str, str]], system: str | None) -> dict[str, Any]:
    """What training and generation use for one conversation: ids, labels, and the generation prompt's ids."""
    ids, labels = encode_conversation(tokenizer, template, messages, system)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    prompt = messages[: replies[-1]] if replies and replies[-1] == len(messages) - 1 else messages
    return {"ids": ids, "labels": labels, "prompt_ids": encode_conversation(tokenizer, template, prompt, system)[0]}


def rendered_text(tokenizer, template: Template, messages: list[dict[str, str]], system: str | None) -> str:
    if isinstance(template, JinjaTemplate):
        generation = messages[-1]["role"] != "assistant"
        return render(tokenizer, template, template_messages(messages, system), generation)
    return render_text(template, messages, tokenizer.bos_token, tokenizer.eos_token, system)


def show(name: str, tokenizer, messages: list[dict[str, str]], system: str | None) -> str:
    template = get_template(name)
    out = encoded(tokenizer, template, messages, system)
    ids, labels = out["ids"], out["labels"]
    lines = [
        f"template {name}: {template.reference}",
        f"labels: {template.labels}",
        f"tokenizer: {tokenizer.name_or_path} ({tokenizer_kind(tokenizer)}, {len(tokenizer)} tokens)",
        "",
        "text:",
        rendered_text(tokenizer, template, messages, system),
        "",
        f"{len(ids)} tokens, {sum(label != IGNORE_INDEX for label in labels)} trained (*); "
        f"the generation prompt is the first {len(out['prompt_ids'])}:",
    ]
    byte_level = tokenizer_kind(tokenizer) == "fast"
    for i, (token, piece, label) in enumerate(zip(ids, tokenizer.convert_ids_to_tokens(ids), labels, strict=True)):
        line = f"{i:5d} {'*' if label != IGNORE_INDEX else ' '} {token:7d}  {piece!r}"
        text = decode(tokenizer, [token], skip_special_tokens=False) if byte_level else piece
        lines.append(line + (f"  = {text!r}" if text != piece else ""))  # byte-level pieces ('éĹ®') as text
    return "\n".join(lines)


def check(tokenizer, name: str) -> tuple[int, int, list[str]]:
    """(identical, compared, notes): medtune's ids and prompt ids against apply_chat_template's own."""
    template = get_template(name)
    variables = dict(template.variables)
    identical, compared, notes = 0, 0, []
    for label, messages in CHECKS:
        try:
            ours = encoded(tokenizer, template, messages, None)
        except MedtuneError as exc:
            notes.append(f"{label}: not compared ({exc})")
            continue
        reference = template_messages(messages, None)
        generation = messages[-1]["role"] != "assistant"
        theirs = _apply(tokenizer, reference, generation, variables)
        prompt_messages = reference if generation else reference[:-1]
        theirs_prompt = _apply(tokenizer, prompt_messages, True, variables)
        ids = ours["ids"][:-1] if getattr(template, "final_stop", "") and not generation else ours["ids"]
        compared += 1
        if ids == theirs and ours["prompt_ids"] == theirs_prompt:
            identical += 1
        elif ids != theirs:
            notes.append(f"{label}: ids differ at {first_difference(tokenizer, ids, theirs)}")
        else:
            notes.append(
                f"{label}: prompt ids differ at {first_difference(tokenizer, ours['prompt_ids'], theirs_prompt)}"
            )
    return identical, compared, notes


def _apply(tokenizer, messages: list[dict[str, Any]], generation: bool, variables: dict[str, Any]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation, **variables)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def write_json(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write atomically; replace only a file this command wrote (its lines hold ids, labels, prompt_ids)."""
    if path.is_dir() or (path.exists() and not _written_by_show(path)):
        raise MedtuneError(
            f"--json {path}: exists and is not ids written by medtune template show; choose another path"
        )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


def _written_by_show(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as handle:
            first = json.loads(handle.readline() or "null")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(first, dict) and set(first) == {"ids", "labels", "prompt_ids"}


def what_to_show(args: argparse.Namespace):
    """(template name, tokenizer, system prompt): a template with --tokenizer, or a run's / merged model's own."""
    if args.name in template_names():
        if not args.tokenizer:
            raise MedtuneError(f"template show {args.name}: give --tokenizer DIR_OR_HUB_ID (or a run directory)")
        return args.name, load_tokenizer(args.tokenizer, args.tokenizer_kind), args.system
    if not Path(args.name).is_dir():
        known = ", ".join(template_names())
        raise MedtuneError(f"template show {args.name}: neither a template ({known}) nor a run or model directory")
    info = describe_source(args.name)
    if info.template is None:
        raise MedtuneError(f"{args.name}: records no chat template; name one: medtune template show NAME --tokenizer")
    tokenizer = load_tokenizer(args.tokenizer or info.tokenizer, info.tokenizer_kind or args.tokenizer_kind)
    return info.template, tokenizer, args.system if args.system is not None else info.system_prompt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune template", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the templates and whose format each reproduces")
    show_parser = sub.add_parser("show", help="render conversations and list their ids and trained tokens")
    show_parser.add_argument(
        "name",
        help="a template (medtune template list; model: the tokenizer's own), or a run or merged directory: its "
        "tokenizer, template and system prompt, what it trains on and is served with",
    )
    show_parser.add_argument("--tokenizer", help="model or tokenizer directory, or hub id (with a template name)")
    show_parser.add_argument("--messages", type=Path, help="JSONL of records or message lists (default: a sample)")
    show_parser.add_argument("--system", help="system prompt (as data.system_prompt)")
    show_parser.add_argument("--json", type=Path, metavar="OUT", help="write ids, labels, prompt_ids per line")
    show_parser.add_argument("--tokenizer-kind", default="auto", choices=["auto", "sentencepiece", "fast"])
    check_parser = sub.add_parser("check", help="compare medtune's ids with the model's own chat template")
    check_parser.add_argument("model", help="model or tokenizer directory that ships a chat template")
    check_parser.add_argument("--template", default="model", choices=template_names(), help="medtune's side")
    check_parser.add_argument("--tokenizer-kind", default="auto", choices=["auto", "sentencepiece", "fast"])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    quiet_libraries()
    args = parser.parse_args(argv)
    if args.action == "list":
        for name in template_names():
            print(f"{name:15s} {get_template(name).reference}")
        return 0

    def work() -> int:
        if args.action == "check":
            tokenizer = load_tokenizer(args.model, args.tokenizer_kind)
            if not getattr(tokenizer, "chat_template", None):
                raise MedtuneError(f"{args.model}: ships no chat template to compare with")
            identical, compared, notes = check(tokenizer, args.template)
            for note in notes:
                print(note)
            print(f"{identical} of {compared} identical (medtune's {args.template} vs {args.model}'s own template)")
            return 0 if compared and identical == compared else 1
        name, tokenizer, system = what_to_show(args)
        conversations = read_conversations(args.messages) if args.messages else [SAMPLE]
        if args.json:
            rows = [encoded(tokenizer, get_template(name), c, system) for c in conversations]
            write_json(args.json, rows)
            print(f"wrote ids, labels and prompt_ids of {len(rows)} conversations to {args.json}")
            return 0
        print("\n\n".join(show(name, tokenizer, c, system) for c in conversations))
        return 0

    return run_command(work, args.debug, also=(OSError, json.JSONDecodeError))


if __name__ == "__main__":
    sys.exit(main())
