"""The one place that names the files of a run directory, and atomic checkpoints.

A run directory describes itself, so merge, predict and score need nothing else:

    recipe.yaml        the resolved recipe (every default written out)
    run_info.json      medtune version, resolved base model path/id, template, world size, progress
    adapter/           adapter_model.safetensors + adapter_config.json + tokenizer (with chat_template)
    checkpoints/step-N accelerate state (adapter weights, optimizer, scheduler, RNG) + trainer_state.json
    metrics.jsonl      one JSON object per logged step
    loss.png           the loss curve
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from medtune.console import MedtuneError
from medtune.paths import looks_local
from medtune.recipe import Recipe, RecipeError, load_recipe

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TRAINER_STATE = "trainer_state.json"


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.recipe_file = self.root / "recipe.yaml"
        self.info_file = self.root / "run_info.json"
        self.adapter_dir = self.root / "adapter"
        self.checkpoints_dir = self.root / "checkpoints"
        self.metrics_file = self.root / "metrics.jsonl"
        self.loss_plot = self.root / "loss.png"

    # -- description -------------------------------------------------------
    def read_info(self) -> dict[str, Any]:
        if not self.info_file.is_file():
            raise FileNotFoundError(f"{self.root}: not a medtune run directory (no {self.info_file.name})")
        return read_json(self.info_file)

    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_text(self.info_file, json.dumps(info, ensure_ascii=False, indent=2) + "\n")

    def read_recipe(self) -> Recipe:
        """Tolerant: a key written by an older or newer medtune is skipped, not an error."""
        return load_recipe(self.recipe_file, strict=False)

    def is_finished(self) -> bool:
        return self.info_file.is_file() and self.read_info().get("finished", False)

    def is_empty(self) -> bool:
        """Nothing there but (maybe) the lock a run that failed to start left behind."""
        return not self.root.exists() or all(p.name == LOCK_NAME for p in self.root.iterdir())

    # -- checkpoints ---------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, newest first: temp dirs of a killed save are never listed."""
        if not self.checkpoints_dir.is_dir():
            return []
        done = [
            p
            for p in self.checkpoints_dir.glob("step-*")
            if (p / TRAINER_STATE).is_file() and p.name.split("-")[1].isdigit()
        ]
        return sorted(done, key=lambda p: -int(p.name.split("-")[1]))

    def latest_checkpoint(self) -> Path | None:
        return next(iter(self.complete_checkpoints()), None)

    def save_checkpoint(self, accelerator, step: int, trainer_state: dict[str, Any], keep: int, **save_kwargs) -> Path:
        """Save into a temp dir, then rename: a kill at any moment leaves either the old or the new checkpoint."""
        final = self.checkpoints_dir / f"step-{step}"
        tmp = self.checkpoints_dir / f".tmp-step-{step}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp), **save_kwargs)
            save_rng_state(tmp, accelerator.process_index)
        except (OSError, RuntimeError) as exc:
            raise_if_disk_full(exc, tmp)
            raise
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_text(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune(keep)
        accelerator.wait_for_everyone()
        return final

    def remove_partial_checkpoints(self) -> list[str]:
        """The temp dirs of saves that were killed (medtune's own, never a complete checkpoint); their names."""
        partial = sorted(self.checkpoints_dir.glob(".tmp-step-*")) if self.checkpoints_dir.is_dir() else []
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
        return [p.name for p in partial]

    def _prune(self, keep: int) -> None:
        done = sorted(
            (p for p in self.checkpoints_dir.glob("step-*") if (p / TRAINER_STATE).is_file()),
            key=lambda p: int(p.name.split("-")[1]),
        )
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.checkpoints_dir.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- metrics -------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Logged rows; a line torn by a kill (or disk full) is skipped, the rest is kept."""
        if not self.metrics_file.is_file():
            return []
        rows = []
        for line in self.metrics_file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows

    def truncate_metrics(self, step: int) -> None:
        """On resume, forget what the killed run logged after its last checkpoint."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))


def raise_if_disk_full(exc: BaseException, partial: Path) -> None:
    """torch's zip writer reports a full disk as "RuntimeError: … unexpected pos …": when the disk is full, the
    partial checkpoint (medtune's own temp dir) goes and ENOSPC is raised, which commands print as one line. The
    complete checkpoints before it stay: --resume continues from the last one once there is room."""
    full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or shutil.disk_usage(partial.parent).free < 1 << 20
    if not full:
        return
    shutil.rmtree(partial, ignore_errors=True)
    raise OSError(errno.ENOSPC, "No space left on device", str(partial.parent)) from None


def save_rng_state(directory: Path, process_index: int) -> None:
    """This process's torch RNG (dropout) as safetensors, so a resume never needs to unpickle it."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    save_file(state, str(directory / f"rng_state_{process_index}.safetensors"))


LOCK_NAME = ".medtune.lock"


class RunLock:
    """An exclusive lock on a run directory for as long as a training process lives (flock: the kernel
    drops it when the process dies, so a killed run never leaves a stale lock). The file names the pid."""

    def __init__(self, root: Path):
        self.path = root / LOCK_NAME
        self.created_root = not root.exists()
        self.handle = None

    def acquire(self) -> None:
        import fcntl  # POSIX only: imported where the lock is taken, so that the module imports anywhere

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise RunInUse(
                f"{self.path.parent}: another medtune process (pid {holder}) is training in this "
                "run directory; wait for it to end or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        """Drop the lock; a run directory this lock created and nothing else wrote into goes again."""
        if self.handle is None:
            return
        self.handle.close()  # closing the descriptor drops the flock
        self.handle = None
        root = self.path.parent
        if self.created_root and [p.name for p in root.iterdir()] == [LOCK_NAME]:
            self.path.unlink(missing_ok=True)
            root.rmdir()


class RunInUse(MedtuneError):
    """Another process holds the run directory's lock."""


# What may change when a run is resumed: how long it trains and what it logs, not what it learns from.
SAFE_TO_CHANGE_ON_RESUME = (
    "train.max_steps",
    "train.num_epochs",
    "train.logging_steps",
    "train.eval_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.report_to",
    "train.resume",
)


def recipe_changes(saved: Recipe, new: Recipe) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} for every setting that differs."""

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}

    old, cur = flat(saved.to_dict()), flat(new.to_dict())
    return {
        k: (old.get(k), cur.get(k))
        for k in sorted(set(old) | set(cur))
        if same_files(k, old.get(k)) != same_files(k, cur.get(k))
    }


PATH_KEYS = ("data.train_files", "data.eval_files", "train.deepspeed")


def same_files(key: str, value: Any) -> Any:
    """A path setting as the files it names (resolved from the current directory), so that a run saved with
    `recipes/data/x.jsonl` and resumed with the absolute path a recipe now resolves to is the same run."""
    if key not in PATH_KEYS or value is None:
        return value
    resolve = lambda p: str(Path(p).resolve())  # noqa: E731
    if isinstance(value, str):
        return resolve(value)
    return [resolve(v) if isinstance(v, str) else {**v, "path": resolve(v["path"])} for v in value]


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object medtune (or peft) wrote beside a model; a damaged one is one error naming it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f":{exc.lineno}:{exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise MedtuneError(f"{path}{where}: damaged ({exc}); restore it or make the directory again") from None
    if not isinstance(value, dict):
        raise MedtuneError(f"{path}: damaged (a JSON object is expected); restore it or make the directory again")
    return value


def file_identities(places, suffixes: tuple[str, ...] = (".safetensors", ".bin")) -> dict[str, list]:
    """Name, size and mtime of the files ending in ``suffixes`` in each local directory of ``places`` (a hub id
    has none): a model or adapter rebuilt in place is a new input, without hashing gigabytes of weights."""
    found = {}
    for place in places:
        path = Path(place)
        if path.is_dir():
            found[str(path.resolve())] = sorted(
                (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.suffix in suffixes
            )
    return found


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# Beside the loss, what a stage's rows carry: RL's reward and KL, a preference stage's accuracy and margin.
SIDE_PANELS = (
    ("reward", ("reward", "kl"), "reward / KL per reply"),
    ("rewards/accuracy", ("rewards/accuracy", "rewards/margin"), "chosen beats rejected: accuracy, margin"),
)


def loss_figure(rows: list[dict[str, Any]]) -> Figure:
    """Train (and eval) loss against step, and beside it what the stage logs (reward and KL for RL, accuracy and
    margin for RM/DPO): a matplotlib figure, drawn without pyplot (no backend, nothing global to close)."""
    from matplotlib.figure import Figure  # 0.4 s to import: paid when a run ends or a report is drawn, not at start

    side = [(keys, title) for marker, keys, title in SIDE_PANELS if any(marker in r for r in rows)]
    fig = Figure(figsize=(6 + 5 * len(side), 4))
    axes = fig.subplots(1, 1 + len(side), squeeze=False)[0]
    curves = [("loss", "-", "train loss"), ("eval_loss", "o-", "eval loss")]
    draw_curves(axes[0], rows, curves, "loss (per item)")
    for ax, (keys, title) in zip(axes[1:], side, strict=True):
        draw_curves(ax, rows, [(key, ".-", key) for key in keys], title)
    fig.tight_layout()
    return fig


def draw_curves(ax, rows: list[dict[str, Any]], curves: list[tuple[str, str, str]], ylabel: str) -> None:
    """One panel: each key's values against the step (a single logged point shows as a marker)."""
    drawn = False
    for key, style, label in curves:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), style if len(points) > 1 else "o", label=label)
            drawn = True
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if drawn:
        ax.legend()
    ax.grid(alpha=0.3)


