"""`medtune chat MODEL_OR_RUN_DIR`: a terminal conversation in the training format, history kept."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import TextIO

from medtune.console import quiet_libraries, run_command
from medtune.infer.generation import (
    GenerationSettings,
    InferenceModel,
    add_generation_arguments,
    generate_batch,
    generation_from_args,
    load_model_for_inference,
)
from medtune.model.load import DTYPES

HELP = "commands: /reset starts a new conversation, /exit (or Ctrl-D) quits, /help shows this"


def converse(loaded: InferenceModel, lines: Iterable[str], out: TextIO, generation: GenerationSettings) -> int:
    """Read user lines, answer each with the whole history; returns the number of replies. A line starting
    with / is a command (an unknown one is named, never sent to the model as a question)."""
    messages: list[dict[str, str]] = []
    replies = 0
    for line in lines:
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text in ("", "/help"):
            say(out, HELP)
        elif text == "/reset":
            messages = []
            say(out, "(new conversation)")
        elif text.startswith("/"):
            say(out, f"unknown command {text.split()[0]}; {HELP}")
        else:
            messages.append({"role": "user", "content": text})
            reasoning, reply = loaded.split(generate_batch(loaded, [{"messages": messages}], generation)[0])
            messages.append({"role": "assistant", "content": reply})
            if reasoning:
                say(out, f"(思考) {reasoning}", prompt=False)
            say(out, f"医生> {reply if reply else '(empty reply: the model ended at once)'}")
            replies += 1
    return replies


def say(out: TextIO, text: str, prompt: bool = True) -> None:
    """A line, then (on a terminal) the prompt again: after a reply, a command or a help text alike."""
    print(text, file=out, flush=True)
    if prompt and out.isatty():
        print("你> ", end="", file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune chat", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="run directory, merged model directory, or hub id / model path")
    parser.add_argument("--template", help="chat template, when the model does not record one")
    add_generation_arguments(parser, max_new_tokens=256, batches=False)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    quiet_libraries()
    args = parser.parse_args(argv)

    def work() -> int:
        generation = generation_from_args(args).check()
        loaded = load_model_for_inference(args.model, args.dtype, args.template)
        print(f"medtune chat with {args.model} (template {loaded.template.name}); {HELP}", flush=True)
        if sys.stdout.isatty():
            print("你> ", end="", flush=True)
        generation.seed_torch()
        converse(loaded, sys.stdin, sys.stdout, generation)
        return 0

    try:
        return run_command(work, args.debug)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
