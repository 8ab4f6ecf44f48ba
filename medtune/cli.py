"""The `medtune` command: one subcommand per step of the pipeline."""

from __future__ import annotations

import argparse
import importlib
import sys

# name → (one-line help, module whose main(argv) runs it). Imported only when chosen: each pulls in torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "train a LoRA adapter from a recipe, in this process (multi-GPU: accelerate launch medtune/train.py RECIPE)",
        "medtune.train",
    ),
    "data": ("data checks: overlap (which benchmark items a training set already holds)", "medtune.data.overlap"),
    "export": (
        "a GGUF file for llama.cpp, or a GGUF and Modelfile for Ollama, in the run's training format",
        "medtune.infer.export",
    ),
    "merge": ("merge LoRA adapters into the base and save a plain model", "medtune.infer.merge"),
    "predict": ("batched, resumable generation with the training template", "medtune.infer.predict"),
    "reward": ("score preference pairs or replies with a trained reward model", "medtune.infer.reward"),
    "score": ("score predictions (promptcblue: the official track's scoring)", "medtune.evaluate.score"),
    "eval": (
        "evaluate a model: medical exams (exam) or dialogue quality and safety with an LLM judge (dialogue)",
        "medtune.evaluate",
    ),
    "report": ("one self-contained HTML page of a run and its evaluations", "medtune.evaluate.report"),
    "chat": ("talk to a run directory or merged model in the terminal", "medtune.infer.chat"),
    "serve": ("an OpenAI-compatible API and a chat page for a run, in its training format", "medtune.infer.serving"),
    "template": (
        "show a chat template's text, ids and trained tokens on a real tokenizer",
        "medtune.infer.inspect_template",
    ),
    "apply-delta": (
        "rebuild a model released as delta weights (Ziya-LLaMA-13B-v1) from its base",
        "medtune.infer.apply_delta",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="medtune",
        description="Fine-tune Chinese medical LLMs with LoRA/QLoRA.",
        epilog="Run `medtune COMMAND --help` for a command's options.",
    )
    parser.add_argument(
        "command",
        choices=sorted(COMMANDS),
        metavar="COMMAND",
        help="; ".join(f"{name}: {help_}" for name, (help_, _) in sorted(COMMANDS.items())),
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    return importlib.import_module(COMMANDS[args.command][1]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
