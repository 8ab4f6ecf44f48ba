"""The PromptCBLUE scorer: official parsing quirks and metrics, on fixtures written here."""

import json
from pathlib import Path

import pytest
from helpers import REPO

from medtune.evaluate.score import metrics
from medtune.evaluate.score.promptcblue import (
    TASKS,
    Problems,
    parse_entities,
    parse_events,
    parse_normalization,
    parse_relations,
    parse_report,
    parse_sts,
    parse_tree,
    results_json,
    score_files,
    task_of,
)

TOY = REPO.parent / "shared" / "data" / "promptcblue_toy"

NER_CHOICES = ["药物", "临床表现"]
GOLD = [
    {
        "input": "找出药物、临床表现实体：\n服用布洛芬后头痛缓解\n答：",
        "target": "上述句子中的实体包含：\n药物实体：布洛芬\n临床表现实体：头痛",
        "answer_choices": NER_CHOICES,
        "task_type": "ner",
        "task_dataset": "CMeEE-V2",
        "sample_id": "s1",
    },
    {
        "input": "关系抽取\n答：",
        "target": "具有药物治疗关系的头尾实体对如下：头实体为感冒，尾实体为布洛芬。",
        "answer_choices": ["药物治疗"],
        "task_type": "spo_generation",
        "task_dataset": "CMeIE",
        "sample_id": "s2",
    },
    {
        "input": "意图\n答：",
        "target": "治疗方案",
        "answer_choices": ["治疗方案", "病因分析"],
        "task_type": "cls",
        "task_dataset": "KUAKE-QIC",
        "sample_id": "s3",
    },
    {
        "input": "意图\n答：",
        "target": "病因分析",
        "answer_choices": ["治疗方案", "病因分析"],
        "task_type": "cls",
        "task_dataset": "KUAKE-QIC",
        "sample_id": "s4",
    },
    {
        "input": "回复\n答：",
        "target": "建议多喝水，注意休息。",
        "answer_choices": None,
        "task_type": "response_generation",
        "task_dataset": "MedDG",
        "sample_id": "s5",
    },
    {
        "input": "报告\n答：",
        "target": "上述问诊对话的诊疗报告如下：\n主诉：发热。\n现病史：发热两天。\n辅助检查：暂缺。\n既往史：不详。\n诊断：上呼吸道感染。\n建议：多饮水。",  # noqa: E501
        "answer_choices": None,
        "task_type": "report_generation",
        "task_dataset": "IMCS-V2-MRG",
        "sample_id": "s6",
    },
    {
        "input": "是否相同\n答：",
        "target": "是的",
        "answer_choices": ["是的", "不是"],
        "task_type": "cls",
        "task_dataset": "CHIP-STS",
        "sample_id": "s7",
    },
]


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def with_targets(targets: dict) -> list[dict]:
    return [{**g, "target": targets.get(g["sample_id"], g["target"])} for g in GOLD]


def test_gold_against_itself_scores_the_top(tmp_path):
    gold = write(tmp_path / "gold.jsonl", GOLD)
    report = score_files(gold, gold)
    assert set(report.per_task) == {"CMeEE-V2", "CMeIE-V2", "KUAKE-QIC", "MedDG", "IMCS-V2-MRG", "CHIP-STS"}
    for task, value in report.per_task.items():
        # ROUGE's F has a 1e-8 in its denominator: a perfect match is 99.9999995, as officially.
        assert value == pytest.approx(100.0, abs=1e-6), task
    assert not report.problems.counts


def test_empty_predictions_score_as_the_official_evaluator(tmp_path):
    gold = write(tmp_path / "gold.jsonl", GOLD)
    pred = write(tmp_path / "pred.jsonl", with_targets({g["sample_id"]: "" for g in GOLD}))
    scores = score_files(pred, gold).per_task
    assert scores["CMeEE-V2"] == 0 and scores["CMeIE-V2"] == 0
    assert scores["CHIP-STS"] == 100  # "" becomes the first label, 是的, which is right here
    # QIC: "" → 非上述类型: labels {治疗方案, 病因分析, 非上述类型}, every F1 is 0.
    assert scores["KUAKE-QIC"] == 0
    # MedDG: "无 。" against the gold shares only "。": P = 1/2, R = 1/11.
    p, r = 1 / 2, 1 / 11
    assert scores["MedDG"] == pytest.approx(100 * 2 * p * r / (p + r + 1e-8))


def test_classification_uses_sklearn_averages_over_union_of_labels():
    # macro over {A, B, X}: A: P=1 R=1/2 → 2/3; B: P=1/2 R=1 → 2/3; X (predicted only): 0
    gold, pred = ["A", "A", "B"], ["A", "B", "B"]
    assert metrics.classification_f1(gold, pred, "A", "macro") == pytest.approx(2 / 3)
    assert metrics.classification_f1(gold, ["A", "X", "B"], "A", "macro") == pytest.approx((2 / 3 + 1 + 0) / 3)
    # weighted by gold support: (2 * 2/3 + 1 * 2/3) / 3
    assert metrics.classification_f1(gold, pred, "A", "weighted") == pytest.approx(2 / 3)


