"""The `medtune` command: one subcommand per step of the pipeline."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def _train(argv: list[str]) -> int:
    from medtune.train import main

    return main(argv)


def _merge(argv: list[str]) -> int:
    from medtune.merge import main

    return main(argv)


def _predict(argv: list[str]) -> int:
    from medtune.predict import main

    return main(argv)


def _score(argv: list[str]) -> int:
    from medtune.score import main

    return main(argv)


def _chat(argv: list[str]) -> int:
    from medtune.chat import main

    return main(argv)


# name → (one-line help, entry point taking the remaining arguments)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "train": ("train a LoRA adapter from a recipe, in this process "
              "(multi-GPU: accelerate launch medtune/train.py RECIPE)", _train),
    "merge": ("merge LoRA adapters into the base and save a plain model", _merge),
    "predict": ("batched, resumable generation with the training template", _predict),
    "score": ("score predictions (promptcblue: the official track's scoring)", _score),
    "chat": ("talk to a run directory or merged model in the terminal", _chat),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="medtune", description="Fine-tune Chinese medical LLMs with LoRA/QLoRA.",
        epilog="Run `medtune COMMAND --help` for a command's options.",
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND",
                        help="; ".join(f"{name}: {help_}" for name, (help_, _) in sorted(COMMANDS.items())))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    return COMMANDS[args.command][1](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
