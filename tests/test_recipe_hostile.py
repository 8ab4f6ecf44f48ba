"""Recipes a person gets wrong: each is one `error:` line naming the file, line and key, exit 2, before any model
loads or anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import DEMO_DATA, SMALL_RECIPE, write_recipe

from medtune.data.records import RecordError, read_records
from medtune.train import main as train_main

MIXTURE = f"  train_files: [{DEMO_DATA}]"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("{path: a.jsonl, weight: .nan}", "data.train_files[1].weight: nan is not a finite number"),
        ("{path: a.jsonl, weight: .inf}", "data.train_files[1].weight: inf is not a finite number"),
        ("{path: b.jsonl, weight: lots}", "data.train_files[1].weight: expected float, got 'lots'"),
        ("{path: b.jsonl, wieght: 2}", "data.train_files[1].wieght: unknown key; did you mean weight?"),
    ],
)
def test_a_mixture_entry_is_blamed_on_its_own_line(tmp_path, capsys, entry: str, expected: str) -> None:
    mixture = f"  train_files:\n    - {{path: {DEMO_DATA}, weight: 1}}\n    - {entry}"
    path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE.replace(MIXTURE, mixture))
    line = path.read_text(encoding="utf-8").splitlines().index(f"    - {entry}") + 1
    assert train_main([str(path)]) == 2
    assert f"{path}:{line}: {expected}" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no run directory was made


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.seed=-1", "train.seed: -1: a seed from 0 to 2**32 - 1"),
        ("data.pad_to_multiple_of=-1", "data.pad_to_multiple_of: -1: 0 (exact) or a positive multiple"),
        ("train.learning_rate=.nan", "command line: train.learning_rate: nan is not a finite number"),
    ],
)
def test_impossible_numbers_are_refused_at_load(tmp_path, capsys, override: str, expected: str) -> None:
    path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE)
    assert train_main([str(path), override, f"output.dir={tmp_path / 'run'}"]) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_malformed_deepspeed_config_is_named_with_its_json_error(tmp_path, capsys) -> None:
    config = tmp_path / "ds.json"
    config.write_text('{"train_batch_size": 8,\n', encoding="utf-8")
    path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE)
    assert train_main([str(path), f"train.deepspeed={config}"]) == 2
    assert f"train.deepspeed: {config}:2:1: not valid JSON (Expecting property name" in one_error_line(capsys)


def test_a_gbk_recipe_names_its_line_and_a_bom_is_accepted(tmp_path, capsys) -> None:
    gbk = tmp_path / "gbk.yaml"
    gbk.write_bytes(SMALL_RECIPE.replace("# ", "").encode() + "# 中文注释\n".encode("gbk"))
    assert train_main([str(gbk)]) == 2
    line = SMALL_RECIPE.encode().count(b"\n") + 1
    assert f"gbk.yaml:{line}: not UTF-8 text; save the recipe as UTF-8" in one_error_line(capsys)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + SMALL_RECIPE.encode())
    assert train_main([str(bom), "train.max_steps=oops"]) == 2  # read past the BOM: the override is what fails
    assert "train.max_steps: expected int, got 'oops'" in one_error_line(capsys)


def test_a_train_file_with_a_bom_reads_and_a_gbk_one_names_its_line(tmp_path: Path) -> None:
    lines = DEMO_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:3]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(lines).encode())
    assert [lineno for lineno, _ in read_records(bom)] == [1, 2, 3]
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes("".join(lines[:2]).encode() + lines[2].encode("gbk"))
    with pytest.raises(RecordError, match=r"gbk.jsonl:3: not UTF-8 text \(byte 0x"):
        list(read_records(gbk))