def test_parsers_reproduce_official_quirks():
    # NER: a half-width colon is not cleaned: one junk mention, as officially
    assert parse_entities("药物实体:布洛芬,对乙酰氨基酚", ["药物"]) == [
        {"entity": "药物实体:布洛芬,对乙酰氨基酚", "type": "药物"}
    ]
    # CMeIE: a space after "，" breaks the pair
    assert parse_relations("具有药物治疗关系的头尾实体对如下：头实体为A， 尾实体为B。", ["药物治疗"]) == []
    # CDN: only the last line counts, only terms among the options
    assert parse_normalization("胃炎，未知术语", ["胃炎"]) == [{"entity": "胃炎", "type": "normalization"}]
    assert parse_normalization("胃炎\n", ["胃炎"]) == []
    # CDEE: the first line is dropped unconditionally; a blank line is an all-empty event
    events = parse_events("标题\n主体词：疼痛；发生状态：；描述词：剧烈，持续；解剖部位：腹部\n", None)
    assert events == [
        {"主体词": "疼痛", "发生状态": "", "描述词": ["剧烈", "持续"], "解剖部位": ["腹部"]},
        {"主体词": "", "发生状态": "", "描述词": [], "解剖部位": []},
    ]
    assert parse_sts(" 相同 ", None) == "是的"
    report = parse_report("报告\n主诉：咳嗽\n诊断: 感冒", None)
    assert report == {"主诉": "咳嗽"}  # half-width colon → the section is missing
    tree = parse_tree(
        "根据给定的指南文本抽取的诊疗决策树\n节点0：role=D；logical_rel=null；triples=[['A', '治疗药物', 'B'], ['x']]",
        None,
    )
    assert tree == [{"role": "D", "logical_rel": "null", "triples": [["A", "治疗药物", "B"]]}]
    assert (
        parse_tree("节点0：role=D；logical_rel=null；triples=__import__('os')", None)[0]["triples"] == []
    )  # never eval()


def test_text2dt_edit_ratio():
    leaf = lambda t: {"role": "D", "logical_rel": "null", "triples": t}  # noqa: E731
    cond = {"role": "C", "logical_rel": "null", "triples": [("病人", "临床表现", "发热")]}
    gold = [cond, leaf([("病人", "治疗药物", "布洛芬")]), leaf([("病人", "治疗药物", "观察")])]
    assert metrics.tree_edit_ratio([gold], [gold]) == 1.0
    # A single leaf predicted for a 3-node tree: root differs by role (1) + 1 triple each side (2),
    # and the two gold leaves are missing (1 role + 1 triple each = 4). max = (1 + 2) + (3 + 6).
    pred = [leaf([("病人", "治疗药物", "布洛芬")])]
    assert metrics.tree_edit_ratio([gold], [pred]) == pytest.approx(1 - 7 / 12)


def test_bad_prediction_files_are_counted_never_fatal(tmp_path):
    gold = write(tmp_path / "gold.jsonl", GOLD)
    rows = with_targets({})[:5]
    rows.append({**GOLD[0]})  # duplicate of s1
    rows.append({**GOLD[0], "task_dataset": "NO-SUCH-TASK", "sample_id": "x"})
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "{broken\n", encoding="utf-8")
    report = score_files(pred, gold)
    kinds = " ".join(report.problems.counts)
    for expected in ("malformed JSON", "unknown task", "duplicate sample_id", "missing prediction"):
        assert expected in kinds
    assert report.per_task["CMeEE-V2"] == pytest.approx(100.0)
    assert report.per_task["IMCS-V2-MRG"] < 100  # s6 and s7 missing → scored as empty


def test_results_json_has_every_task_and_cmeie_alias(tmp_path):
    problems = Problems()
    samples = [{**g, "_where": "x"} for g in GOLD]
    results = results_json(samples, problems)
    assert list(results) == list(TASKS) and len(TASKS) == 18
    assert results["CMeIE-V2"][0]["answer"] == [{"predicate": "药物治疗", "subject": "感冒", "object": "布洛芬"}]
    assert task_of("CMeIE") is TASKS["CMeIE-V2"]


@pytest.mark.skipif(not TOY.is_dir(), reason="../shared/data is not beside this checkout")
def test_toy_dev_top_score_and_official_empty_scores(tmp_path):
    dev = TOY / "dev.json"
    report = score_files(dev, dev)
    assert len(report.per_task) == 16 and all(v == pytest.approx(100, abs=1e-6) for v in report.per_task.values())
    empty = write(
        tmp_path / "empty.jsonl", [{**json.loads(item), "target": ""} for item in dev.read_text().splitlines()]
    )
    scores = score_files(empty, dev).per_task
    assert round(scores["MedDG"], 1) == 6.0 and round(scores["IMCS-V2-MRG"], 1) == 32.4
    assert scores["CHIP-CTC"] == 100 and scores["IMCS-V2-DAC"] == 100
