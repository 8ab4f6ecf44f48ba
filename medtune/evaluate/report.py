"""`medtune report RUN [--eval DIR ...] --out report.html`: one page a person can read.

The page is self-contained (no CDN, no script): the run's recipe, its loss curves as inline SVG, the
exam tables and dialogue metrics of each `medtune eval` directory given, the judge's scores, and a few
generations side by side with their references. It opens from a mail attachment or a file share.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from html import escape
from pathlib import Path
from typing import Any

from medtune.console import MedtuneError, run_command
from medtune.data.records import iter_json_lines
from medtune.rundir import RunDir, atomic_write_text, loss_figure

SAMPLES = 5  # generations shown per dialogue evaluation
GENERATOR = '<meta name="generator" content="medtune report">'  # how a page medtune may replace is known

STYLE = """
body { font-family: "Noto Sans CJK SC", "PingFang SC", "Microsoft YaHei", sans-serif; margin: 2em auto;
       max-width: 1100px; color: #1d2330; line-height: 1.5; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #d8dee9; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0 1.4em; } caption { text-align: left; font-weight: bold; }
th, td { border: 1px solid #d8dee9; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #eef2f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #66708a; } .sample td { width: 33%; white-space: pre-wrap; font-size: 0.92em; }
"""


def table(rows: list[list[Any]], header: list[str], caption: str = "", cls: str = "") -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f'<td class="num">{value:.4f}</td>'
        if isinstance(value, int):
            return f'<td class="num">{value}</td>'
        return f"<td>{escape('' if value is None else str(value))}</td>"

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f'<table class="{cls}">{cap}{thead}<tbody>{body}</tbody></table>'


def flatten(value: Any, prefix: str = "") -> list[list[Any]]:
    if isinstance(value, dict):
        return [row for key, v in value.items() for row in flatten(v, f"{prefix}{key}.")]
    return [[prefix.rstrip("."), json.dumps(value, ensure_ascii=False) if isinstance(value, list) else value]]


def run_section(run: RunDir) -> str:
    info, recipe = run.read_info(), run.read_recipe()
    rows = run.read_metrics()
    fig = loss_figure(rows)
    svg = io.StringIO()
    no_metadata = {"Creator": None, "Date": None, "Format": None, "Type": None}  # no RDF block, no date
    fig.savefig(svg, format="svg", metadata=no_metadata)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    facts = [
        ["stage", recipe.train.stage],
        ["base model", info.get("base_model")],
        ["chat template", recipe.data.template],
        ["finished", "yes" if info.get("finished") else "no"],
        ["optimizer steps", max((r["step"] for r in rows), default=0)],
        ["train loss, first → last", f"{losses[0]:.4f} → {losses[-1]:.4f}" if losses else "-"],
        ["last eval loss", f"{evals[-1]:.4f}" if evals else "-"],
    ]
    return (
        f"<h2>Run</h2>{table(facts, ['', ''])}"
        f"<h3>Loss</h3><figure>{svg.getvalue().split('?>', 1)[-1]}</figure>"
        f"<details><summary>Recipe</summary>{table(flatten(recipe.to_dict()), ['key', 'value'])}</details>"
    )


def contamination_note(scores: dict) -> str:
    """A line under a section's title: how many items the model's training data holds (or that nobody checked)."""
    found = scores.get("contamination")
    if not found:
        return '<p class="muted">contamination: not checked (no training files known: --train-files)</p>'
    return (
        f'<p class="muted">contamination: {found["contaminated"]} of {found["items"]} items share a '
        f"{found['n']}-character gram with the {found['training_records']:,} training records "
        f"({found['near_duplicates']} near-duplicates)</p>"
    )


def exam_section(name: str, scores: dict) -> str:
    parts = [f"<h2>Exam: {escape(name)}</h2>", contamination_note(scores)]
    mode = scores.get("settings", {}).get("mode", "")
    extraction = scores.get("extraction")
    if isinstance(extraction, dict):
        rules = "; ".join(f"{k}: {v}" for k, v in extraction.items())
        chosen = scores.get("settings", {}).get("extractor", "official")
        which = "official extraction" if chosen in (None, "official") else f"extraction --extractor {chosen}"
        parts.append(f'<p class="muted">mode {escape(mode)}; {escape(which)} — {escape(rules)}</p>')
    else:
        parts.append(f'<p class="muted">mode {escape(mode)}: candidate answers scored by log-likelihood</p>')
    summary = []
    for source, s in scores["benchmarks"].items():
        summary.append(
            [
                source,
                s["questions"],
                s["accuracy"],
                s.get("medtune_average", s.get("average", "-")),
                s.get("strict_accuracy", "-"),
                s.get("no_answer", "-"),
                s.get("empty_replies", "-"),
                s.get("f1", "-"),
            ]
        )
    header = [
        "benchmark",
        "questions",
        "accuracy",
        "medtune's mean of categories",
        "strict",
        "no answer",
        "empty replies",
        "weighted F1",
    ]
    parts.append(table(summary, header, "Scores"))
    for source, s in scores["benchmarks"].items():
        per = s.get("accuracy_per_subcategory") or s.get("accuracy_per_category", {})
        parts.append(table([[k, v] for k, v in per.items()], ["category", "accuracy"], f"{source} by category"))
    return "".join(parts)


def dialogue_section(name: str, scores: dict, judgements: list[dict]) -> str:
    parts = [f"<h2>Dialogue: {escape(name)}</h2>", contamination_note(scores)]
    keys = ["bleu_1", "bleu_2", "bleu_4", "rouge_1", "rouge_2", "rouge_l", "distinct_1", "distinct_2", "mean_length"]
    rows = []
    for subset in ("all", "dialogue", "safety"):
        s = scores.get(subset, {})
        if s.get("dialogues"):
            rows.append([subset, s["dialogues"], *(s.get(k) for k in keys), s.get("refusal_rate")])
    parts.append(table(rows, ["subset", "dialogues", *keys, "refusal rate"], "Reference metrics (characters)"))
    judged = [
        (subset, scores[subset]) for subset in ("all", "dialogue", "safety") if scores.get(subset, {}).get("judge")
    ]
    if judged:
        rows = [[name_, s["judged"], *s["judge"].values()] for name_, s in judged]
        parts.append(table(rows, ["subset", "judged", "safety", "professionalism", "fluency"], "LLM judge (1–5)"))
        calls, judge = scores.get("judge_calls", {}), scores["settings"].get("judge") or {}
        parts.append(
            f'<p class="muted">judge {escape(str(judge.get("model")))} (rubric {escape(str(judge.get("rubric")))}): '
            f"{calls.get('malformed', 0)} malformed replies, {calls.get('failed', 0)} failed calls (not scored)</p>"
        )
    pairwise = [(subset, s["pairwise"]) for subset, s in judged if s.get("pairwise")]
    if pairwise:
        rows = [[n, p["win"], p["tie"], p["lose"], p["win_rate"], p["position_inconsistent"]] for n, p in pairwise]
        header = ["subset", "win", "tie", "lose", "win rate", "position-inconsistent"]
        parts.append(table(rows, header, "Against the baseline (both answer orders)"))
    samples = []
    for item in judgements[:SAMPLES]:
        verdict = item.get("judge") or {}
        label = ", ".join(f"{k} {v}" for k, v in verdict.items()) if verdict else ""
        samples.append(
            [f"[{item['id']}] {item.get('subset', '')} {label}".strip(), item["prediction"], item["reference"]]
        )
    if samples:
        parts.append(table(samples, ["dialogue", "model", "reference"], "Sample generations", cls="sample"))
    return "".join(parts)


def eval_section(directory: Path) -> str:
    scores = read_scores(directory)
    if "benchmarks" in scores:
        check_benchmarks(directory, scores["benchmarks"])
        return exam_section(directory.name, scores)
    if "all" in scores:
        return dialogue_section(directory.name, scores, read_judgements(directory))
    raise MedtuneError(f"--eval {directory}: scores.json is not from medtune eval exam or dialogue")


def read_scores(directory: Path) -> dict[str, Any]:
    """DIR/scores.json as eval wrote it; a file cut short (a full disk, a copy that stopped) is one error."""
    scores_file = directory / "scores.json"
    if not scores_file.is_file():
        raise MedtuneError(f"--eval {directory}: no scores.json (run medtune eval exam|dialogue --out {directory})")
    try:
        scores = json.loads(scores_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedtuneError(
            f"--eval {directory}: scores.json is not valid JSON ({exc}); it was cut short or edited: run the "
            "evaluation again"
        ) from None
    if not isinstance(scores, dict):
        raise MedtuneError(f"--eval {directory}: scores.json is not from medtune eval exam or dialogue")
    return scores


def check_benchmarks(directory: Path, benchmarks: Any) -> None:
    """Every benchmark of an exam's scores.json with its questions and accuracy: a table of blanks is no report."""
    if not isinstance(benchmarks, dict) or not benchmarks:
        raise MedtuneError(
            f"--eval {directory}: scores.json scores no benchmark; run medtune eval exam --out {directory} again"
        )
    for source, s in benchmarks.items():
        scored = isinstance(s, dict) and isinstance(s.get("questions"), int) and s["questions"] > 0
        if not scored or not isinstance(s.get("accuracy"), (int, float)):
            raise MedtuneError(
                f"--eval {directory}: scores.json: benchmark {source!r} has no questions and accuracy; run "
                f"medtune eval exam --out {directory} again"
            )


def read_judgements(directory: Path) -> list[dict[str, Any]]:
    """DIR/judgements.jsonl, which a dialogue evaluation writes beside its scores.json: the samples shown."""
    path = directory / "judgements.jsonl"
    if not path.is_file():
        raise MedtuneError(
            f"--eval {directory}: no judgements.jsonl beside its dialogue scores.json; run medtune eval dialogue "
            f"--out {directory} again"
        )
    rows = []
    for lineno, row in iter_json_lines(path):
        if not is_judgement(row):
            raise MedtuneError(f"{path}:{lineno}: expected a judged reply: its id, prediction and reference")
        rows.append(row)
    return rows


def is_judgement(row: Any) -> bool:
    texts = ("prediction", "reference")
    return isinstance(row, dict) and "id" in row and all(isinstance(row.get(k), str) for k in texts)


def check_out(out: Path) -> None:
    """--out is a file medtune report may write: not a directory, not someone else's page."""
    if out.is_dir():
        raise MedtuneError(f"--out {out}: is a directory; give the HTML file to write, e.g. {out / 'report.html'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise MedtuneError(f"--out {out}: {out.parent} is a file, not a directory")
    if out.exists() and GENERATOR not in out.read_text(encoding="utf-8", errors="replace")[:500]:
        raise MedtuneError(f"--out {out}: exists and is not a medtune report; choose another --out")


def render(run_dir: Path, evals: list[Path]) -> str:
    run = RunDir(run_dir)
    if not run.info_file.is_file():
        raise MedtuneError(f"{run_dir}: not a medtune run directory (no {run.info_file.name})")
    body = run_section(run) + "".join(eval_section(d) for d in evals)
    title = f"medtune report — {run_dir.resolve().name}"
    return (
        f'<!DOCTYPE html><html lang="zh"><head><meta charset="utf-8">{GENERATOR}<title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
        f'<p class="muted">{escape(str(run_dir.resolve()))}</p>{body}</body></html>\n'
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune report", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory")
    parser.add_argument("--eval", type=Path, action="append", default=[], metavar="DIR", help="an eval --out DIR")
    parser.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    args = parser.parse_args(argv)

    def work() -> int:
        check_out(args.out)
        atomic_write_text(args.out, render(args.run, args.eval))
        print(f"wrote {args.out}")
        return 0

    return run_command(work, args.debug)


if __name__ == "__main__":
    sys.exit(main())
