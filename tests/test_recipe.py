"""Recipes: strict for what a person writes, tolerant for what a program wrote."""

import pytest
from helpers import REPO, SMALL_RECIPE, write_recipe

from medtune.recipe import RecipeError, load_recipe
from medtune.train import main as train_main


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their data relative to the repository root
    recipe = load_recipe(path)
    assert recipe.data.train_files and recipe.output.dir


def test_misspelt_key_names_file_line_and_suggestion(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE.replace("learning_rate: 3e-3", "leraning_rate: 1e-4"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    line = next(i for i, item in enumerate(path.read_text().splitlines(), 1) if "leraning_rate" in item)
    assert f"{path}:{line}" in message
    assert "train.leraning_rate: unknown key; did you mean learning_rate?" in message


def test_train_command_exits_nonzero_before_loading_a_model(tmp_path, capsys):
    # The base does not exist: had anything tried to load it, the error would be a different one.
    text = SMALL_RECIPE.replace("base: tiny-llama", "base: /nonexistent/model").replace(
        "learning_rate: 3e-3", "leraning_rate: 1e-4"
    )
    path = write_recipe(tmp_path / "r.yaml", text)
    assert train_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "leraning_rate" in err and "did you mean learning_rate?" in err


def test_scientific_notation_without_dot_is_a_float(small_recipe):
    # PyYAML reads `3e-3` as a string; the recipe still gets a float.
    assert load_recipe(small_recipe).train.learning_rate == pytest.approx(3e-3)


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("max_steps: 12", "max_steps: twelve", "train.max_steps: expected int"),
        ("template: chatmed", "template: chatmd", "did you mean chatmed?"),
        ("dtype: fp32", "dtype: float32", "model.dtype: 'float32' is not one of"),
        ("eval_ratio: 0.1", "eval_ratio: 1.5", "data.eval_ratio"),
        ("target_modules: all-linear", "target_modules: all", "lora.target_modules"),
        ("  seed: 7", "  seed: 7\n  seed: 8", "duplicate key"),
    ],
)
def test_bad_values_fail_with_the_key(tmp_path, old, new, expected):
    path = write_recipe(tmp_path / "r.yaml", SMALL_RECIPE.replace(old, new))
    with pytest.raises(RecipeError, match=expected):
        load_recipe(path)


def test_overrides_apply_and_are_strict(small_recipe):
    recipe = load_recipe(small_recipe, ["train.max_steps=3", "lora.target_modules=[q_proj, v_proj]"])
    assert recipe.train.max_steps == 3 and recipe.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(RecipeError, match="did you mean max_steps"):
        load_recipe(small_recipe, ["train.max_step=3"])


def test_saved_recipe_round_trips_and_tolerates_unknown_keys(small_recipe, tmp_path):
    recipe = load_recipe(small_recipe)
    saved = write_recipe(tmp_path / "saved.yaml", recipe.to_yaml() + "future_group:\n  x: 1\n")
    with pytest.raises(RecipeError):
        load_recipe(saved)
    assert load_recipe(saved, strict=False) == recipe


def test_missing_data_file_is_named_before_anything_loads(small_recipe, capsys):
    assert train_main([str(small_recipe), "data.train_files=[no/such/data.jsonl]"]) == 2
    assert "data.train_files: no/such/data.jsonl: file not found" in capsys.readouterr().err