def plot_loss(rows: list[dict[str, Any]], out: Path) -> None:
    """The loss curves as a PNG a person can glance at, beside the run's metrics."""
    tmp = out.with_name(f".{out.stem}.tmp.png")
    loss_figure(rows).savefig(tmp, dpi=100)
    os.replace(tmp, out)


MERGE_INFO = "medtune_merge.json"  # written beside a merged model: its ModelSource and the parity figure


@dataclass(frozen=True)
class ModelSource:
    """Everything merge, predict and chat need to know about a model, read back from where it lives: a run
    directory, an adapter directory, a merged directory, or a hub id / plain model directory."""

    base: str  # the weights to load: an absolute path or a hub id
    adapters: tuple[str, ...] = ()  # LoRA adapters to apply, in order
    template: str | None = None  # chat template name; None = unknown (pass --template)
    system_prompt: str | None = None  # data.system_prompt the run trained with (None = the template's default)
    stage: str = "sft"
    dtype: str | None = None  # the precision the run trained in
    tokenizer: str = ""  # where the tokenizer (with its chat template) is
    tokenizer_kind: str = "auto"  # auto | sentencepiece | fast: how the run loaded it
    trust_remote_code: bool = False
    quantized_training: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def describe_source(path_or_id: str, base_override: str | None = None) -> ModelSource:
    """What a path given to merge/predict/chat is. A run directory (from its recipe and run_info), an
    adapter directory, a merged model directory (from medtune_merge.json), or anything else (a hub id or
    plain model directory: no template known)."""
    path = Path(path_or_id)
    run = RunDir(path)
    if run.info_file.is_file():
        info, recipe = run.read_info(), run.read_recipe()
        if not info.get("finished"):
            raise MedtuneError(f"{path}: this run has not finished (no final adapter yet); resume it first")
        base = base_override or info["base_model"]
        if Path(base).is_absolute() and not Path(base).is_dir():
            raise MedtuneError(
                f"{run.info_file}: base_model {base}: no such directory (moved?); merge with --base NEW_PATH, or put it back"  # noqa: E501
            )
        return ModelSource(
            base=base,
            adapters=(str(run.adapter_dir.resolve()),),
            template=recipe.data.template,
            system_prompt=recipe.data.system_prompt,
            stage=recipe.train.stage,
            dtype=info.get("dtype"),
            tokenizer=str(run.adapter_dir.resolve()),
            tokenizer_kind=info.get("tokenizer_kind", recipe.model.tokenizer),
            trust_remote_code=recipe.model.trust_remote_code,
            quantized_training=recipe.model.quantization is not None,
        )
    if (path / "adapter_config.json").is_file():
        config = read_json(path / "adapter_config.json")
        base = base_override or config.get("base_model_name_or_path")
        if not base:
            raise MedtuneError(f"{path}: the adapter does not name its base model; pass --base")
        has_tokenizer = any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
        return ModelSource(base=base, adapters=(str(path.resolve()),), tokenizer=str(path) if has_tokenizer else base)
    if (path / MERGE_INFO).is_file():
        saved = read_json(path / MERGE_INFO)
        fields = {f.name for f in dataclasses.fields(ModelSource)} - {"base", "adapters", "tokenizer"}
        known = {k: v for k, v in saved.get("source", saved).items() if k in fields}
        merged = str(path.resolve())
        return ModelSource(base=base_override or merged, tokenizer=base_override or merged, **known)
    if not path.exists() and looks_local(path_or_id):
        raise MedtuneError(f"{path_or_id}: no such run, adapter or model directory")
    return ModelSource(base=base_override or path_or_id, tokenizer=base_override or path_or_id)


