"""Recipes: the YAML a person writes, read into typed dataclasses.

Strict for what a person writes: an unknown key, a wrong type or an impossible
combination fails before any model is loaded, naming the file, the line, the key
and the closest valid key. Tolerant for what a program wrote earlier
(``strict=False``), so that an older run directory still loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from medtune.console import MedtuneError
from medtune.data.templates import template_names
from medtune.stages import STAGE_NAMES, STAGES, get_stage

Dtype = Literal["auto", "bf16", "fp16", "fp32"]
StageName = Literal[STAGE_NAMES]  # exactly the stage table's names (medtune/stages.py)


class RecipeError(MedtuneError):
    """A recipe that cannot be used as written; the message says where and why."""


@dataclass
class QuantizationConfig:
    """bitsandbytes k-bit loading of the frozen base (QLoRA)."""

    bits: Literal[4, 8] = 4  # 4 = QLoRA (nf4/fp4), 8 = LLM.int8
    type: Literal["nf4", "fp4"] = "nf4"  # 4-bit data type; nf4 is what QLoRA recommends
    double_quant: bool = True  # also quantize the quantization constants (saves ~0.4 bit/param)
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # dtype the 4-bit matmuls run in


@dataclass
class ModelConfig:
    """Which base model and how to load it."""

    base: str = "tiny-llama"  # hub id, local path, or the built-in `tiny-llama` (random weights, built locally)
    dtype: Dtype = "auto"  # weights and mixed precision; auto = bf16 on a bf16 GPU, else fp32
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    tokenizer: Literal["auto", "sentencepiece", "fast"] = (
        "auto"  # auto: SentencePiece when the model ships only tokenizer.model (or asks for the slow tokenizer)
    )
    trust_remote_code: bool = False  # run code shipped with the model; only when you trust its author
    quantization: QuantizationConfig | None = None  # null = no quantization


@dataclass
class LoraSettings:
    """The adapter that is trained; peft builds it."""

    r: int = 8  # rank of the update matrices
    alpha: int = 16  # scaling numerator: the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapter input
    target_modules: str | list[str] = "all-linear"  # module names, or `all-linear`
    modules_to_save: list[str] = field(default_factory=list)  # fully trained and saved, e.g. [lm_head]


@dataclass
class TrainFile:
    """A training file with its share of the mixture: a weight (relative to the other weighted files) or an
    exact number of samples (drawn without repeats while it has enough, repeated when it has fewer)."""

    path: str
    weight: float | None = None
    samples: int | None = None


@dataclass
class DataConfig:
    """Instruction JSONL files (see README: the record format) and how they become tokens."""

    # instruction JSONL written by data_prep; an entry may be {path, weight} or {path, samples} to mix
    train_files: list[str | TrainFile] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)  # held-out JSONL; empty = split eval_ratio off train
    eval_ratio: float = 0.0  # fraction of train records held out when eval_files is empty
    template: str = "chatmed"  # chat template name (medtune template list); model: the base's own chat template
    system_prompt: str | None = None  # replaces the template's default system prompt
    max_length: int = 1024  # tokens per sample; longer samples are cut, and dropped if no answer is left
    train_on: Literal["all_turns", "last_turn"] = "all_turns"  # which assistant turns carry loss
    packing: bool | Literal["concat"] = False  # true: several samples per row, kept apart; concat: baseline blocks
    group_by_length: bool = True  # batch samples of similar length together (when not packing)
    pad_to_multiple_of: int = 0  # pad batches to a multiple of this (8 suits tensor cores); 0 = exact
    tokenize_workers: int | None = None  # processes that tokenize; unset: one per core for inputs over 16 MiB


@dataclass
class TrainConfig:
    """The optimisation, one loop for every stage."""

    stage: StageName = (
        "sft"  # pre-training on text, SFT on chats, reward model or DPO on pairs, online RL on prompts (rl group)
    )
    dpo_beta: float = 0.1  # DPO: how far the policy may move from the reference (the base without the adapter)
    # Dropout (the base's and LoRA's) during training. Unset: off for rm and dpo — TRL and the DPO paper
    # train preferences without it (with it, the policy's log-probs are noisy against a noise-free
    # reference) — and on for pt and sft.
    disable_dropout: bool | None = None
    # DPO, PPO, GRPO and RLOO refine an instruction-tuned model: a base that is not a medtune SFT merge is
    # warned about, or refused when this is true.
    require_sft_base: bool = False
    learning_rate: float = 2e-4
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03  # fraction of optimizer steps with linear warm-up
    weight_decay: float = 0.0
    num_epochs: float = 1.0  # may be fractional; ignored when max_steps > 0
    max_steps: int = -1  # optimizer steps; > 0 overrides num_epochs
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False  # trade compute for activation memory
    max_grad_norm: float = 1.0  # 0 = no clipping
    # pt/sft: the loss from hidden states in chunks, never the full-vocabulary logits (equal loss and
    # gradients). Unset: on when vocabulary × max_length ≥ 2^26, e.g. Chinese-LLaMA-2 at 2,048 tokens.
    chunked_loss: bool | None = None
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int = 0  # 0 = evaluate only at the end
    save_steps: int = 0  # 0 = no intermediate checkpoints
    save_total_limit: int = 2  # checkpoints kept; older ones are deleted
    deepspeed: str | None = None  # path to a ds_configs/*.json
    report_to: Literal["none", "wandb"] = "none"
    resume: bool = False  # true = continue from the latest complete checkpoint (or report a finished run)
    compile: bool = False  # torch.compile the model (GPU; pays a compile time up front)


@dataclass
class RLConfig:
    """Online RL (train.stage ppo | grpo | rloo): what a rollout samples and how its replies are scored."""

    reward_model: str | None = None  # a medtune reward model: its merged directory or its RM run directory
    reward_function: str | None = None  # or a rule, "module:function" called with (prompt messages, reply text)
    num_generations: int = 4  # replies sampled per prompt (the group GRPO and RLOO compare within)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0  # KL to the reference (the base without the adapter); TRL: 0.0 for GRPO, 0.05 for RLOO
    epsilon: float = 0.2  # clipping of the probability ratio
    kl_bias_correction: bool = True  # grpo stage: the KL term times the ratio (TRL's default, DeepSeek-V3.2)
    # ppo stage (beta is its per-token KL penalty coefficient; TRL's PPO used 0.05)
    ppo_epochs: int = 4  # optimisation passes over each rollout batch
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE's λ
    vf_coef: float = 0.1  # weight of the value loss
    cliprange_value: float = 0.2
    whiten_rewards: bool = False
    loss_type: Literal["dapo", "grpo"] = "dapo"  # grpo stage: per reply token over the step, or per reply
    scale_rewards: bool = True  # grpo stage: divide advantages by the group's reward std


@dataclass
class OutputConfig:
    """Where the run directory goes."""

    dir: str = ""  # run directory; empty = runs/<recipe file name>


@dataclass
class Recipe:
    """A whole recipe: one group per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    source_dir: ClassVar[str | None] = None  # the recipe file's directory (set per instance at load; not saved)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | None = None, strict: bool = True) -> Recipe:
    """Read a recipe file, apply ``group.key=value`` overrides, validate everything.

    A relative data or DeepSpeed path is looked up beside the recipe file first (a recipe and its data travel
    together, and work from any directory), then in the current directory, as a user types it next to the
    command; one found beside the recipe is written as an absolute path. output.dir stays relative to the
    current directory.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM is not part of the first key
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 text; save the recipe as UTF-8") from None
    lines = _key_lines(text, str(path))
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of groups (model, lora, data, train, rl, output)")
    overridden = {_apply_override(raw, item) for item in overrides or []}
    recipe = _build(Recipe, raw, "", lambda key: _where(path, lines, key, overridden), strict)
    resolve_paths(recipe, path.parent, overridden)
    if not recipe.output.dir:
        recipe.output.dir = str(Path("runs") / path.stem)
    check_recipe(recipe, str(path))
    return recipe


def _where(path: Path, lines: dict[str, int], key: str, overridden: set[str] = frozenset()) -> str:
    """Blame the command line for a value it set, the file's line otherwise (a key the file does not spell
    out, such as a list item's, is found at its nearest enclosing key)."""
    plain = re.sub(r"\[\d+\]", "", key)
    if any(k == o or k.startswith((o + ".", o + "[")) for o in overridden for k in (key, plain)):
        return "command line"
    while key:
        if key in lines:
            return f"{path}:{lines[key]}"
        key = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""
    return str(path)


