"""PromptCBLUE: generated text → structured answer (one parser per task) → the official score.

Reproduces the official post-processor and evaluator (michael-wzhu/PromptCBLUE,
src/evaluation/) quirk for quirk: parsers split on full-width separators only, drop
first lines where it does, keep unknown labels as new classes, and so on. Deliberate
differences, all about robustness, never about the numbers of a valid file:

- predictions are matched to gold by ``sample_id`` (the official one needs the same order);
  a missing prediction scores as an empty answer;
- a malformed line, an unknown task, a duplicate id, or a prediction the official parser
  would crash on is counted and reported instead of aborting the whole file;
- the first-release task name ``CMeIE`` is read as ``CMeIE-V2``; the overall score is the
  mean over the tasks present in the gold file (the official one needs all 18).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.console import MedtuneError
from medtune.evaluate.score import metrics

Parser = Callable[[str, list | None], Any]


# ----------------------------------------------------------------------------- parsers


def parse_entities(text: str, choices: list | None) -> list[dict]:
    """CMeEE-V2 / IMCS-V2-NER: lines `{type}实体：m1，m2` for each requested type."""
    if not isinstance(choices, list):
        raise ValueError("answer_choices must be a list for an entity task")
    entities = []
    for choice in choices:
        for line in text.split("\n"):
            if line.startswith(f"{choice}实体"):
                for mention in line.replace(f"{choice}实体：", "").split("，"):
                    if mention.strip():
                        entities.append({"entity": mention.strip(), "type": choice})
    return entities


def parse_relations(text: str, choices: list | None) -> list[dict]:
    """CMeIE-V2: `具有{rel}关系的头尾实体对如下：头实体为s，尾实体为o。…` per line."""
    if not isinstance(choices, list):
        raise ValueError("answer_choices must be a list for CMeIE")
    triples = []
    for line in text.split("\n"):
        predicate = line.split("关系的头尾实体对")[0][2:].strip()
        rest = line.replace(f"具有{predicate}关系的头尾实体对如下：", "")
        for piece in rest.split("。"):
            parts = piece.split("，尾实体为")
            if len(parts) < 2:
                continue
            triples.append(
                {
                    "predicate": predicate,
                    "subject": parts[0].replace("头实体为", "").strip(),
                    "object": parts[1].replace("尾实体为", "").strip(),
                }
            )
    return triples


def parse_normalization(text: str, choices: list | None) -> list[dict]:
    """CHIP-CDN: the last line's terms that are among the options."""
    terms = [t.strip() for t in text.split("\n")[-1].split("，") if t.strip()]
    if terms and choices is None:
        raise ValueError("answer_choices is null for CHIP-CDN")
    return [{"entity": t, "type": "normalization"} for t in dict.fromkeys(t for t in terms if t in choices)]


EVENT_KEYS = ("主体词", "发生状态", "描述词", "解剖部位")


def parse_events(text: str, choices: list | None) -> list[dict]:
    """CHIP-CDEE: every line after the first is one event `主体词：…；发生状态：…；描述词：a，b；解剖部位：…`."""
    events = []
    for line in text.split("\n")[1:]:
        event: dict[str, Any] = {}
        for piece in line.split("；"):
            for key in EVENT_KEYS:
                if piece.startswith(f"{key}："):
                    value = piece.replace(f"{key}：", "").strip()
                    event[key] = (
                        [v.strip() for v in value.split("，") if v.strip()] if key in ("描述词", "解剖部位") else value
                    )
                    piece = value
        events.append({key: event.get(key, [] if key in ("描述词", "解剖部位") else "") for key in EVENT_KEYS})
    return events


def make_attribute_parser(fallback: str) -> Parser:
    """CHIP-MDCFNPC / IMCS-V2-SR: lines `{finding}：{label}` after the first; unknown labels → fallback."""

    def parse(text: str, choices: list | None) -> list[dict]:
        found = []
        for line in text.split("\n")[1:]:
            parts = line.split("：")
            if len(parts) != 2:
                continue
            if choices is None:
                raise ValueError("answer_choices is null for an attribute task")
            label = parts[1] if parts[1] in choices else fallback
            found.append({"entity": parts[0].strip(), "attr": label})
        return found

    return parse


def parse_label(text: str, choices: list | None) -> str:
    return text.strip()


