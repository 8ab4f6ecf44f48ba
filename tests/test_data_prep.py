"""data_prep: every record written or reported, atomic outputs, deterministic splits."""

import json
from pathlib import Path

import pytest
from helpers import REPO

from data_prep.__main__ import SOURCES
from data_prep.__main__ import main as prep_main
from data_prep.pipeline import Options, run
from medtune.data.records import read_records

SHARED = REPO.parent / "shared" / "data"


def write(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)) + "\n" for item in lines),
        encoding="utf-8",
    )
    return path


def convert(tmp_path, source, lines, name="in.jsonl", **options):
    src = write(tmp_path / name, lines) if isinstance(lines, list) else lines
    out = tmp_path / f"{source}.out.jsonl"
    convert_fn, reader, _ = SOURCES[source]
    report = run(convert_fn, [src], out, Options(**options), reader=reader, progress=False)
    records = [json.loads(item) for item in out.read_text(encoding="utf-8").splitlines()]
    skip_file = out.with_name(f"{source}.out.skipped.jsonl")
    skipped = [json.loads(item) for item in skip_file.read_text().splitlines()] if skip_file.exists() else []
    assert skip_file.exists() == bool(skipped)  # nothing skipped: no (empty) skip file
    assert report.read == report.written + sum(report.skipped.values()) == report.written + len(skipped)
    return records, skipped, report


CHATMED = [
    {"query": "<s>问：\n孩子咳嗽一周了怎么办？\n答：\n", "response": "建议到儿科就诊，听诊肺部。"},
    {"query": "胃痛吃什么药？", "response": "请先明确病因，不要自行用药。"},
    {"query": "头晕", "response": "  "},
    '{"query": "broken',
    '["not", "an", "object"]',
    {"response": "没有问题的回答"},
]


def test_chatmed_strips_wrapper_and_reports_every_skip(tmp_path):
    records, skipped, report = convert(tmp_path, "chatmed-consult", CHATMED)
    assert [r["messages"][0]["content"] for r in records] == ["孩子咳嗽一周了怎么办？", "胃痛吃什么药？"]
    assert records[0]["messages"][1] == {"role": "assistant", "content": "建议到儿科就诊，听诊肺部。"}
    # a line holding an array is read as its elements: three strings, three records that are not objects
    assert report.skipped == {"empty answer": 1, "malformed JSON": 1, "not an object": 3, "missing field": 1}
    assert [(s["line"], s["reason"]) for s in skipped] == [
        (3, "empty answer"),
        (4, "malformed JSON"),
        (5, "not an object"),
        (5, "not an object"),
        (5, "not an object"),
        (6, "missing field"),
    ]
    assert all(s["file"].endswith("in.jsonl") for s in skipped)


CMT = [
    {
        "id": "c1",
        "cate1": "儿科",
        "cate2": "儿科",
        "instruction": "那需要打针吗？",
        "input": "",
        "output": "不需要打针。",
        "history": [["宝宝发烧三十八度", "请问精神状态怎么样？"], ["精神还可以", "可以先物理降温。"]],
    },
    {"instruct": "  高血压能喝咖啡吗？", "output": " 可以少量饮用。"},
    {"id": "c3", "instruction": "问题", "input": "", "output": "回答", "history": [["只有一句"]]},
    {"id": "c4", "instruction": "问题", "input": "", "output": ""},
]


def test_cmtmedqa_json_array_every_shape_converted_or_reported(tmp_path):
    src = tmp_path / "cmt.json"
    src.write_text(json.dumps(CMT, ensure_ascii=False, indent=2), encoding="utf-8")
    records, skipped, report = convert(tmp_path, "cmtmedqa", src)
    first = records[0]
    assert first["id"] == "c1" and first["meta"] == {"cate1": "儿科", "cate2": "儿科"}
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"] * 3
    assert first["messages"][-2:] == [
        {"role": "user", "content": "那需要打针吗？"},
        {"role": "assistant", "content": "不需要打针。"},
    ]
    assert records[1]["messages"][0]["content"] == "高血压能喝咖啡吗？"  # the `instruct` shape, stripped
    assert report.skipped == {"malformed history": 1, "empty answer": 1}
    text_lines = src.read_text().splitlines()
    for skip in skipped:  # line numbers point at the element inside the array
        assert f'"id": "{["c3", "c4"][skipped.index(skip)]}"' in text_lines[skip["line"]]