def _key_lines(text: str, name: str) -> dict[str, int]:
    """Map every dotted key to its 1-based line, and refuse duplicate keys (YAML keeps the last silently)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{name}: not valid YAML: {exc}") from None
    found: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.SequenceNode):  # a list's items: data.train_files[1].weight
            for i, item in enumerate(node.value):
                found[f"{prefix.rstrip('.')}[{i}]"] = item.start_mark.line + 1
                walk(item, f"{prefix.rstrip('.')}[{i}].")
            return
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            if key in found:
                raise RecipeError(
                    f"{name}:{key_node.start_mark.line + 1}: {key}: duplicate key (first at line {found[key]})"
                )
            found[key] = key_node.start_mark.line + 1
            walk(value_node, key + ".")

    if root is not None:
        walk(root, "")
    return found


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """``train.learning_rate=1e-4`` → raw['train']['learning_rate'] = 1e-4 (value parsed as YAML); returns the key."""
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected group.key=value, e.g. train.max_steps=10")
    dotted, value = item.split("=", 1)
    parts = dotted.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: {part} is not a group")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise RecipeError(f"command line: override {item!r}: the value is not valid YAML ({problem})") from None
    return dotted.strip()


def _build(cls: type, raw: Any, prefix: str, where: typing.Callable[[str], str], strict: bool) -> Any:
    """Construct dataclass ``cls`` from a mapping, checking every key and type."""
    group = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where(prefix.rstrip('.'))}: {group}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            if not strict:
                continue
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise RecipeError(f"{where(full)}: {full}: unknown key{hint}")
        values[key] = _coerce(value, hints[key], full, where, strict)
    return cls(**values)


def _coerce(value: Any, tp: Any, key: str, where: typing.Callable[[str], str], strict: bool) -> Any:
    """Check ``value`` against type ``tp``; convert only where YAML is known to surprise (1e-4 is a string)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", where, strict)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key, where, strict)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[-1])
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise RecipeError(f"{where(key)}: {key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            value = [value]
        if not isinstance(value, list):
            raise RecipeError(f"{where(key)}: {key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", where, strict) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # PyYAML reads 1e-4 (no dot) as a string
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise RecipeError(f"{where(key)}: {key}: {value!r} is not a finite number")
    elif tp is str:
        if isinstance(value, str):
            return value
    raise RecipeError(f"{where(key)}: {key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def train_paths(data: DataConfig) -> list[str]:
    """The training files' paths, mixture or not."""
    return [f if isinstance(f, str) else f.path for f in data.train_files]


def resolve_paths(recipe: Recipe, recipe_dir: Path, overridden: set[str] = frozenset()) -> None:
    """Relative data and DeepSpeed paths, as absolute paths of the files they name: one the recipe file writes is
    looked up beside it, then in the current directory; one the command line gives, in the current directory
    only (where the user typed it). A file found nowhere stays as written, for check_data_files to name. The
    recipe remembers its directory, for that error."""

    def resolved(value: str, key: str) -> str:
        if Path(value).is_absolute():
            return value
        places = [Path(value)] if key in overridden else [recipe_dir / value, Path(value)]
        found = next((p for p in places if p.exists()), None)
        return str(found.resolve()) if found is not None else value

    data = recipe.data
    data.train_files = [
        resolved(f, "data.train_files")
        if isinstance(f, str)
        else dataclasses.replace(f, path=resolved(f.path, "data.train_files"))
        for f in data.train_files
    ]
    data.eval_files = [resolved(f, "data.eval_files") for f in data.eval_files]
    if recipe.train.deepspeed:
        recipe.train.deepspeed = resolved(recipe.train.deepspeed, "train.deepspeed")
    recipe.source_dir = str(recipe_dir.resolve())


def check_data_files(recipe: Recipe) -> None:
    """Before training starts (not at load: shipped recipes name files a user prepares first)."""
    for key, paths in (("train_files", train_paths(recipe.data)), ("eval_files", recipe.data.eval_files)):
        for path in paths:
            if not Path(path).is_file():
                looked = f"the current directory is {Path.cwd()}" + (
                    f"; the recipe's is {recipe.source_dir}" if recipe.source_dir else ""
                )
                raise RecipeError(
                    f"data.{key}: {path}: file not found ({looked}); write it with python -m data_prep, "
                    f"or override it: data.{key}=[PATH]"
                )


def check_recipe(recipe: Recipe, name: str = "recipe") -> None:
    """Cross-field checks: combinations that each look valid alone but cannot work together."""
    problems = data_problems(recipe) + train_problems(recipe) + model_problems(recipe) + rl_problems(recipe)
    if problems:
        raise RecipeError(f"{name}: " + f"\n{name}: ".join(problems))


def data_problems(recipe: Recipe) -> list[str]:
    data, stage = recipe.data, get_stage(recipe.train.stage)
    problems = []
    if data.template not in template_names():
        close = difflib.get_close_matches(data.template, template_names(), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        known = ", ".join(template_names())
        problems.append(f"data.template: unknown template {data.template!r} (known: {known}){hint}")
    if not data.train_files:
        problems.append("data.train_files: at least one instruction JSONL file is needed")
    for spec in (f for f in data.train_files if not isinstance(f, str)):
        if (spec.weight is None) == (spec.samples is None):
            problems.append(f"data.train_files: {spec.path}: give weight or samples (one of them)")
        elif (spec.weight is not None and spec.weight <= 0) or (spec.samples is not None and spec.samples < 1):
            problems.append(f"data.train_files: {spec.path}: weight must be positive, samples at least 1")
    if not 0.0 <= data.eval_ratio < 1.0:
        problems.append(f"data.eval_ratio: {data.eval_ratio} must be in [0, 1)")
    if data.eval_files and data.eval_ratio:
        problems.append("data.eval_ratio: set either eval_files or eval_ratio, not both")
    if data.tokenize_workers is not None and data.tokenize_workers < 1:
        problems.append("data.tokenize_workers: must be at least 1 (or unset: one per core for large inputs)")
    if data.pad_to_multiple_of < 0:
        problems.append(f"data.pad_to_multiple_of: {data.pad_to_multiple_of}: 0 (exact) or a positive multiple")
    if data.max_length < 8:
        problems.append(f"data.max_length: {data.max_length} is too small")
    if data.packing and not stage.packs:
        packing = ", ".join(s.name for s in STAGES.values() if s.packs)
        problems.append(
            f"data.packing: train.stage {stage.name} does not pack samples (only {packing} does); set it to false"
        )
    return problems


def train_problems(recipe: Recipe) -> list[str]:
    train, lora = recipe.train, recipe.lora
    problems = []
    if not 0 <= train.seed < 2**32:
        problems.append(f"train.seed: {train.seed}: a seed from 0 to 2**32 - 1 (what numpy and torch accept)")
    if train.max_steps <= 0 and train.num_epochs <= 0:
        problems.append("train.max_steps / train.num_epochs: one of them must be positive")
    for key in ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps", "save_total_limit"):
        if getattr(train, key) < 1:
            problems.append(f"train.{key}: must be at least 1")
    for key in ("eval_steps", "save_steps"):
        if getattr(train, key) < 0:
            problems.append(f"train.{key}: must be 0 (off) or positive")
    if not 0.0 <= train.warmup_ratio < 1.0:
        problems.append(f"train.warmup_ratio: {train.warmup_ratio} must be in [0, 1)")
    if train.dpo_beta <= 0:
        problems.append("train.dpo_beta: must be positive")
    if train.learning_rate <= 0:
        problems.append("train.learning_rate: must be positive")
    if isinstance(lora.target_modules, str) and lora.target_modules != "all-linear":
        problems.append(f"lora.target_modules: {lora.target_modules!r}: give a list of module names or `all-linear`")
    if lora.r < 1 or lora.alpha < 1 or not 0.0 <= lora.dropout < 1.0:
        problems.append("lora.r / lora.alpha must be >= 1 and lora.dropout in [0, 1)")
    if train.deepspeed and not Path(train.deepspeed).is_file():
        problems.append(f"train.deepspeed: {train.deepspeed}: file not found")
    return problems


def model_problems(recipe: Recipe) -> list[str]:
    train = recipe.train
    problems = []
    quant = recipe.model.quantization
    if train.deepspeed and Path(train.deepspeed).is_file():
        config = deepspeed_config(train.deepspeed)
        if isinstance(config, str):
            return [*problems, f"train.deepspeed: {config}"]
        zero = config.get("zero_optimization")
        stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
        if quant is not None and quant.bits == 8 and stage == 3:
            problems.append(
                "model.quantization.bits: 8-bit weights cannot be sharded by ZeRO-3; "
                "use bits: 4 (stored in the compute dtype, which ZeRO-3 can shard) or ZeRO-2"
            )
    if quant is not None and recipe.model.dtype == "fp32" and quant.compute_dtype != "fp32":
        problems.append(
            f"model.quantization.compute_dtype: {quant.compute_dtype} with model.dtype fp32; "
            f"set model.dtype: {quant.compute_dtype} (or compute_dtype: fp32 on a CPU)"
        )
    return problems


def deepspeed_config(path: str) -> dict[str, Any] | str:
    """The DeepSpeed config as a mapping, or what is wrong with the file (named with its line and column)."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return f"{path}: not UTF-8 text"
    except json.JSONDecodeError as exc:
        return f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})"
    return config if isinstance(config, dict) else f"{path}: a JSON object is expected"


def rl_problems(recipe: Recipe) -> list[str]:
    rl, stage = recipe.rl, get_stage(recipe.train.stage)
    if not stage.rollout:
        return []
    problems = []
    if (rl.reward_model is None) == (rl.reward_function is None):
        problems.append(f"rl.reward_model / rl.reward_function: train.stage {stage.name} needs exactly one of them")
    if rl.reward_function is not None and ":" not in rl.reward_function:
        problems.append(f"rl.reward_function: {rl.reward_function!r}: write it as module:function")
    if rl.num_generations < stage.min_generations:
        problems.append(
            f"rl.num_generations: at least {stage.min_generations} for {stage.name} "
            "(replies are compared within their group)"
        )
    if rl.ppo_epochs < 1 or not 0 <= rl.gamma <= 1 or not 0 <= rl.lam <= 1 or rl.vf_coef < 0:
        problems.append("rl.ppo_epochs >= 1, rl.gamma and rl.lam in [0, 1], rl.vf_coef >= 0 are needed")
    if rl.max_new_tokens < 1 or rl.temperature <= 0 or not 0 < rl.top_p <= 1:
        problems.append("rl.max_new_tokens >= 1, rl.temperature > 0 and rl.top_p in (0, 1] are needed")
    if rl.beta < 0 or not 0 < rl.epsilon < 1:
        problems.append("rl.beta >= 0 and rl.epsilon in (0, 1) are needed")
    return problems