def plan_start(run: RunDir, recipe: Recipe) -> tuple[str, list[Path]]:
    """Decide between a fresh start, a resume and 'already done', reading only: nothing is deleted, and a
    directory holding anything medtune did not write (or a run with other settings) is refused.

    Returns (mode, checkpoints to try newest first)."""
    where = f"{run.root}"
    saved = run.read_recipe() if run.recipe_file.is_file() else None
    if saved is None or not recipe.train.resume:
        if not run.is_empty():
            what = "a run already exists there" if saved is not None else "it is not empty"
            raise RecipeError(
                f"{where}: {what}. Continue a run with --resume (train.resume=true), or choose "
                f"another output.dir=...; medtune never deletes a folder it did not create"
            )
        return "fresh", []
    changes = {k: v for k, v in recipe_changes(saved, recipe).items() if k != "train.resume"}
    listed = "; ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in changes.items())
    if run.is_finished():
        if changes:
            raise RecipeError(
                f"{where}: this run finished with other settings ({listed}); train into another output.dir to use them"
            )
        return "finished", []
    unsafe = {k: v for k, v in changes.items() if k not in SAFE_TO_CHANGE_ON_RESUME}
    if "train.max_steps" in changes and 0 < changes["train.max_steps"][1] < max(changes["train.max_steps"][0], 0):
        unsafe["train.max_steps"] = changes["train.max_steps"]
    if unsafe:
        raise RecipeError(
            f"{where}: cannot resume with changed settings: "
            + "; ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in unsafe.items())
            + " (only how long it trains and what it logs may change, and train.max_steps only grow; "
            "use another output.dir)"
        )
    checkpoints = run.complete_checkpoints()
    if checkpoints:
        return "resume", checkpoints
    return "restart", []  # killed before its first complete checkpoint: train.py says so and starts at step 0