def test_promptcblue_keeps_scoring_fields_and_test_prompts(tmp_path):
    lines = [
        {
            "input": "判断下面句子的意图：\n发烧怎么办\n选项：治疗方案，病因分析\n答：",
            "target": "治疗方案",
            "answer_choices": ["治疗方案", "病因分析"],
            "task_type": "cls",
            "task_dataset": "KUAKE-QIC",
            "sample_id": "train-1",
        },
        {
            "input": "找出实体：\n头痛\n答：",
            "target": "",
            "answer_choices": ["症状"],
            "task_type": "ner",
            "task_dataset": "IMCS-V2-NER",
            "sample_id": "test-2",
        },
        {"input": "缺少任务名", "target": "x", "sample_id": "train-3"},
    ]
    records, _, report = convert(tmp_path, "promptcblue", lines, strip_answer_cue=True)
    assert (
        records[0]["id"] == "train-1"
        and records[0]["messages"][0]["content"] == "判断下面句子的意图：\n发烧怎么办\n选项：治疗方案，病因分析"
    )
    assert records[0]["meta"]["answer_choices"] == ["治疗方案", "病因分析"] and records[0]["meta"]["input"].endswith(
        "答："
    )
    assert [m["role"] for m in records[1]["messages"]] == ["user"]  # a test prompt, for prediction
    assert report.skipped == {"missing field": 1}
    # three copies of each task's record, each with its own id (copies with one id are "duplicate id" skips)
    copies = [{**row, "sample_id": f"{row['sample_id']}-{n}"} for n in range(3) for row in lines[:2]]
    capped, _, report = convert(tmp_path, "promptcblue", copies, max_per_task=2)
    assert len(capped) == 4 and report.skipped == {"over per-task cap": 2}


def test_huatuo_preference_text_alpaca_sharegpt(tmp_path):
    huatuo, _, rep = convert(
        tmp_path,
        "huatuo",
        [
            {"id": "", "instruction": ["腰疼怎么办"], "input": "", "output": ["注意休息"]},
            {"instruction": ["一", "二"], "output": ["甲"]},
        ],
    )
    assert huatuo[0]["messages"][1]["content"] == "注意休息" and rep.skipped == {"invalid field": 1}

    pref, _, rep = convert(
        tmp_path,
        "preference",
        [
            {
                "instruction": "失眠怎么办",
                "input": "",
                "output": ["规律作息，必要时就医。", "多喝酒。"],
                "history": [["你好", "您好"]],
            },
            {"prompt": "感冒", "chosen": "多休息", "rejected": "吃抗生素"},
            {"instruction": "同", "output": ["一样", "一样"]},
        ],
    )
    assert pref[0]["chosen"] == "规律作息，必要时就医。" and pref[0]["rejected"] == "多喝酒。"
    assert [m["role"] for m in pref[0]["messages"]] == ["user", "assistant", "user"]
    assert rep.skipped == {"identical pair": 1}

    txt = tmp_path / "book.txt"
    txt.write_text("第一段，讲高血压。\n第二行。\n\n\n第二段，讲糖尿病。\n", encoding="utf-8")
    texts, _, _ = convert(tmp_path, "text", txt)
    assert [t["text"] for t in texts] == ["第一段，讲高血压。\n第二行。", "第二段，讲糖尿病。"]

    alp, _, _ = convert(
        tmp_path, "alpaca", [{"instruction": "解释", "input": "高血压", "output": "血压升高", "system": "你是医生"}]
    )
    assert [m["content"] for m in alp[0]["messages"]] == ["你是医生", "解释\n高血压", "血压升高"]

    sg, _, rep = convert(
        tmp_path,
        "sharegpt",
        [
            {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "请讲"}]},
            {"conversations": [{"from": "human", "value": "你好"}]},
        ],
    )
    assert sg[0]["messages"][1] == {"role": "assistant", "content": "请讲"} and rep.skipped == {"empty answer": 1}
    # LLaMA-Factory's ShareGPT layout keeps the system prompt beside the turns: it becomes the first message
    turns = [{"from": "human", "value": "头痛"}, {"from": "gpt", "value": "多休息"}]
    sg, _, _ = convert(tmp_path, "sharegpt", [{"system": "你是一名全科医生。", "conversations": turns}])
    assert sg[0]["messages"][0] == {"role": "system", "content": "你是一名全科医生。"}


