"""`medtune chat MODEL_OR_RUN_DIR`: a terminal conversation in the training format, history kept."""

from __future__ import annotations

import argparse
import sys

from medtune.console import quiet_libraries, run_command
from medtune.model import DTYPES

HELP = "commands: /reset starts a new conversation, /exit (or Ctrl-D) quits, /help shows this"


def converse(loaded, lines, out, max_new_tokens: int) -> int:
    """Read user lines, answer each with the whole history; returns the number of replies."""
    from medtune.predict import generate_batch

    messages: list[dict[str, str]] = []
    replies = 0
    for line in lines:
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text in ("", "/help"):
            print(HELP, file=out, flush=True)
            continue
        if text == "/reset":
            messages = []
            print("(new conversation)", file=out, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        reasoning, reply = loaded.split(
            generate_batch(loaded, [{"messages": messages}], max_new_tokens, False, 1.0, 1.0)[0]
        )
        messages.append({"role": "assistant", "content": reply})
        if reasoning:
            print(f"(思考) {reasoning}", file=out, flush=True)
        print(f"医生> {reply if reply else '(empty reply: the model ended at once)'}", file=out, flush=True)
        replies += 1
        if out.isatty():
            print("你> ", end="", file=out, flush=True)
    return replies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune chat", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="run directory, merged model directory, or hub id / model path")
    parser.add_argument("--template", help="chat template, when the model does not record one")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    quiet_libraries()
    args = parser.parse_args(argv)

    def work() -> int:
        from medtune.predict import load_model_for_inference

        loaded = load_model_for_inference(args.model, args.dtype, args.template)
        print(f"medtune chat with {args.model} (template {loaded.template.name}); {HELP}", flush=True)
        if sys.stdout.isatty():
            print("你> ", end="", flush=True)
        converse(loaded, sys.stdin, sys.stdout, args.max_new_tokens)
        return 0

    try:
        return run_command(work, args.debug)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