def test_training_files_mix_by_weight_or_count(tmp_path, tokenizer):
    import json

    from helpers import DEMO_DATA

    from medtune.data.records import held_out
    from medtune.data.token_cache import build_sft_rows

    records = DEMO_DATA.read_text(encoding="utf-8").splitlines()
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(records[:10]) + "\n", encoding="utf-8")
    second.write_text("\n".join(records[10:]) + "\n", encoding="utf-8")
    mixture = f"[{{path: {first}, samples: 25}}, {{path: {second}, weight: 0.5}}]"
    text = SMALL_RECIPE.replace(f"[{DEMO_DATA}]", mixture)
    path = write_recipe(tmp_path / "mix.yaml", text)
    recipe = load_recipe(path, ["data.eval_ratio=0.2"])
    held = [held_out(json.loads(x)["id"], 7, 0.2) for x in records]
    assert 0 < sum(held[:10]) < 10 and 0 < sum(held[10:]) < len(records) - 10
    train, evaluation, info = build_sft_rows(recipe.data, 7, tokenizer)
    # a: its training records drawn to 25 (whole shuffled passes, then part of one); b: the only weighted file,
    # so its training records are the whole weighted pool and weight 0.5 of 0.5 takes each once
    assert info["samples"] == len(train) == 25 + (len(records) - 10 - sum(held[10:]))
    assert len(evaluation) == sum(held)  # the held-out share of each file, by the hash of its ids
    assert not {tuple(r["input_ids"]) for r in evaluation} & {tuple(r["input_ids"]) for r in train}
    from_first = {
        tuple(r["input_ids"])
        for r in build_sft_rows(
            load_recipe(path, ["data.train_files=[" + str(first) + "]", "data.eval_ratio=0.2"]).data, 7, tokenizer
        )[0]
    }
    assert sum(tuple(r["input_ids"]) in from_first for r in train) == 25
    again, _, _ = build_sft_rows(load_recipe(path, ["data.eval_ratio=0.2"]).data, 7, tokenizer)
    other, _, _ = build_sft_rows(recipe.data, 8, tokenizer)
    assert again == train and other != train
    bad = write_recipe(tmp_path / "bad.yaml", text.replace("samples: 25", "samples: 25, weight: 1.0"))
    with pytest.raises(RecipeError, match="a.jsonl: give weight or samples"):
        load_recipe(bad)


def test_a_mixture_trains_and_is_recorded(tmp_path, capsys):
    from helpers import DEMO_DATA

    from medtune.train import train

    records = DEMO_DATA.read_text(encoding="utf-8").splitlines()
    first = tmp_path / "a.jsonl"
    first.write_text("\n".join(records[:10]) + "\n", encoding="utf-8")
    text = SMALL_RECIPE.replace(f"[{DEMO_DATA}]", f"[{{path: {first}, samples: 16}}, {DEMO_DATA}]")
    path = write_recipe(tmp_path / "mix.yaml", text)
    overrides = [f"output.dir={tmp_path / 'run'}", "train.max_steps=2", "train.save_steps=0", "train.resume=true"]
    run = train(load_recipe(path, overrides)).run
    # eval_ratio 0.1 holds out 2 of the demo's 40 ids by their hash, none of the 10 that a.jsonl repeats
    assert "mixture: a.jsonl 16 of 10; demo_medical.jsonl 38 of 38" in capsys.readouterr().out
    assert run.read_recipe().data.train_files[0].samples == 16  # the run directory records the mixture
    assert train(load_recipe(path, overrides)).model is None  # the same mixture: already finished


def test_a_recipes_data_is_found_beside_it_from_any_directory(tmp_path, monkeypatch):
    """The shipped demo names data/demo_medical.jsonl beside itself: loaded from elsewhere it finds it, and a
    file found in neither place is named with both places looked in."""
    from medtune.recipe import check_data_files

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(REPO / "recipes" / "demo.yaml")
    assert recipe.data.train_files == [str(REPO / "recipes" / "data" / "demo_medical.jsonl")]
    check_data_files(recipe)
    (tmp_path / "mine.jsonl").write_text("", encoding="utf-8")
    here = load_recipe(REPO / "recipes" / "demo.yaml", ["data.train_files=[mine.jsonl]"])
    assert here.data.train_files == [str(tmp_path / "mine.jsonl")]  # a command-line path: the current directory's
    typed = load_recipe(REPO / "recipes" / "demo.yaml", ["data.train_files=[data/demo_medical.jsonl]"])
    assert typed.data.train_files == ["data/demo_medical.jsonl"]  # never the file beside the recipe
    missing = load_recipe(REPO / "recipes" / "demo.yaml", ["data.train_files=[nowhere.jsonl]"])
    with pytest.raises(RecipeError) as caught:
        check_data_files(missing)
    message = str(caught.value)
    assert f"nowhere.jsonl: file not found (the current directory is {tmp_path}; the recipe's is" in message
