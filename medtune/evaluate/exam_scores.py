"""Exam scores aggregated the way each benchmark publishes them.

- CMB (its score.py at 6c8ece4): accuracy per exam_class; a category (exam_type) is the unweighted mean
  of its classes. That is all score.py publishes: medtune adds "medtune_average" (the unweighted mean of
  the categories), the micro accuracy, and, for generated replies, "accuracy_as_sets" (the extracted
  letters compared with the gold ones in any order, where CMB compares strings).
- CMExam (src/evaluation): accuracy, and scikit-learn's precision_recall_fscore_support(average=
  "weighted") over the answer strings ("AB" and "无答案" are labels like any other), zero where a
  label was never predicted.
- MedQA-MCMLE, CMMLU, C-Eval: accuracy, overall and per category (subject / meta_info).

Every benchmark also gets the strict accuracy (see extract.py), the count of replies the official
rule found no answer in, and the count of empty replies (nothing but whitespace), so a run whose model
said nothing does not pass for one that answered wrongly; loglik rows have none of these.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from medtune.evaluate.extract import CMEXAM_NO_ANSWER, NO_ANSWER


def weighted_prf(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float]:
    """sklearn.metrics.precision_recall_fscore_support(gold, pred, average="weighted") (zero_division 0)."""
    support, predicted = Counter(gold), Counter(pred)
    hits = Counter(g for g, p in zip(gold, pred, strict=True) if g == p)
    total = sum(support.values())
    out = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    for label in set(gold) | set(pred):
        precision = hits[label] / predicted[label] if predicted[label] else 0.0
        recall = hits[label] / support[label] if support[label] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        weight = support[label] / total if total else 0.0
        out["precision"] += precision * weight
        out["recall"] += recall * weight
        out["f1"] += f1 * weight
    return out


def _accuracy(rows: Sequence[dict], key: str = "correct") -> float:
    return sum(bool(r[key]) for r in rows) / len(rows) if rows else 0.0


def _by(rows: Sequence[dict], depth: int) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[" / ".join(row["category"][:depth]) or "全部"].append(row)
    return dict(sorted(groups.items()))


def benchmark_scores(source: str, rows: Sequence[dict]) -> dict:
    """The published figures of one benchmark from its per-question rows (category, correct, ...)."""
    generated = "extracted" in rows[0]
    scores: dict = {"questions": len(rows), "accuracy": _accuracy(rows)}
    if generated:
        scores["strict_accuracy"] = _accuracy(rows, "strict_correct")
        empty = CMEXAM_NO_ANSWER if source == "cmexam" else NO_ANSWER
        scores["no_answer"] = sum(r["extracted"] == empty for r in rows)
        scores["empty_replies"] = sum(not r["output"].strip() for r in rows)
    if source == "cmb":
        scores.update(_cmb_scores(rows, generated))
    else:
        scores["accuracy_per_category"] = {name: _accuracy(group) for name, group in _by(rows, 1).items()}
    if source == "cmexam":
        predicted = [r["extracted"] if generated else r["chosen"] for r in rows]
        scores.update(weighted_prf([r["answer"] for r in rows], predicted))
    return scores


def _cmb_scores(rows: Sequence[dict], generated: bool) -> dict:
    """score.py's two tables, and medtune's figures beside them, named as medtune's."""
    classes = {name: _accuracy(group) for name, group in _by(rows, 2).items()}
    categories: dict[str, list[float]] = defaultdict(list)
    for name, accuracy in classes.items():
        categories[name.split(" / ")[0]].append(accuracy)
    per_category = {name: sum(v) / len(v) for name, v in sorted(categories.items())}
    scores: dict = {
        "medtune_average": sum(per_category.values()) / len(per_category),
        "accuracy_per_category": per_category,
        "accuracy_per_subcategory": classes,
    }
    if generated:
        as_sets = sum("".join(sorted(r["extracted"])) == r["answer"] for r in rows)
        scores["accuracy_as_sets"] = as_sets / len(rows)
    scores["note"] = (
        "CMB's score.py publishes accuracy_per_category and accuracy_per_subcategory only; accuracy (micro), "
        "medtune_average (the mean of the categories) and accuracy_as_sets (letters in any order) are medtune's"
    )
    return scores
