"""python -m data_prep SOURCE INPUT... --out OUT.jsonl [--dev-ratio R --seed S] [--max-length N] [--dedup]

A mistake the user can fix (a missing input, an --out that cannot be written, a full disk) is one line
``error: …`` with exit 2, through medtune's run_command like every medtune command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep import alpaca, chatmed, cmtmedqa, exams, huatuo, medical_o1, preference, promptcblue, sharegpt, text
from data_prep.pipeline import Options, output_paths, read_items, run
from medtune.console import run_command

# source name → (converter, reader, one-line description)
SOURCES = {
    "promptcblue": (promptcblue.convert, read_items, "PromptCBLUE train/dev/test JSON lines"),
    "chatmed-consult": (chatmed.make_converter("chatmed-consult"), read_items, "ChatMed_Consult {query, response}"),
    "chatmed-tcm": (chatmed.make_converter("chatmed-tcm"), read_items, "ChatMed_TCM {query, response}"),
    "cmtmedqa": (cmtmedqa.convert, read_items, "CMtMedQA multi-turn (JSON array or lines)"),
    "huatuo": (huatuo.convert, read_items, "Huatuo26M-style, instruction/output lists"),
    "preference": (preference.convert, read_items, "pairwise {instruction, input, output: [chosen, rejected]}"),
    "text": (text.convert, text.read_text_or_jsonl, "raw text: .txt paragraphs or {text} lines"),
    "alpaca": (alpaca.convert, read_items, "{instruction, input, output, history?}"),
    "sharegpt": (sharegpt.convert, read_items, "{conversations: [{from, value}]}"),
    "medical-o1": (
        medical_o1.convert,
        read_items,
        "HuatuoGPT-o1 medical-o1-reasoning-SFT {Question, Complex_CoT, Response}",
    ),
    # medical exam benchmarks → exam records for `medtune eval exam`
    "cmb": (exams.convert_cmb, read_items, "CMB-Exam JSON (exam_type, exam_class, question_type, option, answer)"),
    "cmexam": (exams.convert_cmexam, exams.read_csv_items, "CMExam CSV (Question, Options, Answer, Explanation)"),
    "medqa-mcmle": (exams.convert_medqa, read_items, "MedQA Mainland JSONL (question, options, answer_idx)"),
    "cmmlu": (exams.convert_cmmlu, exams.read_csv_items, "CMMLU subject CSVs (medical subjects unless --subjects)"),
    "ceval": (exams.convert_ceval, exams.read_csv_items, "C-Eval subject CSVs, val/dev (medical unless --subjects)"),
}


def positive_int(text: str) -> int:
    """A limit of 1 or more: 0 or a negative number would read as "no limit" or "keep nothing", both surprises."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {value}); leave the option out for no limit")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Convert a corpus into medtune's instruction JSONL.",
        epilog="sources: " + "; ".join(f"{name}: {desc}" for name, (_, _, desc) in SOURCES.items()),
    )
    parser.add_argument("source", choices=list(SOURCES))
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    parser.add_argument("--out", required=True, type=Path, help="output JSONL (dev and skip report go beside it)")
    parser.add_argument("--dev-ratio", type=float, default=0.0, help="fraction of records written to OUT.dev.jsonl")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/dev split")
    parser.add_argument("--max-length", type=positive_int, help="skip records longer than this many characters")
    parser.add_argument("--dedup", action="store_true", help="skip records whose content repeats an earlier one")
    parser.add_argument("--max-per-task", type=positive_int, help="promptcblue: keep at most N records per task")
    parser.add_argument(
        "--strip-answer-cue",
        action="store_true",
        help="promptcblue: remove '答：' from prompts, as the LLaMA baseline does",
    )
    parser.add_argument(
        "--subjects",
        help="cmmlu/ceval: comma-separated subject file names to keep, or 'all' (default: the medical subjects)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    args = parser.parse_args(argv)
    if not 0.0 <= args.dev_ratio < 1.0:
        parser.error("--dev-ratio must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: convert_corpus(args), args.debug)


def convert_corpus(args: argparse.Namespace) -> int:
    """Run the conversion and print its report; 1 when nothing at all was written (likely the wrong source)."""
    convert, reader, _ = SOURCES[args.source]
    options = Options(
        dev_ratio=args.dev_ratio,
        seed=args.seed,
        max_length=args.max_length,
        dedup=args.dedup,
        max_per_task=args.max_per_task,
        strip_answer_cue=args.strip_answer_cue,
        subjects=tuple(s.strip() for s in args.subjects.split(",") if s.strip()) if args.subjects else None,
    )
    report = run(convert, args.inputs, args.out, options, reader=reader, progress=not args.quiet)
    print(report.summary())
    if sum(report.skipped.values()):
        print(f"skipped records are listed in {output_paths(args.out)['skipped']}")
    if not report.written:
        print(
            f"error: no record was written from {', '.join(map(str, args.inputs))} "
            f"(is {args.source} the right source?)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
