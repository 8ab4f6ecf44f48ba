"""data_prep on hostile input (issue 23): each case is either skipped and counted in the skip report, or refused
in one `error:` line, exit 2, with the output of an earlier run left as it was."""

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest

from data_prep import pipeline
from data_prep.__main__ import main as prep_main


def write(path: Path, lines: list) -> Path:
    """JSON lines; a str is written as it is (for what json.dumps will not write, such as NaN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Strict JSON lines: NaN and Infinity, which Python's json would accept, fail the test."""

    def reject(constant: str) -> None:
        raise ValueError(f"{path}: {constant} is not JSON")

    return [json.loads(line, parse_constant=reject) for line in path.read_text(encoding="utf-8").splitlines()]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- 1. invisible answers

# zero-width space, word joiner, BOM, soft hyphen, non-joiner, ideographic space, joiner, function application
INVISIBLE = ["\u200b", " \u200b\u2060\ufeff ", "\u00ad\u200c\u3000\u200d\u2061\n"]
ANSWER_IN = {  # source → one input record whose answer is `answer`
    "chatmed-consult": lambda n, answer: {"query": f"问题{n}", "response": answer},
    "alpaca": lambda n, answer: {"instruction": f"问题{n}", "input": "", "output": answer},
    "promptcblue": lambda n, answer: {
        "input": f"问题{n}\n答：",
        "target": answer,
        "answer_choices": None,
        "task_type": "qa",
        "task_dataset": "MedDG",
        "sample_id": f"s{n}",
    },
    "preference": lambda n, answer: {"instruction": f"问题{n}", "output": [answer, "多喝酒。"]},
    "sharegpt": lambda n, answer: {
        "conversations": [{"from": "human", "value": f"问题{n}"}, {"from": "gpt", "value": answer}]
    },
}


