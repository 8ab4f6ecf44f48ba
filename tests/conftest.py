"""Shared fixtures: an isolated cache, the tiny model built from the demo data, small recipes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Set before anything imports medtune, so subprocesses inherit it too.
_CACHE = Path(tempfile.mkdtemp(prefix="medtune-test-cache-"))
os.environ.setdefault("MEDTUNE_CACHE", str(_CACHE))
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

from helpers import DEMO_DATA, SMALL_RECIPE, write_recipe  # noqa: E402 - after the environment above


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    from medtune.model.tiny import ensure_tiny_llama

    return ensure_tiny_llama([str(DEMO_DATA)])


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    from medtune.data.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_base))


@pytest.fixture
def small_recipe(tmp_path) -> Path:
    return write_recipe(tmp_path / "small.yaml", SMALL_RECIPE)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_base):
    """One short real training run shared by the tests that need a finished run directory."""
    from safetensors.torch import load_file

    from medtune.recipe import load_recipe
    from medtune.train import train

    tmp = tmp_path_factory.mktemp("train")
    path = write_recipe(tmp / "r.yaml", SMALL_RECIPE)
    recipe = load_recipe(path, [f"output.dir={tmp / 'run'}", "train.max_steps=40", "train.save_steps=0"])
    base_before = load_file(tiny_base / "model.safetensors")
    result = train(recipe)
    return result, base_before, tiny_base
