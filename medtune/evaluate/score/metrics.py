"""The PromptCBLUE metrics, reproduced exactly (see docs in promptcblue.py for where each is used).

- extraction_f1: micro P/R/F1 over exact answer tuples, sets per sample.
- classification_f1: scikit-learn's classification_report averages (weighted or macro) over the
  union of gold and predicted labels, zero_division=0; an empty prediction becomes the task's
  first label, as the official evaluator does.
- rouge_l: character-level ROUGE-L F (BERT BasicTokenizer tokens; rouge_chinese's formula,
  F = 2PR / (P + R + 1e-8), so a perfect match is 0.999999995).
- tree_edit_ratio: Text2DT's 1 - edit distance / max distance over pre-order decision trees.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

EMPTY_TEXT = "无 。"  # what the official evaluator scores in place of an empty text


# ----------------------------------------------------------------------------- extraction


def answer_tuples(answer: list[dict]) -> set[tuple[str, ...]]:
    """Each item → its values (keys sorted by name) as JSON text, the way the official tuples are built."""
    return {tuple(json.dumps(item[k], ensure_ascii=False) for k in sorted(item)) for item in answer}


def extraction_f1(gold: Sequence[list[dict]], pred: Sequence[list[dict]]) -> float:
    tp = fp = fn = 0
    for g, p in zip(gold, pred, strict=True):
        g_set, p_set = answer_tuples(g), answer_tuples(p)
        tp += len(g_set & p_set)
        fp += len(p_set - g_set)
        fn += len(g_set - p_set)
    if not tp:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------- classification


def classification_f1(gold: Sequence[str], pred: Sequence[str], first_label: str, average: str) -> float:
    """sklearn ``classification_report(gold, pred, zero_division=0)``'s "weighted avg" or "macro avg" F1."""
    pred = [p if p != "" else first_label for p in pred]
    labels = sorted(set(gold) | set(pred))
    support = Counter(gold)
    predicted = Counter(pred)
    correct = Counter(g for g, p in zip(gold, pred, strict=True) if g == p)
    f1 = {}
    for label in labels:
        precision = correct[label] / predicted[label] if predicted[label] else 0.0
        recall = correct[label] / support[label] if support[label] else 0.0
        f1[label] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    if average == "macro":
        return sum(f1.values()) / len(labels)
    total = sum(support.values())
    return sum(f1[label] * support[label] for label in labels) / total if total else 0.0


# ----------------------------------------------------------------------------- ROUGE


_basic_tokenizer = None


def char_tokens(text: str) -> list[str]:
    """BERT's BasicTokenizer: CJK characters and punctuation one token each, lower-cased, accents stripped."""
    global _basic_tokenizer
    if _basic_tokenizer is None:
        from transformers import BasicTokenizer  # only the text metrics need it: medtune score starts without torch

        _basic_tokenizer = BasicTokenizer(tokenize_chinese_chars=True)
    tokens = " ".join(_basic_tokenizer.tokenize(text)).strip()
    return (tokens or EMPTY_TEXT).split()


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def _f(overlap: int, n_hyp: int, n_ref: int) -> float:
    precision = overlap / n_hyp if n_hyp else 0.0
    recall = overlap / n_ref if n_ref else 0.0
    return 2 * precision * recall / (precision + recall + 1e-8)


def rouge_l(prediction: str, reference: str) -> float:
    hyp, ref = char_tokens(prediction), char_tokens(reference)
    return _f(_lcs(hyp, ref), len(hyp), len(ref))


