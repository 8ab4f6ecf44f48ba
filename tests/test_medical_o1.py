"""data_prep medical-o1: HuatuoGPT-o1's medical-o1-reasoning-SFT → chat records with assistant reasoning."""

import json
from pathlib import Path

from data_prep.__main__ import main as prep_main
from medtune.data.records import validate_record

O1 = [
    {
        "Question": "  男，45岁，饮酒后上腹剧痛放射至腰背，血淀粉酶升高，最可能的诊断？\n",
        "Complex_CoT": "\n饮酒后上腹痛放射至腰背是胰腺炎的典型表现，淀粉酶升高支持。\n所以考虑急性胰腺炎。 ",
        "Response": "最可能的诊断是急性胰腺炎。 ",
    },
    {
        "Question": "糖尿病患者首选的口服降糖药是什么？",
        "Complex_CoT": "2型糖尿病如无禁忌，指南推荐二甲双胍作为一线用药。",
        "Response": "二甲双胍。",
    },
    {
        "Question": "儿童发热超过多少度需要使用退热药？",
        "Complex_CoT": "一般建议腋温≥38.5℃或明显不适时使用对乙酰氨基酚或布洛芬。",
        "Response": "腋温38.5℃以上或孩子明显不适时可使用退热药。",
    },
]

EXPECTED_MESSAGES = [
    [
        {"role": "user", "content": "男，45岁，饮酒后上腹剧痛放射至腰背，血淀粉酶升高，最可能的诊断？"},
        {
            "role": "assistant",
            "content": "最可能的诊断是急性胰腺炎。",
            "reasoning": "饮酒后上腹痛放射至腰背是胰腺炎的典型表现，淀粉酶升高支持。\n所以考虑急性胰腺炎。",
        },
    ],
    [
        {"role": "user", "content": "糖尿病患者首选的口服降糖药是什么？"},
        {
            "role": "assistant",
            "content": "二甲双胍。",
            "reasoning": "2型糖尿病如无禁忌，指南推荐二甲双胍作为一线用药。",
        },
    ],
    [
        {"role": "user", "content": "儿童发热超过多少度需要使用退热药？"},
        {
            "role": "assistant",
            "content": "腋温38.5℃以上或孩子明显不适时可使用退热药。",
            "reasoning": "一般建议腋温≥38.5℃或明显不适时使用对乙酰氨基酚或布洛芬。",
        },
    ],
]


def prep(src: Path, out: Path) -> list[dict]:
    assert prep_main(["medical-o1", str(src), "--out", str(out), "--quiet"]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_json_array_in_the_published_format(tmp_path):
    src = tmp_path / "medical_o1_sft_Chinese.json"
    src.write_text(json.dumps(O1, ensure_ascii=False, indent=2), encoding="utf-8")
    records = prep(src, tmp_path / "out.jsonl")
    assert [r["messages"] for r in records] == EXPECTED_MESSAGES
    assert [r["id"] for r in records] == [f"medical-o1:medical_o1_sft_Chinese.json:{i}" for i in range(3)]
    for record in records:
        assert record["source"] == "medical-o1" and record["meta"] == {}
        assert set(record) == {"id", "source", "messages", "meta"}
        assert validate_record(record) == "chat"
    assert not (tmp_path / "out.skipped.jsonl").exists()  # nothing skipped: no empty skip file


def test_json_lines_input(tmp_path):
    src = tmp_path / "o1.jsonl"
    src.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in O1), encoding="utf-8")
    records = prep(src, tmp_path / "out.jsonl")
    assert [r["messages"] for r in records] == EXPECTED_MESSAGES
    assert [r["id"] for r in records] == [f"medical-o1:o1.jsonl:{i}" for i in range(3)]


def test_bad_records_are_skipped_and_reported(tmp_path, capsys):
    bad = [
        {"Question": "高血压患者能喝咖啡吗？", "Complex_CoT": "咖啡因可短暂升高血压。"},  # no Response
        {"Question": "感冒需要吃抗生素吗？", "Complex_CoT": "  \n", "Response": "病毒性感冒不需要抗生素。"},
        {"Question": 42, "Complex_CoT": "无", "Response": "无"},
        {"Question": "头痛", "Response": "休息观察。"},  # no Complex_CoT at all
        {"Question": "  ", "Complex_CoT": "想", "Response": "答"},
    ]
    rows = [O1[0], *bad, O1[1]]
    src = tmp_path / "o1.json"
    src.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    records = prep(src, out)
    assert [r["messages"] for r in records] == EXPECTED_MESSAGES[:2]
    assert [r["id"] for r in records] == ["medical-o1:o1.json:0", "medical-o1:o1.json:6"]

    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0] == "read 7; written 2 (train 2, dev 0); skipped 5"
    for line in (
        "  skipped, no reasoning: 2",
        "  skipped, missing field: 1",
        "  skipped, invalid field: 1",
        "  skipped, empty question: 1",
    ):
        assert line in stdout.splitlines()
    assert f"skipped records are listed in {tmp_path / 'out.skipped.jsonl'}" in stdout

    skipped = [json.loads(line) for line in (tmp_path / "out.skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(s["index"], s["reason"], s["detail"]) for s in skipped] == [
        (1, "missing field", "'Response'"),
        (2, "no reasoning", "'Complex_CoT' is blank"),
        (3, "invalid field", "'Question' is a int, expected text"),
        (4, "no reasoning", "'Complex_CoT' is missing"),
        (5, "empty question", "'Question' is blank"),
    ]
    assert all(s["file"] == str(src) for s in skipped)


def test_two_runs_give_identical_bytes(tmp_path):
    src = tmp_path / "o1.json"
    src.write_text(json.dumps(O1 + [{"Question": "问", "Response": "答"}], ensure_ascii=False), encoding="utf-8")
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run / "out.jsonl"
        prep(src, out)
        outs.append((out.read_bytes(), out.with_name("out.skipped.jsonl").read_bytes()))
    assert outs[0] == outs[1]
    assert len(outs[0][0].splitlines()) == 3 and len(outs[0][1].splitlines()) == 1
