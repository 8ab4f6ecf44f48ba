"""The contamination an evaluation reports beside its score: how many of its items the model's training data
already holds (medtune/data/overlap.py's rule). The training files are those given with --train-files, else
those the run directory's recipe names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.console import MedtuneError
from medtune.data.overlap import contamination
from medtune.recipe import train_paths
from medtune.rundir import RunDir


def training_files(model: str, given: list[Path] | None) -> list[Path]:
    """--train-files, or the run's own (a run directory; none for a merged model or a hub id)."""
    if given:
        missing = [p for p in given if not p.is_file()]
        if missing:
            raise MedtuneError(f"--train-files {missing[0]}: file not found")
        return given
    run = RunDir(model)
    if not run.recipe_file.is_file():
        return []
    return [Path(p) for p in train_paths(run.read_recipe().data) if Path(p).is_file()]


def contamination_of(model: str, given: list[Path] | None, records: list[dict[str, Any]], benchmark: str) -> dict:
    """The report for scores.json; empty when no training file is known (a merged model without --train-files)."""
    files = training_files(model, given)
    return contamination(files, records, benchmark) if files else {}
