"""`medtune report RUN [--eval DIR ...] --out report.html`: one page a person can read.

The page is self-contained (no CDN, no script): the run's recipe, its loss curves as inline SVG, the
exam tables and dialogue metrics of each `medtune eval` directory given, the judge's scores, and a few
replies beside their questions (an exam's with the answer read from it and the gold one, a dialogue's with
its reference). It opens from a mail attachment or a file share.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
from html import escape
from pathlib import Path
from typing import Any

from medtune.console import MedtuneError, run_command
from medtune.data.records import iter_json_lines
from medtune.evaluate.judge import PANEL_NAMES
from medtune.rundir import RunDir, atomic_write_text, loss_figure

SAMPLES = 5  # replies shown per evaluation
GENERATOR = '<meta name="generator" content="medtune report">'  # how a page medtune may replace is known

# The keys of scores.json as a reader names them; a key not here is shown with its underscores as spaces.
NAMES = {
    "cmb": "CMB",
    "cmexam": "CMExam",
    "ceval": "C-Eval",
    "cmmlu": "CMMLU",
    "medqa-mcmle": "MedQA (MCMLE)",
    "medtune_average": "medtune's mean of categories",
    "average": "mean of categories",
    "strict_accuracy": "strict accuracy",
    "no_answer": "no answer",
    "precision": "weighted precision",
    "recall": "weighted recall",
    "f1": "weighted F1",
    "bleu_1": "BLEU-1",
    "bleu_2": "BLEU-2",
    "bleu_4": "BLEU-4",
    "rouge_1": "ROUGE-1",
    "rouge_2": "ROUGE-2",
    "rouge_l": "ROUGE-L",
    "distinct_1": "Distinct-1",
    "distinct_2": "Distinct-2",
    "mean_length": "mean length",
    "position_inconsistent": "position-inconsistent",
}
# What each level of a benchmark's category path is (data_prep writes the path: CMB's exam_type, exam_class).
LEVELS = {
    "cmb": ("exam type", "exam class"),
    "cmexam": ("department",),
    "ceval": ("subject",),
    "cmmlu": ("subject",),
}
EXAM_FIGURES = [
    "questions",
    "accuracy",
    "medtune_average",
    "average",
    "strict_accuracy",
    "no_answer",
    "empty_replies",
    "precision",
    "recall",
    "f1",
]
DIALOGUE_FIGURES = [
    "dialogues",
    "bleu_1",
    "bleu_2",
    "bleu_4",
    "rouge_1",
    "rouge_2",
    "rouge_l",
    "distinct_1",
    "distinct_2",
    "mean_length",
    "refusal_rate",
]

STYLE = """
body { font-family: "Noto Sans CJK SC", "PingFang SC", "Microsoft YaHei", sans-serif; margin: 2em auto;
       max-width: 1100px; color: #1d2330; line-height: 1.5; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #d8dee9; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0 1.4em; }
caption { text-align: left; font-weight: bold; white-space: nowrap; } th span { white-space: nowrap; }
th, td { border: 1px solid #d8dee9; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #eef2f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #66708a; } .empty { color: #66708a; font-style: italic; }
.levels { display: flex; flex-wrap: wrap; column-gap: 2em; align-items: flex-start; }
.sample { width: 100%; } .sample td { white-space: pre-wrap; font-size: 0.92em; }
.exams td:first-child { white-space: nowrap; } .dialogues td:nth-child(2) { min-width: 10em; }
"""


class Html(str):
    """Markup this module wrote from escaped text: a table cell shows it as it is."""


EMPTY_REPLY = Html('<span class="empty">(empty reply)</span>')
NOT_FOUND = Html('<span class="muted">—</span>')
NONE_READ = Html('<span class="muted">(none)</span>')


def label(key: str) -> str:
    return NAMES.get(key, key.replace("_", " "))


def table(rows: list[list[Any]], header: list[str], caption: str = "", cls: str = "") -> str:
    def cell(value: Any) -> str:
        if isinstance(value, Html):
            return f"<td>{value}</td>"
        if isinstance(value, float):
            return f'<td class="num">{value:.4f}</td>'
        if isinstance(value, int) and not isinstance(value, bool):
            return f'<td class="num">{value}</td>'
        return f"<td>{escape('' if value is None else str(value))}</td>"

    words = lambda h: " ".join(f"<span>{escape(w)}</span>" for w in h.split(" "))  # BLEU-1 kept on one line
    head = "".join(f"<th>{words(h)}</th>" for h in header)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f'<table class="{cls}">{cap}{thead}<tbody>{body}</tbody></table>'


def shown_reply(text: Any) -> Any:
    """A reply as a cell: an empty one says so, where a blank cell would read as a page that failed to load."""
    return EMPTY_REPLY if isinstance(text, str) and not text.strip() else text


def muted(text: str) -> str:
    return f'<p class="muted">{escape(text)}</p>'


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


def exam_section(directory: Path, scores: dict) -> str:
    parts = [f"<h2>Exam: {escape(directory.name)}</h2>", contamination_note(scores)]
    mode = scores.get("settings", {}).get("mode", "")
    extraction = scores.get("extraction")
    if isinstance(extraction, dict):
        rules = "; ".join(f"{k}: {v}" for k, v in extraction.items())
        chosen = scores.get("settings", {}).get("extractor", "official")
        which = "official extraction" if chosen in (None, "official") else f"extraction --extractor {chosen}"
        parts.append(muted(f"mode {mode}; {which} — {rules}"))
    else:
        parts.append(muted(f"mode {mode}: candidate answers scored by log-likelihood"))
    benchmarks = scores["benchmarks"]
    figures = [k for k in EXAM_FIGURES if any(k in s for s in benchmarks.values())]
    rows = [[label(source), *(s.get(k, "-") for k in figures)] for source, s in benchmarks.items()]
    parts.append(table(rows, ["benchmark", *map(label, figures)], "Scores"))
    levels = [t for source, s in benchmarks.items() for t in category_tables(source, s)]
    parts.append(f'<div class="levels">{"".join(levels)}</div>')
    parts.append(exam_samples(directory, scores))
    return "".join(parts)


def category_tables(source: str, s: dict) -> list[str]:
    """Accuracy per category, and per subcategory within it where the benchmark has two levels (CMB: exam
    type, then exam class, the two tables of its score.py), each level under its own name."""
    levels = LEVELS.get(source, ("category", "subcategory"))
    name = label(source)
    rows = [[k, v] for k, v in s.get("accuracy_per_category", {}).items()]
    tables = [table(rows, [levels[0], "accuracy"], f"{name} by {levels[0]}")] if rows else []
    within = s.get("accuracy_per_subcategory") or {}
    if within:
        outer, inner = levels[0], levels[1] if len(levels) > 1 else "subcategory"
        rows = [[*(k.split(" / ", 1) + [""])[:2], v] for k, v in within.items()]
        tables.append(table(rows, [outer, inner, "accuracy"], f"{name} by {inner} within {outer}"))
    return tables


def exam_samples(directory: Path, scores: dict) -> str:
    """The first questions of each benchmark in turn: what was asked (from the data file scores.json names, as
    the rows do not carry it), what the model answered, how that was read, and the gold answer."""
    rows, note = read_rows(directory / "predictions.jsonl")
    picked = take_turns(list(rows.values()), SAMPLES)
    if not picked:
        return muted(f"no sample replies: {note}") if note else ""
    asked, notes = questions([data_file(scores)], {str(r["id"]) for r in picked if not question_of(r)})
    generated = any("output" in r for r in picked)
    answered = ["model's reply", "extracted"] if generated else ["chosen answer"]
    header = ["id", "question", *answered, "gold", "correct"]
    shown = []
    for r in picked:
        read = NONE_READ if r.get("extracted") == "" else r.get("extracted")
        answer = [shown_reply(r.get("output")), read] if generated else [r.get("chosen")]
        gold = r.get("answer_as_written", r.get("answer"))
        correct = "yes" if r.get("correct") else "no"
        question = question_of(r) or asked.get(str(r["id"]), NOT_FOUND)
        shown.append([sample_id(r), question, *answer, gold, correct])
    caption = f"Sample replies ({len(picked)} of {len(rows)}: the first questions of each benchmark)"
    return table(shown, header, caption, cls="sample exams") + not_shown(notes)


def sample_id(row: dict) -> str:
    """The id with its benchmark's name, unless the id already begins with it (cmexam:cmexam_test.csv:0)."""
    rid, source = str(row["id"]), str(row.get("source", ""))
    return rid if rid.startswith(f"{source}:") else f"{label(source)} {rid}".strip()


def take_turns(rows: list[dict], n: int) -> list[dict]:
    """Up to n rows, one benchmark after another, so that each benchmark of the file shows."""
    by_source: dict[Any, list[dict]] = {}
    for row in rows:
        by_source.setdefault(str(row.get("source")), []).append(row)
    rounds = itertools.zip_longest(*by_source.values())
    return [row for turn in rounds for row in turn if row is not None][:n]


def dialogue_section(directory: Path, scores: dict, judgements: list[dict]) -> str:
    parts = [f"<h2>Dialogue: {escape(directory.name)}</h2>", contamination_note(scores)]
    subsets = [(name, scores.get(name, {})) for name in ("all", "dialogue", "safety")]
    rows = [[name, *(s.get(k) for k in DIALOGUE_FIGURES)] for name, s in subsets if s.get("dialogues")]
    parts.append(table(rows, ["subset", *map(label, DIALOGUE_FIGURES)], "Reference metrics (characters)"))
    judged = [(name, s) for name, s in subsets if s.get("judge")]
    if judged:
        axes = list(judged[0][1]["judge"])
        rows = [[name, s.get("judged"), *(s["judge"].get(a) for a in axes)] for name, s in judged]
        parts.append(table(rows, ["subset", "judged", *map(label, axes)], "LLM judge (1–5)"))
        calls, judge = scores.get("judge_calls", {}), scores["settings"].get("judge") or {}
        parts.append(
            muted(
                f"judge {judge.get('model')} (rubric {judge.get('rubric')}): {calls.get('malformed', 0)} malformed "
                f"replies, {calls.get('failed', 0)} failed calls (not scored)"
            )
        )
    panels = [(name, panel, p) for name, s in judged for panel, p in s.get("panels", {}).items()]
    if panels:
        keys = ["win", "tie", "lose", "win_rate", "position_inconsistent"]
        rows = [[name, PANEL_NAMES.get(panel, panel), *(p.get(k) for k in keys)] for name, panel, p in panels]
        caption = "Against the baseline, per panel (both answer orders)"
        parts.append(table(rows, ["subset", "panel", *map(label, keys)], caption))
    parts.append(dialogue_samples(directory, scores, judgements[:SAMPLES]))
    return "".join(parts)


def dialogue_samples(directory: Path, scores: dict, judgements: list[dict]) -> str:
    """Each reply beside what was asked (the last user turn) and the reference answer."""
    if not judgements:
        return ""
    ids = {str(item["id"]) for item in judgements}
    asked, notes = questions([directory / "predictions.jsonl", data_file(scores)], ids)
    samples = []
    for item in judgements:
        verdict = item.get("judge") or {}
        said = ", ".join(f"{k} {v}" for k, v in verdict.items()) if isinstance(verdict, dict) else ""
        samples.append(
            [
                f"[{item['id']}] {item.get('subset', '')} {said}".strip(),
                asked.get(str(item["id"]), NOT_FOUND),
                shown_reply(item["prediction"]),
                item["reference"],
            ]
        )
    header = ["dialogue", "question", "model", "reference"]
    caption = "Sample generations (question: the dialogue's last user turn)"
    return table(samples, header, caption, cls="sample dialogues") + not_shown(notes)


def not_shown(notes: list[str]) -> str:
    return "".join(muted(f"questions not shown: {note}") for note in notes)


def data_file(scores: dict) -> Path | None:
    """The data file the evaluation read, as scores.json names it (relative to where it ran)."""
    data = scores.get("settings", {}).get("data")
    return Path(data) if isinstance(data, str) and data else None


def questions(files: list[Path | None], ids: set[str]) -> tuple[dict[str, str], list[str]]:
    """What was asked, by id, from the first of these files that holds it; and, for ids none holds, why each
    file could not be read. A sample's question helps the reader; the scores are the page, so no error."""
    found: dict[str, str] = {}
    notes = []
    for path in files:
        wanted = ids - found.keys()
        if not wanted:
            break
        rows, note = read_rows(path, wanted)
        found.update((rid, text) for rid, row in rows.items() if (text := question_of(row)))
        notes += [note] if note else []
    return found, notes if ids - found.keys() else []


def question_of(record: dict) -> str:
    """An exam's question with its lettered options; a dialogue's last user turn."""
    if isinstance(record.get("question"), str):
        options = record.get("options")
        listed = "   ".join(f"{k}. {v}" for k, v in options.items()) if isinstance(options, dict) else ""
        return f"{record['question']}\n{listed}".strip()
    messages = record["messages"] if isinstance(record.get("messages"), list) else []
    users = [m["content"] for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else ""


def read_rows(path: Path | None, ids: set[str] | None = None) -> tuple[dict[str, dict], str]:
    """The rows with an id of a JSON-lines file (those of `ids` only, stopping when all are found), and why
    the file could not be read to its end, if so."""
    if path is None:
        return {}, "scores.json names no data file"
    if not path.is_file():
        return {}, f"{path}: not found"
    rows: dict[str, dict] = {}
    try:
        for _, row in iter_json_lines(path):
            rid = row.get("id") if isinstance(row, dict) else None
            if isinstance(rid, (str, int)) and (ids is None or str(rid) in ids):
                rows[str(rid)] = row
                if ids is not None and len(rows) == len(ids):
                    break
    except MedtuneError as exc:
        return rows, str(exc)
    return rows, ""


def eval_section(directory: Path) -> str:
    scores = read_scores(directory)
    if "benchmarks" in scores:
        check_benchmarks(directory, scores["benchmarks"])
        return exam_section(directory, scores)
    if "all" in scores:
        return dialogue_section(directory, scores, read_judgements(directory))
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
