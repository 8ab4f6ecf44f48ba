"""Cold and warm starts of a training command, medtune against LLaMA-Factory, like with like.

    python benchmarks/warm_start.py --lf-cli /tmp/lfvenv/bin/llamafactory-cli [--rows 20000] [--pairs 3]
        [--workers N] [--tokenizer DIR] [--keep DIR]

(also ``python benchmarks/llamafactory_compare.py --lf-cli … --tokenize [these options]``; LLaMA-Factory's
venv is set up as that script's docstring says). Each run is a whole training command in a fresh process,
one optimizer step on a tiny random LLaMA (hidden 64, 2 layers, the tokenizer's vocabulary), timed from
start to exit:

- cold: an empty cache (its own fresh cache directories), so the run reads and tokenizes every row;
- warm: a fresh process again, with the cache the cold run of the same pair left (medtune: its tokenized
  cache under MEDTUNE_CACHE; LLaMA-Factory: its ``tokenized_path``).

What is held equal:

- processes: medtune ``data.tokenize_workers: W``, LLaMA-Factory ``preprocessing_num_workers: W``, both
  with OMP_NUM_THREADS=MKL_NUM_THREADS=W (W: --workers, default one per core this process may use, the
  count medtune picks itself). Inside a process each tool tokenizes as it does (medtune hands
  SentencePiece a batch, which its C++ spreads over the cores; LLaMA-Factory encodes one text at a time),
  so each run's CPU seconds (every process of its tree) are printed beside its wall time;
- text and rows: the same N synthetic ChatMed-like rows. medtune reads them as records with its chatmed
  template; LLaMA-Factory gets each row as medtune's template writes it ("问：\\n{q}\\n答：\\n{a}\\n") as
  the reply of an empty prompt, under a template registered for this run (the tokenizer's BOS, the
  text, its EOS: what medtune's chatmed rows hold), so both tokenize the same string in one call
  (LLaMA-Factory's labels then cover the prompt too: the same tokens, a different mask, the same cost;
  its data file holds the text already written, medtune writes it from the record: a few string joins).
  After each pair's cold runs both tokenized outputs are read back and compared: rows, tokens, and
  whether the ids are identical. If the rows or the tokens differ, the script says so and stops;
- tokenizer: the same files in one model directory. A SentencePiece tokenizer (a ``tokenizer.model``
  and no ``tokenizer.json``, e.g. Chinese-LLaMA-2's) gets ``tokenizer_class: SentencePieceBackend`` so
  that LLaMA-Factory's AutoTokenizer loads the ``sentencepiece`` tokenizer medtune loads; as shipped,
  transformers 5 converts it to a BPE that splits Chinese differently (different token counts);
- order: the pairs interleave the tools and alternate which goes first (pair 1: medtune, LLaMA-Factory;
  pair 2: LLaMA-Factory, medtune; …), cold runs before warm runs in each pair;
- place: every cache and temporary file of both tools goes into the work directory (HF_HOME,
  HF_DATASETS_CACHE, XDG_CACHE_HOME, TMPDIR, MEDTUNE_CACHE: fresh for each pair and tool; MPLCONFIGDIR,
  matplotlib's font list, built once before the runs), which is deleted at the end; with --keep it and
  every pair's caches stay (a pair's caches are about 8x the data's size).

Memory is the whole process tree (benchmarks/proc_tree.py): peak RSS and peak PSS of the summed tree,
sampled every 0.1 s. Prints the versions of both environments and the load average before and after.
--tokenizer: a tokenizer directory, e.g. ../shared/tokenizers/chinese_llama2 (SentencePiece) or a Qwen2
byte-level BPE folder built from llama.cpp's vocabulary by tests/real_vocab.py:
    python -c "import sys; sys.path.insert(0, 'tests'); import real_vocab as v; print(v.vocab_tokenizer_dir('qwen2'))"
Without it: a byte-level BPE trained on a sample of the rows (medtune's tiny-model tokenizer).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from proc_tree import TreeRun, isolated_env, run_tree  # noqa: E402
from synthetic import chatmed_like, write_jsonl  # noqa: E402

LF_TEMPLATE = "medtune_chatmed_text"
PACKAGES = ("medtune", "llamafactory", "transformers", "tokenizers", "datasets", "torch", "sentencepiece")

MEDTUNE_RECIPE = """model: {{base: {base}, dtype: fp32}}
lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}}
data: {{train_files: [{data}], template: chatmed, max_length: 1024, tokenize_workers: {workers}}}
train: {{max_steps: 1, per_device_batch_size: 8, logging_steps: 1, save_steps: 0, seed: 42}}
output: {{dir: {out}}}
"""

LF_CONFIG = """model_name_or_path: {base}
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_alpha: 16
lora_dropout: 0.0
lora_target: all
dataset: chatmed
dataset_dir: {data_dir}
template: {template}
cutoff_len: 1024
tokenized_path: {tokenized}
preprocessing_num_workers: {workers}
dataloader_num_workers: 0
output_dir: {out}
overwrite_output_dir: true
save_strategy: "no"
report_to: none
per_device_train_batch_size: 8
max_steps: 1
seed: 42
bf16: false
fp16: false
"""

# llamafactory-cli with one template registered first: the tokenizer's BOS (where it has one), the prompt
# in user_slot, the reply in assistant_slot, the tokenizer's EOS. LLaMA-Factory's `empty` template has
# neither BOS nor EOS.
LF_LAUNCHER = """import sys
from llamafactory.cli import main
from llamafactory.data.formatter import EmptyFormatter, StringFormatter
from llamafactory.data.template import register_template