def restore(accelerator, scheduler, checkpoints: list[Path], deepspeed: bool) -> dict[str, Any]:
    """Load the newest checkpoint that loads into the prepared objects and the scheduler, and return its
    trainer state (step, tokens_seen); a damaged one is named and the previous one used."""
    for i, checkpoint in enumerate(checkpoints):
        try:
            with checkpoint_without_pickles(checkpoint) as view:
                # Checkpoints hold only the trainable weights, so the frozen base is "missing" on purpose.
                accelerator.load_state(
                    str(view), **({"load_module_strict": False} if deepspeed else {"strict": False})
                )
            state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
            restore_schedule_and_rng(scheduler, accelerator.process_index, checkpoint, state)
        except Exception as exc:  # noqa: BLE001 - any failure to read a checkpoint means: try the one before
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            if i + 1 == len(checkpoints):
                raise RecipeError(
                    f"{checkpoint}: cannot be loaded ({reason}), and no older checkpoint is left; "
                    "move the run directory away to start again"
                ) from None
            accelerator.print(f"{checkpoint.name} is damaged ({reason}); resuming from {checkpoints[i + 1].name}")
            continue
        return {**state, "checkpoint": checkpoint.name}
    raise RecipeError("no checkpoint to resume from")  # plan_start returns "resume" only with checkpoints


@contextmanager
def checkpoint_without_pickles(checkpoint: Path) -> Iterator[Path]:
    """The checkpoint as accelerate sees it, minus ``custom_checkpoint_*.pkl``: accelerate unpickles those
    with weights_only=False (code could run), and medtune registers none (its scheduler state is JSON), so
    a planted or older one is never even opened. Everything else accelerate reads with weights_only=True."""
    view = Path(tempfile.mkdtemp(prefix=".load-", dir=checkpoint.parent))
    try:
        for entry in checkpoint.iterdir():
            if not (entry.name.startswith("custom_checkpoint_") and entry.suffix == ".pkl"):
                (view / entry.name).symlink_to(entry.resolve())
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


def restore_schedule_and_rng(scheduler, process_index: int, checkpoint: Path, state: dict[str, Any]) -> None:
    """The scheduler from JSON, this process's torch RNG from safetensors: nothing pickled is loaded."""
    if "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    else:  # a checkpoint from before medtune 0.2: the schedule is a function of the step
        for _ in range(state["step"]):
            scheduler.step()
    rng_file = checkpoint / f"rng_state_{process_index}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state_all(list(rng["cuda"]))
