"""The stage table is closed: its names are the recipe's, every stage has its rows and its loss, and no module
outside medtune/stages.py looks at a stage's name."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest
from helpers import REPO

from medtune.data.rows import ROW_KINDS
from medtune.recipe import RecipeError, TrainConfig, load_recipe
from medtune.stages import STAGES, get_stage
from medtune.training.objectives import OBJECTIVES


def test_the_recipe_allows_exactly_the_tables_stages() -> None:
    allowed = typing.get_args(typing.get_type_hints(TrainConfig)["stage"])
    assert allowed == tuple(STAGES)


def test_every_stage_has_its_rows_and_its_objective() -> None:
    assert set(OBJECTIVES) == set(STAGES)
    for stage in STAGES.values():
        assert stage.rows in ROW_KINDS, stage.name
        assert (stage.advantages is not None) == stage.rollout, stage.name  # how a rollout's rewards are used
        assert not (stage.value_head and stage.reward_head), stage.name


def test_an_unknown_stage_is_one_error_naming_the_key_and_the_table(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  stage: kto\n", encoding="utf-8")
    with pytest.raises(RecipeError) as caught:
        load_recipe(str(recipe))
    message = str(caught.value)
    assert "train.stage" in message and all(name in message for name in STAGES)
    with pytest.raises(Exception, match="train.stage: unknown stage 'kto'"):
        get_stage("kto")


def stage_name_comparisons(path: Path) -> list[str]:
    """`x == "ppo"`, `"sft" != y`, `x in ("ppo", "grpo")`: comparisons with a stage's name as a literal."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            literals = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            if any(isinstance(x, ast.Constant) and x.value in STAGES for x in literals):
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_module_but_the_table_compares_stage_names() -> None:
    modules = [p for p in (REPO / "medtune").rglob("*.py") if p != REPO / "medtune/stages.py"]
    assert len(modules) > 40
    assert [hit for p in modules for hit in stage_name_comparisons(p)] == []


def test_the_comparison_finder_finds_one(tmp_path: Path) -> None:
    """The check above could fail: a planted comparison is found."""
    planted = tmp_path / "planted.py"
    planted.write_text('def f(stage):\n    return stage in ("ppo", "x") or "sft" == stage\n', encoding="utf-8")
    assert stage_name_comparisons(planted) == ["planted.py:2"] * 2