def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N over *distinct* n-grams, as rouge_chinese counts them (reported, not ranked on)."""
    hyp, ref = char_tokens(prediction), char_tokens(reference)
    h = {tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1)}
    r = {tuple(ref[i : i + n]) for i in range(len(ref) - n + 1)}
    return _f(len(h & r), len(h), len(r))


def mean_rouge_l(pairs: Sequence[tuple[str, str]]) -> float:
    """Mean per-pair ROUGE-L F over (prediction, reference) pairs."""
    return sum(rouge_l(p, r) for p, r in pairs) / len(pairs) if pairs else 0.0


# ----------------------------------------------------------------------------- Text2DT


def _tree_children(roles: list[str]) -> dict[int, tuple[int, int]]:
    """Rebuild the tree from the pre-order role sequence: node → (left, right), as the official scan does."""
    roles = list(roles)
    children: dict[int, tuple[int, int]] = {}
    for _ in range(101):
        if not roles or roles[0] == "D":
            break
        for i, role in enumerate(roles):
            if role != "C":
                continue
            first = None
            for j in range(i + 1, len(roles)):
                if roles[j] == "X":
                    continue
                if roles[j] == "C":
                    break
                if roles[j] == "D" and first is None:
                    first = j
                elif roles[j] == "D":
                    children[i] = (first, j)
                    roles[i] = "D"
                    for k in range(i + 1, j + 1):
                        roles[k] = "X"
                    break
            if i in children:
                break
    return children


_MISSING = {"role": "", "logical_rel": "null", "triples": set()}


def _node_distance(a: dict, b: dict) -> int:
    return (a["role"] != b["role"]) + (a["logical_rel"] != b["logical_rel"]) + len(a["triples"] ^ b["triples"])


def _subtree(node: int, children: dict[int, tuple[int, int]]) -> list[int]:
    out, stack = [], list(children.get(node, ()))
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(children.get(n, ()))
    return out


def _normalise_tree(tree: list[dict]) -> list[dict]:
    """Triples as lower-cased 3-tuples; a malformed triple is an error, as in the official evaluator."""
    nodes = []
    for node in tree:
        triples = set()
        for triple in node["triples"]:
            if len(triple) != 3 or not all(isinstance(t, str) for t in triple):
                raise ValueError(f"Text2DT: malformed triple {triple!r}")
            triples.add(tuple(t.lower() for t in triple))
        nodes.append({"role": node["role"], "logical_rel": node["logical_rel"], "triples": triples})
    return nodes


def tree_edit_counts(pred_tree: list[dict], gold_tree: list[dict]) -> tuple[int, int]:
    """(edit distance, max distance) of one predicted tree against its gold tree."""
    pred, gold = _normalise_tree(pred_tree), _normalise_tree(gold_tree)
    pred_children = _tree_children([n["role"] for n in pred])
    gold_children = _tree_children([n["role"] for n in gold])
    distance, stack = 0, [(0, 0)]
    while stack:
        p, g = stack.pop()
        distance += _node_distance(pred[p], gold[g])
        p_leaf, g_leaf = p not in pred_children, g not in gold_children
        if p_leaf and not g_leaf:
            distance += sum(_node_distance(gold[n], _MISSING) for n in _subtree(g, gold_children))
        elif g_leaf and not p_leaf:
            distance += sum(_node_distance(pred[n], _MISSING) for n in _subtree(p, pred_children))
        elif not p_leaf and not g_leaf:
            (pl, pr), (gl, gr) = pred_children[p], gold_children[g]
            stack += [(pr, gr), (pl, gl)]
    n_triples = len(set().union(*(n["triples"] for n in pred))) + len(set().union(*(n["triples"] for n in gold)))
    n_nodes = sum(1 for n in pred if n["triples"]) + sum(1 for n in gold if n["triples"])
    return distance, n_triples + 2 * n_nodes


def tree_edit_ratio(gold: Sequence[list[dict]], pred: Sequence[list[dict]]) -> float:
    distance = maximum = 0
    for g, p in zip(gold, pred, strict=True):
        d, m = tree_edit_counts(p, g)
        distance, maximum = distance + d, maximum + m
    if not maximum:
        raise ValueError("Text2DT: every tree is empty; the edit ratio is undefined")
    return 1 - distance / maximum


def sections_rouge_l(gold: Sequence[dict[str, str]], pred: Sequence[dict[str, str]]) -> float:
    """IMCS-V2-MRG: ROUGE-L pooled over every (sample, gold section) pair; extra predicted sections ignored."""
    pairs = [
        (p.get(key, "").strip(), text.strip()) for g, p in zip(gold, pred, strict=True) for key, text in g.items()
    ]
    return mean_rouge_l(pairs)