register_template(
    name={name!r},
    format_prefix=EmptyFormatter(slots=[{{"bos_token"}}]),
    format_user=StringFormatter(slots=[{user!r}]),
    format_assistant=StringFormatter(slots=[{assistant!r}, {{"eos_token"}}]),
)
sys.argv = ["llamafactory-cli", *sys.argv[1:]]
main()
"""


def write_lf_launcher(path: Path, name: str, user: str = "{{content}}", assistant: str = "{{content}}") -> Path:
    """A script for LLaMA-Factory's python: ``python SCRIPT train CONFIG`` is ``llamafactory-cli train CONFIG``
    with template ``name`` registered ({{content}}: the message's text)."""
    path.write_text(LF_LAUNCHER.format(name=name, user=user, assistant=assistant), encoding="utf-8")
    return path


VERSIONS = f"""import importlib.metadata, json
out = {{}}
for name in {PACKAGES!r}:
    try:
        out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
print(json.dumps(out))
"""


def chatmed_text(record: dict) -> str:
    """medtune's chatmed template written out (medtune/data/templates.py: user, then assistant)."""
    return f"问：\n{record['messages'][0]['content']}\n答：\n{record['messages'][1]['content']}\n"


# ----------------------------------------------------------------------------- the model both load


def tokenizer_source(args, work: Path) -> Path:
    """--tokenizer, or a byte-level BPE trained on 2,000 rows like the data (medtune's tiny tokenizer)."""
    if args.tokenizer:
        return Path(args.tokenizer).expanduser().resolve()
    from medtune.model.tiny import corpus_texts, train_tokenizer

    sample = write_jsonl(chatmed_like(2000, seed=1), work / "sample.jsonl")
    out = work / "tokenizer"
    train_tokenizer(corpus_texts([sample])).save_pretrained(str(out))
    return out


def build_base(source: Path, out: Path) -> tuple[Path, str]:
    """A random tiny LLaMA whose vocabulary fits the tokenizer in ``source``, with that tokenizer's files;
    returns the directory and a description of the tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaForCausalLM

    from medtune.data.tokenizer import TOKENIZER_FILES, detect_kind, load_tokenizer
    from medtune.model.tiny import tiny_llama_config

    out.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if name != "config.json" and (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    if detect_kind(out) == "sentencepiece":  # LLaMA-Factory's AutoTokenizer: the same sentencepiece tokenizer
        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        config.update(tokenizer_class="SentencePieceBackend", legacy=True)
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    tokenizer = load_tokenizer(str(out))
    config = tiny_llama_config(tokenizer)  # medtune's tiny-llama shape, over this tokenizer
    vocab = config.vocab_size
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors", {"format": "pt"})
    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(out)
    described = f"{source.name} ({type(tokenizer).__name__}, {len(tokenizer):,} tokens, model vocabulary {vocab:,})"
    return out, described


# ----------------------------------------------------------------------------- one run of each tool


class Tool:
    """One tool's command, and where a pair's runs of it keep their caches."""

    def __init__(self, name: str, work: Path, args, base: Path):
        self.name, self.work, self.args, self.base = name, work, args, base

    def env(self, pair: Path) -> dict[str, str]:
        home = pair / f"home-{self.name}"  # not a bare "medtune": python -m would import it from the cwd
        return isolated_env(
            home,
            self.args.workers,
            MPLCONFIGDIR=str(self.work / "matplotlib"),  # its font list, built once before the runs (not data)
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            WANDB_MODE="disabled",
            DISABLE_VERSION_CHECK="1",
            CUDA_VISIBLE_DEVICES="",
        )

    def command(self, pair: Path, phase: str) -> list[str]:
        raise NotImplementedError

    def run(self, pair: Path, phase: str) -> TreeRun:
        log = pair / f"{self.name}-{phase}.log"
        with log.open("w") as out:
            result = run_tree(
                self.command(pair, phase), env=self.env(pair), stdout=out, stderr=subprocess.STDOUT,
                interval=self.args.interval, cwd=pair,
            )  # fmt: skip
        if result.returncode:
            sys.exit(f"{self.name} {phase} failed ({log}):\n{log.read_text(errors='replace')[-3000:]}")
        return result


class Medtune(Tool):
    def __init__(self, work: Path, args, base: Path, data: Path):
        super().__init__("medtune", work, args, base)
        self.data = data

    def command(self, pair: Path, phase: str) -> list[str]:
        recipe = pair / f"medtune-{phase}.yaml"
        recipe.write_text(
            MEDTUNE_RECIPE.format(
                base=self.base, data=self.data, workers=self.args.workers, out=pair / f"run-{phase}"
            ),
            encoding="utf-8",
        )
        return [sys.executable, "-m", "medtune.train", str(recipe)]

    def tokenized(self, pair: Path) -> list[Path]:
        return sorted((pair / f"home-{self.name}" / "medtune-cache" / "tokenized").glob("*/train.arrow"))


class LlamaFactory(Tool):
    def __init__(self, work: Path, args, base: Path, data_dir: Path, python: str):
        super().__init__("llamafactory", work, args, base)
        self.data_dir, self.python = data_dir, python
        self.launcher = write_lf_launcher(work / "lf_train.py", LF_TEMPLATE)

    def command(self, pair: Path, phase: str) -> list[str]:
        config = pair / f"llamafactory-{phase}.yaml"
        config.write_text(
            LF_CONFIG.format(
                base=self.base, data_dir=self.data_dir, template=LF_TEMPLATE, tokenized=pair / "lf-tokenized",
                workers=self.args.workers, out=pair / f"lf-out-{phase}",
            ),
            encoding="utf-8",
        )  # fmt: skip
        return [self.python, str(self.launcher), "train", str(config)]

    def tokenized(self, pair: Path) -> list[Path]:
        return sorted((pair / "lf-tokenized" / "train").glob("*.arrow"))


# ----------------------------------------------------------------------------- the same-text check


def token_summary(files: list[Path]) -> dict:
    """Rows, tokens and a digest of every row's input_ids (in order) of Arrow stream files."""
    import numpy as np
    import pyarrow as pa

    rows = tokens = 0
    lengths_digest, values_digest = hashlib.sha256(), hashlib.sha256()  # two streams: batching changes neither
    for path in files:
        with pa.memory_map(str(path)) as source:
            for batch in pa.ipc.open_stream(source):
                ids = batch.column(batch.schema.get_field_index("input_ids"))
                lengths = np.asarray(ids.value_lengths(), dtype=np.int64)
                values = np.asarray(ids.flatten(), dtype=np.int64)
                rows += len(lengths)
                tokens += int(lengths.sum())
                lengths_digest.update(lengths.tobytes())
                values_digest.update(values.tobytes())
    return {"rows": rows, "tokens": tokens, "digest": lengths_digest.hexdigest() + values_digest.hexdigest()}


def same_text(medtune: dict, lf: dict) -> bool:
    identical = "identical" if medtune["digest"] == lf["digest"] else "NOT identical"
    print(
        f"same text? tokenized rows: medtune {medtune['rows']:,}, LLaMA-Factory {lf['rows']:,}; tokens: medtune "
        f"{medtune['tokens']:,}, LLaMA-Factory {lf['tokens']:,}; ids {identical}",
        flush=True,
    )
    return medtune["rows"] == lf["rows"] and medtune["tokens"] == lf["tokens"]


# ----------------------------------------------------------------------------- printing


def versions(python: str, cwd: Path) -> dict:
    """The packages' versions in that interpreter's environment (run elsewhere than this checkout)."""
    out = subprocess.run([python, "-c", VERSIONS], capture_output=True, text=True, check=True, cwd=cwd).stdout
    return json.loads(out)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def span(values: list[float], fmt: str = ".1f") -> str:
    low, high = min(values), max(values)
    return format(low, fmt) if f"{low:{fmt}}" == f"{high:{fmt}}" else f"{low:{fmt}}–{high:{fmt}}"


def run_line(pair: int, phase: str, name: str, run: TreeRun) -> str:
    return (
        f"pair {pair} {phase:4} {name:13} {run.wall_s:8.2f} s  CPU {run.cpu_s:8.2f} s  "
        f"tree peak RSS {run.peak_rss_mb:7,.0f} MB  PSS {run.peak_pss_mb:7,.0f} MB  ({run.max_processes} processes)"
    )


def summary(results: dict[tuple[str, str], list[TreeRun]], names: list[str]) -> None:
    both = len(names) == 2
    print("\nsummary (whole-command wall time; memory: the process tree, sampled)")
    for phase in ("cold", "warm"):
        for name in names:
            runs = results[(phase, name)]
            print(
                f"  {phase:4} {name:13} wall {span([r.wall_s for r in runs], '.2f'):>13} s   "
                f"CPU {span([r.cpu_s for r in runs], '.1f'):>13} s   "
                f"peak RSS {span([r.peak_rss_mb for r in runs], ',.0f'):>13} MB   "
                f"peak PSS {span([r.peak_pss_mb for r in runs], ',.0f'):>13} MB"
            )
        if both:
            ratios = [m.wall_s / f.wall_s for m, f in zip(*(results[(phase, n)] for n in names), strict=True)]
            listed = ", ".join(f"{r:.2f}" for r in ratios)
            print(f"  {phase:4} medtune / LLaMA-Factory wall time per pair: {listed}  (min–max {span(ratios, '.2f')})")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--pairs", type=int, default=3, help="cold and warm pairs, interleaved")
    default_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument(
        "--workers", type=int, default=default_workers, help="tokenizing processes (and threads) of each tool"
    )
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: a BPE trained on the rows)")
    parser.add_argument("--lf-cli", help="llamafactory-cli of a separate venv (its python runs LLaMA-Factory)")
    parser.add_argument("--keep", help="work in this (new) directory and keep it")
    parser.add_argument("--interval", type=float, default=0.1, help="memory sampling interval, seconds")
    args = parser.parse_args(argv)
    if args.keep:
        work = Path(args.keep).resolve()
        work.mkdir(parents=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="medtune-warm-start-"))
    # this process too: building the model and the data writes only here
    for key, sub in (("HF_HOME", "hf"), ("XDG_CACHE_HOME", "xdg-cache"), ("MEDTUNE_CACHE", "medtune-cache")):
        os.environ[key] = str(work / "setup" / sub)
    try:
        compare(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def compare(args, work: Path) -> None:
    records = chatmed_like(args.rows)
    data = write_jsonl(records, work / "data.jsonl")
    lf_data = work / "lf-data"
    lf_data.mkdir()
    with (lf_data / "chatmed.jsonl").open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps({"instruction": "", "input": "", "output": chatmed_text(record)}, ensure_ascii=False))
            out.write("\n")
    (lf_data / "dataset_info.json").write_text(json.dumps({"chatmed": {"file_name": "chatmed.jsonl"}}))
    del records
    base, described = build_base(tokenizer_source(args, work), work / "base")

    tools: list[Tool] = [Medtune(work, args, base, data)]
    mine = {name: importlib.metadata.version(name) for name in PACKAGES if _installed(name)}
    size = data.stat().st_size / 2**20
    print(f"{args.rows:,} rows ({size:,.0f} MiB), one training step a run, tokenizer {described}")
    print(f"{args.workers} tokenizing processes each, OMP_NUM_THREADS={args.workers}, {os.cpu_count()} CPUs")
    print("medtune venv: " + ", ".join(f"{k} {v}" for k, v in mine.items()))
    if args.lf_cli:
        python = str(Path(args.lf_cli).parent / "python")
        tools.append(LlamaFactory(work, args, base, lf_data, python))
        print("LLaMA-Factory venv: " + ", ".join(f"{k} {v}" for k, v in versions(python, work).items()))
    for tool in tools:  # matplotlib's font list (both import it) is built here, not inside the first cold run
        python = tool.python if isinstance(tool, LlamaFactory) else sys.executable
        env = {**os.environ, "MPLCONFIGDIR": str(work / "matplotlib")}
        subprocess.run([python, "-c", "import matplotlib.font_manager"], env=env, cwd=work, check=True)
    print(f"load average before: {loadavg()}", flush=True)

    results: dict[tuple[str, str], list[TreeRun]] = {(p, t.name): [] for p in ("cold", "warm") for t in tools}
    for index in range(args.pairs):
        pair = work / f"pair-{index + 1}"
        pair.mkdir()
        order = tools if index % 2 == 0 else tools[::-1]
        for phase in ("cold", "warm"):
            for tool in order:
                run = tool.run(pair, phase)
                results[(phase, tool.name)].append(run)
                print(run_line(index + 1, phase, tool.name, run), flush=True)
            if phase == "cold" and len(tools) == 2:  # every pair: the outputs compared before the warm runs
                summaries = [token_summary(tool.tokenized(pair)) for tool in tools]
                if not same_text(*summaries):
                    sys.exit("the two tools tokenized different rows or tokens: refusing to compare them")
        for heavy in () if args.keep else ("home-medtune", "home-llamafactory", "lf-tokenized"):  # logs stay
            shutil.rmtree(pair / heavy, ignore_errors=True)
    print(f"load average after: {loadavg()}")
    summary(results, [t.name for t in tools])


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