@pytest.mark.parametrize("source", sorted(ANSWER_IN))
def test_an_answer_of_only_invisible_characters_is_skipped_and_counted(tmp_path, capsys, source):
    answers = [*INVISIBLE, "建议就医。"]
    src = write(tmp_path / "in.jsonl", [ANSWER_IN[source](n, a) for n, a in enumerate(answers)])
    out = tmp_path / "out.jsonl"
    assert prep_main([source, str(src), "--out", str(out), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["read 4; written 1 (train 1, dev 0); skipped 3", "  skipped, empty answer: 3"]
    written = read_jsonl(out)
    assert len(written) == 1 and "建议就医。" in json.dumps(written[0], ensure_ascii=False)
    skipped = read_jsonl(tmp_path / "out.skipped.jsonl")
    assert [(s["line"], s["reason"]) for s in skipped] == [(n, "empty answer") for n in (1, 2, 3)]
    assert skipped[0]["detail"].endswith("holds only invisible characters (U+200B)")
    assert skipped[2]["detail"].endswith("holds only invisible characters (U+00AD U+200C U+3000 U+200D …)")


# ----------------------------------------------------------------------------- 2. repeated ids


def test_a_repeated_id_is_skipped_across_the_input_files_of_a_run(tmp_path, capsys):
    first = write(
        tmp_path / "a.jsonl",
        [
            {"id": "q1", "query": "头痛怎么办", "response": "多休息。"},
            {"id": "q2", "query": "咳嗽怎么办", "response": "多喝水。"},
            {"id": "q1", "query": "另一个问题", "response": "另一个回答。"},
        ],
    )
    second = write(
        tmp_path / "b.jsonl",
        [
            {"id": "q2", "query": "发烧怎么办", "response": "物理降温。"},
            {"id": "q3", "query": "胃痛", "response": "就医。"},
        ],
    )
    out = tmp_path / "out.jsonl"
    assert prep_main(["chatmed-consult", str(first), str(second), "--out", str(out), "--quiet"]) == 0
    assert "  skipped, duplicate id: 2" in capsys.readouterr().out.splitlines()
    written = read_jsonl(out)
    assert [(r["id"], r["messages"][0]["content"]) for r in written] == [
        ("q1", "头痛怎么办"),  # the first record of an id is the one kept
        ("q2", "咳嗽怎么办"),
        ("q3", "胃痛"),
    ]
    skipped = read_jsonl(tmp_path / "out.skipped.jsonl")
    assert [(Path(s["file"]).name, s["line"], s["reason"], s["detail"]) for s in skipped] == [
        ("a.jsonl", 3, "duplicate id", "'q1' is the id of an earlier record of this run"),
        ("b.jsonl", 1, "duplicate id", "'q2' is the id of an earlier record of this run"),
    ]


# ----------------------------------------------------------------------------- 3. one file given twice


@pytest.mark.parametrize("spelling", ["same path", "another spelling", "symlink"])
def test_the_same_input_file_given_twice_is_refused_before_anything_is_written(tmp_path, capsys, spelling):
    src = write(tmp_path / "data" / "train.json", [{"query": "头痛", "response": "休息。"}])
    again = {
        "same path": src,
        "another spelling": tmp_path / "data" / ".." / "data" / "train.json",
        "symlink": tmp_path / "link.json",
    }[spelling]
    if spelling == "symlink":
        again.symlink_to(src)
    out = write(tmp_path / "out" / "out.jsonl", [{"old": "run"}])
    before = digest(out)
    assert prep_main(["chatmed-consult", str(src), str(again), "--out", str(out), "--quiet"]) == 2
    also = "" if spelling == "same path" else f" (also as {src})"
    assert capsys.readouterr().err.splitlines() == [
        f"error: {again}: the same input file is given twice{also}; give each file once "
        "(its records would be written twice, under colliding ids)"
    ]
    assert digest(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]


# ----------------------------------------------------------------------------- 4. NaN and Infinity


def promptcblue_line(sample_id: str, answer_choices: str = '["治疗方案"]', task_type: str = '"cls"') -> str:
    """A raw line, so that it can hold what json.dumps would not write."""
    return (
        '{"input": "意图：\\n发烧怎么办\\n答：", "target": "治疗方案", '
        f'"answer_choices": {answer_choices}, "task_type": {task_type}, '
        f'"task_dataset": "KUAKE-QIC", "sample_id": "{sample_id}"}}'
    )


def test_nan_and_infinity_are_never_written_the_record_is_skipped_naming_the_field(tmp_path, capsys):
    src = write(
        tmp_path / "dev.json",
        [
            promptcblue_line("s1", answer_choices='["治疗方案", NaN]'),
            promptcblue_line("s2", task_type="Infinity"),
            promptcblue_line("s3", answer_choices="[-Infinity]"),
            promptcblue_line("s4"),
        ],
    )
    out = tmp_path / "out.jsonl"
    assert prep_main(["promptcblue", str(src), "--out", str(out), "--quiet"]) == 0
    assert "  skipped, non-finite number: 3" in capsys.readouterr().out.splitlines()
    assert [r["id"] for r in read_jsonl(out)] == ["s4"]  # read strictly: no NaN or Infinity in the file
    skipped = read_jsonl(tmp_path / "out.skipped.jsonl")
    advice = "; JSON has no NaN or Infinity: write null or a string in the input"
    assert [s["detail"] for s in skipped] == [
        "meta.answer_choices[1] is NaN" + advice,
        "meta.task_type is Infinity" + advice,
        "meta.answer_choices[0] is -Infinity" + advice,
    ]


# ----------------------------------------------------------------------------- 5. limits of 0 or less


@pytest.mark.parametrize("option,value", [("--max-length", "0"), ("--max-length", "-5"), ("--max-per-task", "0")])
def test_a_limit_of_zero_or_less_is_an_argument_error(tmp_path, capsys, option, value):
    src = write(tmp_path / "in.jsonl", [{"query": "头痛", "response": "休息。"}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exited:
        prep_main(["chatmed-consult", str(src), "--out", str(out), option, value, "--quiet"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m data_prep: error: argument {option}: must be 1 or more (got {value}); "
        "leave the option out for no limit"
    )
    assert not out.exists()


# ----------------------------------------------------------------------------- 6. outputs that cannot be written


class FullDisk:
    """An output file on a disk that has just filled up: the file is made, every write fails with ENOSPC."""

    def __init__(self, path: Path):
        self.file = path.open("w", encoding="utf-8")

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self) -> None:
        self.file.close()


def read_only(path: Path):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))


@pytest.mark.parametrize("case", ["--out a directory", "read-only folder", "full disk"])
def test_an_output_that_cannot_be_written_is_one_line_and_keeps_the_old_output(tmp_path, capsys, monkeypatch, case):
    src = write(tmp_path / "in.jsonl", [{"query": "头痛", "response": "休息。"}, {"query": "咳嗽", "response": "水"}])
    old = write(tmp_path / "out" / "out.jsonl", [{"old": "run"}])
    before = digest(old)
    out = old
    if case == "--out a directory":
        out = old.parent
        expected = f"{out}: --out is a directory; give a file name, e.g. --out {out / 'train.jsonl'}"
    elif case == "read-only folder":  # simulated: the tests may run as root, whom a chmod does not stop
        monkeypatch.setattr(pipeline, "open_output", read_only)
        expected = f"{old}: cannot write ({os.strerror(errno.EROFS)}); choose an --out in a folder you can write"
    else:
        monkeypatch.setattr(pipeline, "open_output", FullDisk)
        expected = (
            f"no space left on the device writing {old}; free some space and run the same command again "
            "(written files are complete or absent)"
        )
    assert prep_main(["chatmed-consult", str(src), "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: {expected}"] and captured.out == ""
    assert digest(old) == before
    assert sorted(p.name for p in old.parent.iterdir()) == ["out.jsonl"]  # no temp file, no skip report left


def test_the_id_digests_settle_into_a_sorted_array_and_still_answer(monkeypatch):
    """Past its buffer the set moves digests into one sorted uint64 array (8 bytes each); membership holds."""
    from data_prep.pipeline import DigestSet

    monkeypatch.setattr(DigestSet, "BUFFER", 4)
    seen = DigestSet()
    keys = [2**64 - 1, 0, 17, 2**63, 5, 99, 12345678901234567890, 3, 8, 1]
    for start in range(0, len(keys), 3):
        seen.update(keys[start : start + 3])
    assert len(seen.settled) >= 8 and len(seen.recent) < 4
    assert all(key in seen for key in keys)
    assert not any(key in seen for key in (2, 4, 2**64 - 2, 2**63 + 1))


@pytest.mark.parametrize(
    ("line", "source"),
    [
        ({"query": "<s>问：\n头痛\n答：\n", "response": "休息"}, "chatmed-consult"),
        ({"input": "判断意图：\n发烧\n答：", "target": "治疗方案", "task_dataset": "KUAKE-QIC"}, "promptcblue"),
        ({"Question": "q", "Complex_CoT": "c", "Response": "r"}, "medical-o1"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt"),
        ({"instruction": "q", "input": "", "output": ["好", "坏"]}, "preference"),
        ({"instruction": ["q"], "output": ["a"]}, "huatuo"),
        ({"instruction": "q", "output": "a", "history": [], "cate1": "内科"}, "cmtmedqa"),
        ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
        ([{"instruction": "q", "output": "a"}], "alpaca"),
    ],
)
def test_train_on_a_raw_corpus_names_the_converter_that_fits(tmp_path, capsys, line, source: str) -> None:
    from helpers import SMALL_RECIPE, write_recipe

    from medtune.train import main as train_main

    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE)
    assert train_main([str(recipe), f"data.train_files=[{raw}]", f"output.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"convert it first with python -m data_prep {source} FILE" in err and err.count("\n") == 1


def test_a_converter_refuses_text_already_in_a_chat_template(tmp_path, capsys) -> None:
    """ChatMed's queries through `alpaca` (the old hint's advice) would be templated twice: skipped and counted."""
    raw = tmp_path / "chatmed.jsonl"
    rows = [
        {"instruction": "<s>问：\n头痛怎么办？\n答：\n", "output": "多休息。"},
        {"instruction": "问：孩子发烧\n答：", "output": "物理降温。"},
        {"instruction": "<|im_start|>user\n胃痛<|im_end|>", "output": "清淡饮食。"},
        {"instruction": "高血压吃什么？", "output": "少盐。"},
    ]
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert prep_main(["alpaca", str(raw), "--out", str(out)]) == 0
    assert "skipped, already in a chat template: 3" in capsys.readouterr().out
    assert [json.loads(line)["messages"][0]["content"] for line in out.read_text("utf-8").splitlines()] == [
        "高血压吃什么？"
    ]


def test_progress_into_a_pipe_is_whole_lines_and_no_empty_skip_file_is_left(tmp_path, capsys) -> None:
    raw = tmp_path / "alpaca.jsonl"
    raw.write_text(
        json.dumps({"instruction": "头痛怎么办？", "output": "多休息。"}, ensure_ascii=False) + "\n", "utf-8"
    )
    out = tmp_path / "out.jsonl"
    stale = tmp_path / "out.skipped.jsonl"
    stale.write_text('{"reason": "from an earlier run"}\n', encoding="utf-8")
    assert prep_main(["alpaca", str(raw), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "1 rows, " in err  # stderr is not a terminal here: lines, not a redrawn one
    assert f"removed {stale} of an earlier run (this run skipped nothing)" in err
    assert not stale.exists() and len(out.read_text(encoding="utf-8").splitlines()) == 1
