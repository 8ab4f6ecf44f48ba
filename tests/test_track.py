"""The PromptCBLUE track script end to end on CPU: tiny model, a toy set written here."""

import json
import os
import subprocess

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow  # subprocesses: each pays ~6 s of imports

ROWS = [
    (
        "KUAKE-QIC",
        "cls",
        "判断下面搜索词的意图：\n{q}\n选项：治疗方案，病因分析\n答：",
        ["治疗方案", "病因分析"],
        [
            ("发烧怎么退烧", "治疗方案"),
            ("为什么会头痛", "病因分析"),
            ("胃炎吃什么药", "治疗方案"),
            ("失眠的原因", "病因分析"),
        ],
    ),
    (
        "CHIP-STS",
        "cls",
        "下面两句话意思相同吗？\n{q}\n选项：是的，不是\n答：",
        ["是的", "不是"],
        [("“头痛怎么办”，“头疼怎么处理”", "是的"), ("“感冒发烧”，“骨折治疗”", "不是")],
    ),
    (
        "MedDG",
        "response_generation",
        "根据对话历史，作为医生应该如何回复？\n患者：{q}\n答：",
        None,
        [("胃痛两天了", "建议清淡饮食，必要时做胃镜。"), ("咳嗽有痰", "可以多喝水，服用化痰药。")],
    ),
]


def write_split(path, with_target: bool):
    lines = []
    for task, kind, prompt, choices, items in ROWS:
        for i, (q, a) in enumerate(items):
            lines.append(
                {
                    "input": prompt.format(q=q),
                    "target": a if with_target else "",
                    "answer_choices": choices,
                    "task_type": kind,
                    "task_dataset": task,
                    "sample_id": f"{path.stem}-{task}-{i}",
                }
            )
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in lines), encoding="utf-8")


def test_track_script_on_cpu(tmp_path):
    src = tmp_path / "PromptCBLUE"
    src.mkdir()
    write_split(src / "train.json", True)
    write_split(src / "dev.json", True)
    write_split(src / "test.json", False)
    work = tmp_path / "work"
    env = {**os.environ, "MAX_NEW_TOKENS": "8"}
    elsewhere = tmp_path / "elsewhere"  # a user's own directory: the script and recipe named by path
    elsewhere.mkdir()
    command = [
        "bash",
        str(REPO / "scripts" / "promptcblue_track.sh"),
        str(REPO / "recipes" / "demo.yaml"),
        str(src),
        str(work),
        "train.max_steps=6",
        "train.eval_steps=0",
        "train.save_steps=0",
        "data.max_length=128",
    ]
    for attempt in ("first", "again"):  # every step can be re-run: nothing is redone or refused
        proc = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, attempt + proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "already finished with these settings" in proc.stdout and "is up to date" in proc.stdout
    assert proc.stdout.count("generated 0 predictions") == 2
    scores = json.loads((work / "dev_scores.json").read_text())
    assert set(scores["per_task"]) == {"KUAKE-QIC", "CHIP-STS", "MedDG"} and 0 <= scores["overall"] <= 100
    results = json.loads((work / "results.json").read_text())
    assert len(results) == 18 and len(results["KUAKE-QIC"]) == 4
    test_preds = [json.loads(item) for item in (work / "test_predictions.json").read_text().splitlines()]
    assert [p["sample_id"] for p in test_preds] == [
        json.loads(item)["sample_id"] for item in (src / "test.json").read_text().splitlines()
    ]