def parse_sts(text: str, choices: list | None) -> str:
    label = text.strip()
    return {"相同": "是的", "不同": "不是"}.get(label, label)


REPORT_SECTIONS = ("主诉：", "现病史：", "辅助检查：", "既往史：", "诊断：", "建议：")


def parse_report(text: str, choices: list | None) -> dict[str, str]:
    """IMCS-V2-MRG: section lines after the (stripped) first line."""
    report = {}
    for key in REPORT_SECTIONS:
        for line in text.strip().split("\n")[1:]:
            if line.startswith(key):
                report[key[:-1]] = line.strip().split(key)[-1].strip()
    return report


def parse_causal(text: str, choices: list | None) -> list[dict]:
    """CMedCausal: header lines set the relation; data lines `头实体：A；尾实体：B` (or a nested tail triple)."""
    triples, relation = [], None
    for line in (item.strip() for item in text.split("\n")):
        if "因果关系三元组如下" in line:
            relation = "因果关系"
            continue
        if "条件关系三元组" in line:
            relation = "条件关系"
            continue
        if "上下位关系" in line:
            relation = "上下位关系"
            continue
        if "给定的文本没有指定关系的三元组" in line:
            break
        if not line:
            continue
        if "头实体：" not in line:
            raise ValueError(f"CMedCausal: line without 头实体： {line!r}")
        head = line.split("头实体：")[1].split("；尾实体：")[0]
        if relation != "条件关系":
            if "；尾实体：" not in line:
                raise ValueError(f"CMedCausal: line without ；尾实体： {line!r}")
            triples.append({"predicate": relation, "subject": head, "object": line.split("；尾实体：")[1]})
            continue
        if "；尾三元组：" not in line:
            raise ValueError(f"CMedCausal: conditional line without ；尾三元组： {line!r}")
        tail = line.split("；尾三元组：")[1]
        if "头实体：" not in tail or "；尾实体：" not in tail or "；关系：" not in tail:
            raise ValueError(f"CMedCausal: malformed tail triple {tail!r}")
        inner = tail.split("；关系：")[1].split("；关系：")[0]
        if inner != "因果关系":
            raise ValueError(f"CMedCausal: a conditional tail must be a 因果关系, got {inner!r}")
        triples.append(
            {
                "predicate": relation,
                "subject": head,
                "object": {
                    "predicate": inner,
                    "subject": tail.split("头实体：")[1].split("；尾实体：")[0],
                    "object": tail.split("；尾实体：")[1].split("；关系：")[0],
                },
            }
        )
    return triples


def parse_tree(text: str, choices: list | None) -> list[dict]:
    """Text2DT: node lines `节点i：role=C；logical_rel=and；triples=[[s, r, o], ...]` in pre-order."""
    nodes = []
    for line in text.split("\n"):
        if "根据给定的指南文本抽取的诊疗决策树" in line or not line:
            continue
        if "：role=" not in line:
            raise ValueError(f"Text2DT: node line without ：role= {line!r}")
        role = line.split("：role=")[1].split("；logical_rel=")[0]
        logical = line.split("；logical_rel=")[1].split("；triples=")[0] if "；logical_rel=" in line else "null"
        try:
            value = ast.literal_eval(line.split("；triples=")[1])  # the official code uses eval(); never here
            triples = [t for t in value if len(t) == 3] if isinstance(value, list) else []
        except Exception:  # noqa: BLE001 - any unparsable triple list counts as none, as officially
            triples = []
        nodes.append({"role": role, "logical_rel": logical, "triples": triples})
    return nodes or [{"role": "D", "logical_rel": "null", "triples": []}]


# ----------------------------------------------------------------------------- the task table


@dataclass(frozen=True)
class Task:
    name: str
    parse: Parser
    metric: str  # extraction | weighted | macro | rouge | report | tree
    labels: tuple[str, ...] = ()  # classification: the first replaces an empty prediction

    @property
    def score_key(self) -> str:
        suffix = {"macro": "Macro-F1", "rouge": "RougeL", "report": "RougeL", "tree": "TreeLenvRatio"}
        return f"{self.name}-{suffix.get(self.metric, 'Micro-F1')}"


