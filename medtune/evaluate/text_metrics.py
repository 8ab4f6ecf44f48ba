"""Reference metrics for Chinese replies, counted in characters.

- BLEU-1..4: sacrebleu's corpus BLEU with its "zh" tokenizer (every CJK character a token, other text
  as in 13a), cumulative up to n-grams of order n with uniform weights — the usual "BLEU-n".
- ROUGE-1/2/L: F-measure per reply, averaged; characters as BERT's BasicTokenizer splits them and
  rouge_chinese's formula (the same functions medtune's official PromptCBLUE scorer uses). An empty
  reply scores 0 (PromptCBLUE's scorer puts "无 。" in its place; that quirk belongs to its track only).
- distinct-1/2: distinct character n-grams over all n-grams of all replies (diversity, no reference).
- mean length: characters per reply.
"""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU

from medtune.evaluate.score.metrics import rouge_l, rouge_n


def bleu(predictions: Sequence[str], references: Sequence[str], order: int) -> float:
    return BLEU(tokenize="zh", max_ngram_order=order).corpus_score(list(predictions), [list(references)]).score


def distinct(texts: Sequence[str], n: int) -> float:
    grams = [tuple(chars[i : i + n]) for t in texts for chars in [list(t)] for i in range(len(chars) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def reference_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    if not predictions:
        return {}
    pairs = [(p, r) for p, r in zip(predictions, references, strict=True) if p.strip()]  # empty ones score 0
    n = len(predictions)
    metrics = {f"bleu_{order}": bleu(predictions, references, order) for order in range(1, 5)}
    metrics["rouge_1"] = 100 * sum(rouge_n(p, r, 1) for p, r in pairs) / n
    metrics["rouge_2"] = 100 * sum(rouge_n(p, r, 2) for p, r in pairs) / n
    metrics["rouge_l"] = 100 * sum(rouge_l(p, r) for p, r in pairs) / n
    metrics["distinct_1"] = distinct(predictions, 1)
    metrics["distinct_2"] = distinct(predictions, 2)
    metrics["mean_length"] = sum(len(p) for p in predictions) / len(predictions)
    metrics["reference_mean_length"] = sum(len(r) for r in references) / len(references)
    return metrics
