"""Export a run (or merged model) to where clinics run models: llama.cpp's GGUF, and Ollama.

    medtune export gguf RUN_OR_MERGED --out model.gguf [--type f16|bf16|f32|q8_0|q4_k_m]
    medtune export ollama RUN_OR_MERGED --out DIR [--type …]   (DIR/model.gguf + DIR/Modelfile)

A run directory is merged in memory first (into the unquantized base, as ``medtune merge`` does, so a
QLoRA run exports from the fp16/bf16 base). The file carries the run's format: its chat template (with
its system prompt) as ``tokenizer.chat_template``, BOS/EOS/PAD, the template's end marker as end of turn,
and whether prompts start with BOS. f32/f16/bf16/q8_0 are written by the ``gguf`` package (llama.cpp's
own writer and quantizer); q4_k_m needs llama.cpp's k-quant code, which only llama.cpp has: medtune
calls it through llama-cpp-python (``pip install llama-cpp-python``) on a lossless export.

An --out medtune did not write is never replaced; an export with the same inputs says "up to date"; a
killed export leaves only a ``.NAME.tmp-HOST-PID`` file beside the output, removed by the next export.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
from transformers import AutoConfig

from medtune.console import MedtuneError, quiet_libraries, run_command
from medtune.data.jinja_templates import MODEL
from medtune.data.templates import ChatTemplate, chat_template_text, encode_conversation, get_template, stop_token_ids
from medtune.infer.gguf_file import TYPES, TokenizerFacts, check_architecture, write_gguf
from medtune.infer.merge import merge_inputs, merged_in_memory
from medtune.infer.ollama import MARKER, modelfile
from medtune.model.adapters import refuse_quantized
from medtune.model.load import DTYPES
from medtune.rundir import ModelSource, atomic_write_text, describe_source, file_identities
from medtune.stages import get_stage
from medtune.temp_files import remove_dead_temps, temp_sibling

FORMAT = 1  # bump when what an export writes changes: an earlier file with another format is rewritten
LLAMA_CPP_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # types only llama.cpp's quantizer writes
KEY = "medtune.export"


@dataclass(frozen=True)
class Plan:
    """What an export reads and what its file is a function of (the key written into it)."""

    info: ModelSource
    template_name: str
    dtype: str
    key: dict


def plan(source: str, type_name: str, template_name: str | None, dtype: str | None) -> Plan:
    """Every check that needs no weights: the source, its stage, architecture and template."""
    info = describe_source(source)
    if not get_stage(info.stage).generates:
        raise MedtuneError(f"{source}: a reward model scores replies; only a model that generates is exported")
    refuse_quantized(info.base)
    try:
        config = AutoConfig.from_pretrained(info.base, trust_remote_code=info.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise MedtuneError(f"{info.base}: cannot read the model's config.json ({exc})") from exc
    check_architecture(config)
    if template_name and info.template and template_name != info.template:
        raise MedtuneError(
            f"{source}: trained with the {info.template} template; --template {template_name} would serve it in a "
            "format it did not learn. Leave --template out (it is for a model that records none)"
        )
    template_name = template_name or info.template or MODEL  # a plain model: the chat template it ships
    get_template(template_name)
    dtype = dtype or info.dtype or "fp32"
    key = {
        "format": FORMAT,
        "type": type_name,
        "template": template_name,
        "system_prompt": info.system_prompt,
        "inputs": merge_inputs(info.base, list(info.adapters), dtype),
        "weights": file_identities((info.base,), (".safetensors", ".bin", ".json")),
    }
    return Plan(info, template_name, dtype, json.loads(json.dumps(key)))  # as the file gives it back (no tuples)


def earlier_key(out: Path) -> dict | None:
    """The key of an earlier export at ``out``, None when there is none; a file medtune did not write is refused."""
    if not out.exists():
        return None
    if not out.is_file():
        raise MedtuneError(f"--out {out}: exists and is not a file")
    try:
        field = gguf.GGUFReader(out).get_field(KEY)
        return json.loads(field.contents()) if field is not None else {}
    except Exception:  # noqa: BLE001 - any unreadable file is one medtune did not write (or a truncated copy)
        return {}


def export_gguf(source: str, out: Path, type_name: str, template_name: str | None = None, dtype: str | None = None):
    """Write ``out``; returns what was written (the merge's logit gap, the tokenizer facts, the template), or
    None when an earlier export with the same inputs is there."""
    return write_export(plan(source, type_name, template_name, dtype), out, type_name)


def write_export(export: Plan, out: Path, type_name: str):
    """export_gguf once the source is planned (export_ollama plans once for both of its files)."""
    earlier = earlier_key(out)
    if earlier == export.key:
        return None
    if earlier == {}:
        raise MedtuneError(
            f"--out {out}: a file medtune's export did not write; medtune replaces only its own exports. "
            "Choose another --out"
        )
    if type_name in LLAMA_CPP_TYPES:
        llama_cpp = _llama_cpp()  # before the minutes of merging: a missing quantizer is known now
    lossless_target = out.with_name(f"{out.name}.source")  # the unquantized file llama.cpp's quantizer reads
    for target in (out, lossless_target):
        remove_dead_temps(target)
    info = export.info
    model, tokenizer, gap = merged_in_memory(info, list(info.adapters), export.dtype, info.trust_remote_code)
    template = get_template(export.template_name)
    facts = tokenizer_facts(tokenizer, template, info.system_prompt, model.generation_config.eos_token_id)
    tmp = temp_sibling(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if type_name in LLAMA_CPP_TYPES:
            lossless = temp_sibling(lossless_target)
            try:
                write_gguf(model, tokenizer, facts, lossless, _lossless(export.dtype), export.key)
                quantize(llama_cpp, lossless, tmp, type_name)
            finally:
                lossless.unlink(missing_ok=True)
        else:
            write_gguf(model, tokenizer, facts, tmp, type_name, export.key)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"merge_gap": gap, "facts": facts, "template": template}


def _lossless(dtype: str) -> str:
    return {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}[dtype]


def tokenizer_facts(tokenizer, template, system_prompt: str | None, model_stops) -> TokenizerFacts:
    """The run's chat template, whether its prompts start with BOS, and its end-of-turn marker."""
    prompt = encode_conversation(tokenizer, template, [{"role": "user", "content": "你好"}], system_prompt)[0]
    bos = tokenizer.bos_token_id
    stops = [i for i in stop_token_ids(tokenizer, template, model_stops) if i != tokenizer.eos_token_id]
    return TokenizerFacts(
        chat_template=chat_template_text(tokenizer, template, system_prompt),
        add_bos=bos is not None and prompt[:1] == [bos],
        stops=tuple(stops),
    )


def _llama_cpp():
    try:
        import llama_cpp  # optional: llama.cpp's k-quant quantizer, which no Python package reimplements
    except ImportError as exc:
        raise MedtuneError(
            "--type q4_k_m is written by llama.cpp's quantizer: pip install llama-cpp-python, or export --type f16 "
            "and run llama.cpp's `llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M`"
        ) from exc
    return llama_cpp


def quantize(llama_cpp, source: Path, out: Path, type_name: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), as `llama-quantize` runs it; metadata is copied.
    Its per-tensor log goes to a file descriptor, not Python: it is kept aside and shown only on failure."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[type_name])
    params.nthread = os.cpu_count() or 1
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as log:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        if code != 0 or not out.is_file():
            log.seek(0)
            tail = log.read().decode("utf-8", "replace").strip().splitlines()[-5:]
            raise MedtuneError(f"llama.cpp's quantizer failed ({code}) making {type_name}: {' | '.join(tail)}")


def export_ollama(source: str, out: Path, type_name: str, template_name: str | None = None, dtype=None):
    """DIR/model.gguf and DIR/Modelfile; the Modelfile's TEMPLATE is the run's (a medtune template)."""
    check_ollama_dir(out)
    export = plan(source, type_name, template_name, dtype)
    template = get_template(export.template_name)
    if not isinstance(template, ChatTemplate):
        raise MedtuneError(
            f"template {export.template_name} is a Jinja template, which Ollama's Go templates cannot run as "
            "written; export gguf instead: Ollama and llama.cpp read its tokenizer.chat_template"
        )
    out.mkdir(parents=True, exist_ok=True)
    written = write_export(export, out / "model.gguf", type_name)
    reader = gguf.GGUFReader(out / "model.gguf")  # the Modelfile says what the file it names holds
    ends = ("eos_token_id", "eot_token_id", "eom_token_id")
    text = modelfile(
        template,
        export.info.system_prompt if export.info.system_prompt is not None else template.default_system,
        _token_text(reader, "bos_token_id"),
        _token_text(reader, "eos_token_id"),
        list(dict.fromkeys(t for t in (_token_text(reader, key) for key in ends) if t)),
        f"{Path(source).resolve() if Path(source).exists() else source} ({export.template_name} template)",
    )
    atomic_write_text(out / "Modelfile", text)
    return written


def _token_text(reader: gguf.GGUFReader, key: str) -> str:
    """The text of the token a ``tokenizer.ggml.{key}`` field names, or "" when the file has no such field."""
    field = reader.get_field(f"tokenizer.ggml.{key}")
    return reader.get_field("tokenizer.ggml.tokens").contents(int(field.contents())) if field is not None else ""


def check_ollama_dir(out: Path) -> None:
    """--out may be new, empty, or an earlier Ollama export (its Modelfile starts with medtune's line)."""
    if out.exists() and not out.is_dir():
        raise MedtuneError(f"--out {out}: exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    modelfile_path = out / "Modelfile"
    first = (
        modelfile_path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
        if modelfile_path.is_file()
        else ""
    )
    if not first.startswith(MARKER):
        raise MedtuneError(
            f"--out {out}: a non-empty directory that is not an earlier `medtune export ollama` (no Modelfile of "
            "medtune's); medtune replaces only what it wrote. Choose a new directory"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medtune export", description=__doc__.splitlines()[0])
    parser.add_argument("format", choices=["gguf", "ollama"], help="gguf: one file; ollama: model.gguf + Modelfile")
    parser.add_argument("source", help="run directory, adapter directory, merged model or model directory")
    parser.add_argument("--out", required=True, type=Path, help="gguf: the file; ollama: a directory")
    parser.add_argument("--type", default="f16", choices=[*TYPES, *LLAMA_CPP_TYPES], help="weights (default f16)")
    parser.add_argument("--template", help="chat template of a model that records none (a run exports with its own)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="precision to merge in (default: the run's, else fp32)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    quiet_libraries()
    args = parser.parse_args(argv)

    def work() -> int:
        export = export_ollama if args.format == "ollama" else export_gguf
        written = export(args.source, args.out, args.type, args.template, args.dtype)
        where = args.out / "model.gguf" if args.format == "ollama" else args.out
        if written is None:
            print(f"up to date: {where} (same source, adapters, type and template)")
        else:
            facts = written["facts"]
            print(
                f"wrote {where} ({args.type}, {where.stat().st_size / 2**20:.1f} MiB; template "
                f"{written['template'].name}, BOS {'added' if facts.add_bos else 'not added'}, end of turn "
                f"{facts.end_of_turn if facts.end_of_turn is not None else 'EOS'}; merge max logit gap "
                f"{written['merge_gap']:.2e})"
            )
        if args.format == "ollama":
            print(f"wrote {args.out / 'Modelfile'}; then: ollama create NAME -f {args.out / 'Modelfile'}")
        return 0

    return run_command(work, args.debug)