CTC_LABELS = (
    "非上述类型",
    "疾病",
    "症状(患者感受)",
    "体征(医生检测）",
    "怀孕相关",
    "肿瘤进展",
    "疾病分期",
    "过敏耐受",
    "器官组织状态",
    "预期寿命",
    "口腔相关",
    "药物",
    "治疗或手术",
    "设备",
    "护理",
    "诊断",
    "实验室检查",
    "风险评估",
    "受体状态",
    "年龄",
    "特殊病人特征",
    "读写能力",
    "性别",
    "教育情况",
    "居住情况",
    "种族",
    "知情同意",
    "参与其它试验",
    "研究者决定",
    "能力",
    "伦理审查",
    "依存性",
    "成瘾行为",
    "睡眠",
    "锻炼",
    "饮食",
    "酒精使用",
    "性取向",
    "吸烟状况",
    "献血",
    "病例来源",
    "残疾群体",
    "健康群体",
    "数据可及性",
    "含有多个类别",
)
DAC_LABELS = (
    "非上述类型",
    "关于症状的询问",
    "关于症状的回答",
    "关于病因的询问",
    "关于病因的回答",
    "关于个人基本信息的询问",
    "关于个人基本信息的回答",
    "关于已有检查和治疗的提问",
    "关于已有检查和治疗的回答",
    "关于用药建议的提问",
    "关于用药建议的解答",
    "关于就医建议的提问",
    "关于就医建议的解答",
    "关于注意事项的提问",
    "关于注意事项的解答",
    "给出诊断",
)
QIC_LABELS = (
    "非上述类型",
    "病情诊断",
    "病因分析",
    "治疗方案",
    "就医建议",
    "指标解读",
    "疾病描述",
    "后果表述",
    "注意事项",
    "功效作用",
    "医疗费用",
)

# In the official evaluator's order (the table prints in this order).
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("CMeEE-V2", parse_entities, "extraction"),
        Task("CMeIE-V2", parse_relations, "extraction"),
        Task("CHIP-CDN", parse_normalization, "extraction"),
        Task("CHIP-CDEE", parse_events, "extraction"),
        Task("IMCS-V2-NER", parse_entities, "extraction"),
        Task("CHIP-MDCFNPC", make_attribute_parser("不标注"), "extraction"),
        Task("IMCS-V2-SR", make_attribute_parser("无法根据上下文确定病人是否患有该症状"), "extraction"),
        Task("IMCS-V2-DAC", parse_label, "macro", DAC_LABELS),
        Task("IMCS-V2-MRG", parse_report, "report"),
        Task("CHIP-CTC", parse_label, "macro", CTC_LABELS),
        Task("CHIP-STS", parse_sts, "weighted", ("是的", "不是")),
        Task("KUAKE-IR", parse_label, "weighted", ("相关", "不相关")),
        Task("KUAKE-QIC", parse_label, "macro", QIC_LABELS),
        Task(
            "KUAKE-QQR",
            parse_label,
            "weighted",
            ("完全一致", "后者是前者的语义子集", "后者是前者的语义父集", "语义无直接关联"),
        ),
        Task(
            "KUAKE-QTR",
            parse_label,
            "weighted",
            ("完全不匹配或者没有参考价值", "很少匹配有一些参考价值", "部分匹配", "完全匹配"),
        ),
        Task("MedDG", parse_label, "rouge"),
        Task("Text2DT", parse_tree, "tree"),
        Task("CMedCausal", parse_causal, "extraction"),
    )
}
ALIASES = {"CMeIE": "CMeIE-V2"}


def task_of(name: str) -> Task | None:
    return TASKS.get(ALIASES.get(name, name))


def task_score(task: Task, gold: list, pred: list) -> float:
    """The official main metric of one task, on the 0–1 scale."""
    if task.metric == "extraction":
        return metrics.extraction_f1(gold, pred)
    if task.metric in ("weighted", "macro"):
        return metrics.classification_f1(gold, pred, task.labels[0], task.metric)
    if task.metric == "rouge":
        return metrics.mean_rouge_l(list(zip(pred, gold, strict=True)))
    if task.metric == "report":
        return metrics.sections_rouge_l(gold, pred)
    return metrics.tree_edit_ratio(gold, pred)


# ----------------------------------------------------------------------------- files


