"""Where an evaluation writes, and the saved outputs it reads: shared by eval exam and eval dialogue."""

from __future__ import annotations

from pathlib import Path

from medtune.console import MedtuneError
from medtune.data.records import iter_json_lines


def prepare_out_dir(out_dir: Path) -> Path:
    """DIR/predictions.jsonl; a scores.json with no predictions medtune wrote beside it is not ours to replace."""
    if out_dir.exists() and not out_dir.is_dir():
        raise MedtuneError(f"--out {out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "predictions.jsonl"
    if (out_dir / "scores.json").exists() and not (out_dir / "predictions.jsonl.medtune.json").exists():
        raise MedtuneError(f"--out {out_dir}: has a scores.json medtune eval did not write; choose another --out")
    return out


def read_outputs(path: Path) -> dict[str, str]:
    """{"id", "output"} lines (medtune predict's "prediction" key is read too)."""
    outputs: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, row in iter_json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("id"), (str, int)):
            raise MedtuneError(f'{path}:{lineno}: expected {{"id": ..., "output": "..."}}')
        text = row.get("output", row.get("prediction"))
        if not isinstance(text, str):
            raise MedtuneError(f"{path}:{lineno}: field 'output': the model's reply as a string is required")
        rid = str(row["id"])
        if rid in outputs:
            raise MedtuneError(
                f"{path}: id {rid!r} is on line {first_line[rid]} and again on line {lineno}; keep one reply per id"
            )
        outputs[rid], first_line[rid] = text, lineno
    return outputs


def check_covers(outputs: dict[str, str], ids: list[str], option: str, path: Path, data: Path) -> None:
    """Saved outputs must answer exactly the items of the data: a score on part of a test is not its score."""
    missing = [i for i in ids if i not in outputs]
    unknown = sorted(set(outputs) - set(ids))
    problems = []
    if missing:
        problems.append(f"{len(missing)} items of {data.name} have no output (first: {missing[0]})")
    if unknown:
        problems.append(f"{len(unknown)} outputs match no item (first: {unknown[0]})")
    if problems:
        raise MedtuneError(f"{option} {path}: {'; '.join(problems)}; give outputs for exactly the items of {data}")