def test_dedup_length_and_deterministic_split(tmp_path):
    rows = [{"query": f"问题{i % 50}", "response": f"回答{i % 50}" + "很长" * (i % 7 == 0) * 100} for i in range(400)]
    src = write(tmp_path / "in.jsonl", rows)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name / "out.jsonl"
        assert (
            prep_main(
                [
                    "chatmed-consult",
                    str(src),
                    "--out",
                    str(out),
                    "--dev-ratio",
                    "0.2",
                    "--dedup",
                    "--max-length",
                    "150",
                    "--quiet",
                ]
            )
            == 0
        )
        outs.append([out.read_bytes(), out.with_name("out.dev.jsonl").read_bytes()])
    assert outs[0] == outs[1]
    train = outs[0][0].decode().splitlines()
    dev = outs[0][1].decode().splitlines()
    # 58 rows (i % 7 == 0) are too long; of the other 342, only 50 contents are distinct.
    assert len(train) + len(dev) == 50 and 2 <= len(dev) <= 20
    report = (tmp_path / "a" / "out.skipped.jsonl").read_text().splitlines()
    reasons = [json.loads(line)["reason"] for line in report]
    assert reasons.count("too long") == 58 and reasons.count("duplicate") == 292


def test_bad_inputs_fail_at_once_and_leave_nothing(tmp_path, capsys):
    src = tmp_path / "gbk.jsonl"
    src.write_bytes(('{"query": "头痛", "response": "休息"}\n' * 3).encode("gb18030"))
    out = tmp_path / "out.jsonl"
    assert prep_main(["chatmed-consult", str(src), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}: not UTF-8") and "iconv -f GB18030 -t UTF-8" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gbk.jsonl"]  # no output, no temp file

    good = write(tmp_path / "good.jsonl", CHATMED[:2])
    before = good.read_bytes()
    assert prep_main(["chatmed-consult", str(good), "--out", str(good)]) == 2
    assert "would overwrite an input" in capsys.readouterr().err and good.read_bytes() == before
    assert prep_main(["chatmed-consult", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "input file not found" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside this checkout")
@pytest.mark.parametrize(
    "source,name,written",
    [
        ("chatmed-consult", "chatmed_consult_test_full.jsonl", 450),
        ("cmtmedqa", "cmtmedqa_test_full.json", 1144),
        ("huatuo", "huatuo26m_test_full.json", 6000),
        ("promptcblue", "promptcblue_toy/dev.json", 80),
    ],
)
def test_real_samples_convert(tmp_path, source, name, written):
    out = tmp_path / "out.jsonl"
    assert prep_main([source, str(SHARED / name), "--out", str(out), "--quiet"]) == 0
    assert sum(1 for _ in read_records(out)) == written


SFT_SOURCES = {
    "chatmed-consult": CHATMED[:2],
    "chatmed-tcm": [{"query": "枸杞有什么功效？", "response": "滋补肝肾，益精明目。"}, CHATMED[1]],
    "cmtmedqa": CMT[:2],
    "huatuo": [
        {"instruction": ["腰疼怎么办"], "output": ["注意休息"]},
        {"instruction": ["牙疼"], "output": ["看牙医"]},
    ],
    "alpaca": [
        {"instruction": "解释", "input": "高血压", "output": "血压升高"},
        {"instruction": "何为糖尿病", "output": "血糖高"},
    ],
    "sharegpt": [{"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "请讲"}]}],
    "promptcblue": [
        {
            "input": "意图：\n发烧怎么办\n答：",
            "target": "治疗方案",
            "answer_choices": ["治疗方案"],
            "task_type": "cls",
            "task_dataset": "KUAKE-QIC",
            "sample_id": "train-1",
        }
    ],
}


@pytest.mark.parametrize("source", sorted(SFT_SOURCES))
def test_training_runs_on_each_sft_source(tmp_path, source):
    from helpers import SMALL_RECIPE, write_recipe

    from medtune.recipe import load_recipe
    from medtune.train import train

    src = write(tmp_path / "in.jsonl", SFT_SOURCES[source])
    out = tmp_path / "data.jsonl"
    assert prep_main([source, str(src), "--out", str(out), "--quiet"]) == 0
    recipe_path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE.replace("eval_ratio: 0.1", "eval_ratio: 0.0"))
    recipe = load_recipe(
        recipe_path,
        [
            f"data.train_files=[{out}]",
            f"output.dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "train.save_steps=0",
            "train.per_device_batch_size=2",
            "train.gradient_accumulation_steps=1",
        ],
    )
    assert train(recipe).run.read_info()["steps"] == 2