@dataclass
class Problems:
    """What was wrong with the input, counted, with the first few examples."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {kind}")


def read_samples(path: Path, problems: Problems) -> list[dict]:
    """PromptCBLUE-style JSON lines; bad lines are counted, never fatal."""
    samples = []
    with Path(path).open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError:
                problems.add("malformed JSON line", f"{path}:{lineno}")
                continue
            if (
                not isinstance(sample, dict)
                or not isinstance(sample.get("task_dataset"), str)
                or not isinstance(sample.get("target", ""), str)
            ):
                problems.add("line without task_dataset/target text", f"{path}:{lineno}")
                continue
            if task_of(sample["task_dataset"]) is None:
                problems.add(f"unknown task {sample['task_dataset']!r}", f"{path}:{lineno}")
                continue
            choices = sample.get("answer_choices")
            if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
                problems.add("answer_choices neither null nor a list of strings", f"{path}:{lineno}")
                continue
            sample["_where"] = f"{path}:{lineno}"
            samples.append(sample)
    return samples


def structure(sample: dict, problems: Problems, side: str) -> Any:
    """One sample's target text → its structured answer; an unparsable one counts as empty."""
    task = task_of(sample["task_dataset"])
    try:
        return task.parse(sample.get("target") or "", sample.get("answer_choices"))
    except (ValueError, IndexError) as exc:
        problems.add(f"{side} the official parser would reject ({exc})", sample["_where"])
        return task.parse("", sample.get("answer_choices") or [])


def results_json(predictions: list[dict], problems: Problems) -> dict[str, list[dict]]:
    """The official submission file: task → [{sample_id, answer}] in prediction order, all 18 keys."""
    results: dict[str, list[dict]] = {name: [] for name in TASKS}
    for sample in predictions:
        task = task_of(sample["task_dataset"])
        results[task.name].append(
            {"sample_id": sample.get("sample_id", "xxxx"), "answer": structure(sample, problems, "prediction")}
        )
    return results


@dataclass
class ScoreReport:
    per_task: dict[str, float]  # official 0–100 scale, keyed by task name
    counts: dict[str, int]
    problems: Problems
    matched: int = 0  # gold samples that have a prediction
    gold_total: int = 0

    @property
    def overall(self) -> float:
        return sum(self.per_task.values()) / len(self.per_task) if self.per_task else 0.0

    def table(self) -> str:
        lines = [f"{'task':<14} {'metric':<15} {'n':>6} {'score':>8}"]
        for name, value in self.per_task.items():
            metric = TASKS[name].score_key[len(name) + 1 :]
            lines.append(f"{name:<14} {metric:<15} {self.counts[name]:>6} {value:>8.2f}")
        lines.append(f"{'overall':<14} {'mean of tasks':<15} {sum(self.counts.values()):>6} {self.overall:>8.2f}")
        lines.append(
            f"matched {self.matched} of {self.gold_total} gold samples"
            f" ({self.gold_total - self.matched} missing, scored as empty)"
        )
        if self.problems.counts:
            lines.append("problems: " + "; ".join(f"{n} × {kind}" for kind, n in self.problems.counts.items()))
            lines += [f"  e.g. {example}" for example in self.problems.examples]
        return "\n".join(lines)


def score_files(pred_path: Path, gold_path: Path) -> ScoreReport:
    """Score predictions (PromptCBLUE lines with target = generated text) against a gold file."""
    problems = Problems()
    gold = read_samples(gold_path, problems)
    if not gold:
        first = f"; first problem: {problems.examples[0]}" if problems.examples else ""
        raise ScoreError(
            f"{gold_path}: no PromptCBLUE sample in it (lines with input, target, task_dataset, "
            f"sample_id); is it the gold file?{first}"
        )
    predictions: dict[str, dict] = {}
    pred_problems = Problems()  # what was wrong with the predictions' lines, to say why none matched
    without_id = 0
    for sample in read_samples(pred_path, pred_problems):
        sid = sample.get("sample_id")
        if sid is None:
            without_id += 1
            continue
        if sid in predictions:
            problems.add("duplicate sample_id in predictions (first kept)", sample["_where"])
            continue
        predictions[sid] = sample
    problems.counts.update(pred_problems.counts)
    problems.examples += pred_problems.examples[: max(0, 10 - len(problems.examples))]
    if without_id:
        problems.counts["predictions without sample_id (ignored)"] += without_id
    by_task: dict[str, tuple[list, list]] = {}
    gold_ids = set()
    for sample in gold:
        task = task_of(sample["task_dataset"])
        sid = sample.get("sample_id")
        gold_ids.add(sid)
        pred = predictions.get(sid)
        if pred is None:
            problems.add("missing prediction (scored as empty)", f"{gold_path}: sample {sid}")
            pred = {**sample, "target": "", "_where": f"missing {sid}"}
        elif task_of(pred["task_dataset"]) is not task:
            problems.add("prediction names another task than the gold", pred["_where"])
        g, p = by_task.setdefault(task.name, ([], []))
        g.append(structure(sample, problems, "gold"))
        p.append(
            structure(
                {**pred, "task_dataset": sample["task_dataset"], "answer_choices": sample.get("answer_choices")},
                problems,
                "prediction",
            )
        )
    extra = sum(1 for sid in predictions if sid not in gold_ids)
    if extra:
        problems.counts["predictions with no gold sample (ignored)"] += extra
    per_task = {}
    for name in (n for n in TASKS if n in by_task):
        g, p = by_task[name]
        try:
            per_task[name] = 100 * task_score(TASKS[name], g, p)
        except (ValueError, IndexError) as exc:
            problems.add(f"task not scorable ({exc}); scored 0", name)
            per_task[name] = 0.0
    matched = sum(1 for sid in gold_ids if sid in predictions)
    if not matched:
        raise ScoreError(f"{pred_path}: {why_nothing_matched(predictions, without_id, pred_problems, gold_path)}")
    return ScoreReport(per_task, {name: len(by_task[name][0]) for name in per_task}, problems, matched, len(gold))


def why_nothing_matched(predictions: dict, without_id: int, problems: Problems, gold_path: Path) -> str:
    """The reason no prediction matched, in the words of what the file holds."""
    if without_id and not predictions:
        return (
            f"its {without_id} predictions carry no sample_id to match with {gold_path} (predict keeps the input's "
            "fields: predict on the PromptCBLUE file itself, not on data_prep's conversion of it)"
        )
    if not predictions:
        first = f" (first problem: {problems.examples[0]})" if problems.examples else ""
        return f"no line of it is a PromptCBLUE prediction (input, target, task_dataset, sample_id){first}"
    return (
        f"none of its {len(predictions)} predictions matches a sample_id of {gold_path}; "
        "were they made for another file?"
    )


class ScoreError(MedtuneError):
    """Nothing to score: the files do not belong together."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medtune score promptcblue",
        description="Score PromptCBLUE predictions the way the official evaluator does.",
    )
    parser.add_argument(
        "--pred", required=True, type=Path, help="predictions: PromptCBLUE lines, target = generated text"
    )
    parser.add_argument(
        "--gold", type=Path, help="gold PromptCBLUE lines (e.g. dev.json); omit to only write --results"
    )
    parser.add_argument("--json", type=Path, help='write {"overall": ..., "per_task": {...}} here (0-100 scale)')
    parser.add_argument(
        "--results", type=Path, help="write the official submission file (task → [{sample_id, answer}])"
    )
    args = parser.parse_args(argv)
    if args.gold is None and args.results is None:
        parser.error("give --gold to score, or --results to write a submission file")
    for path in (args.pred, args.gold):
        if path is not None and not path.is_file():
            print(f"error: {path}: file not found", file=sys.stderr)
            return 2
    try:
        return _run(args)
    except (ScoreError, OSError, UnicodeDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.results:
        problems = Problems()
        results = results_json(read_samples(args.pred, problems), problems)
        if not any(results.values()):
            raise ScoreError(f"{args.pred}: no PromptCBLUE prediction in it; nothing to submit")
        args.results.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.results} ({sum(map(len, results.values()))} answers)")
        for kind, n in problems.counts.items():
            print(f"  {n} × {kind}", file=sys.stderr)
    if args.gold:
        report = score_files(args.pred, args.gold)
        print(report.table())
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "overall": report.overall,
                        "per_task": report.per_task,
                        "matched": report.matched,
                        "gold_samples": report.gold_total,
                    },
                    ensure_ascii=False,
                    indent=2,
                )
                + "\n",
                encoding="utf-8",
            )
    return 0
