"""Real modern tokenizers for tests, built offline from llama.cpp's vocabulary files.

llama.cpp ships, for its own tokenizer tests, the vocabulary of many models as small GGUF files
(`models/ggml-vocab-*.gguf`: no weights), each with test vectors (`.inp`/`.out`: texts, and the ids
the model's reference Hugging Face tokenizer gives them), plus real chat templates
(`models/templates/*.jinja`). The `llama-cpp-python` sdist vendors all of it. This module

1. finds that sdist's `models/` folder (see `llama_cpp_models_dir`),
2. turns `ggml-vocab-{vocab}.gguf` into a Hugging Face tokenizer folder with transformers' GGUF
   reader, saved under the cache folder so later runs load it in well under a second,
3. checks it against llama.cpp's test vectors before anything uses it, and raises if one differs.

Where transformers' GGUF conversion departs from the reference tokenizer, `_FIXES` restores the
reference's setting; each fix says why, and `check_against_vectors` prints which fixes it applied.

Where the sdist cannot be had (no env var, no cache, no package index), everything here calls
`pytest.skip`, or `pytest.fail` when the environment variable CI is set, so CI never passes by
skipping.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_ENV = "MEDTUNE_LLAMA_CPP_SDIST"
VECTOR_SEPARATOR = "\n__ggml_vocab_test__\n"  # as tests/test-tokenizer-0.cpp splits the .inp file
_FORMAT = 2  # bump when what a built tokenizer folder holds changes; it is part of the folder's key

# The vocabularies the tests rely on, and what they are.
VOCABS = {
    "qwen2": "Qwen2 / Qwen2.5 / Qwen3",
    "llama-bpe": "Llama 3",
    "gemma-4": "Gemma 4",
    "deepseek-llm": "DeepSeek LLM",
}

# deepseek-llm's pre-tokenizer regexes, as llama.cpp (src/llama-vocab.cpp,
# LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM) and the reference tokenizer.json give them. Written escaped,
# since the list contains characters (the Kelvin sign U+212A) that editors like to normalise.
_DEEPSEEK_LLM_SPLITS = [
    "[\r\n]",
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377"
    "\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556"
    "\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
]


def _fix_ignore_merges(tokenizer) -> None:
    """Llama 3's reference tokenizer.json sets `"ignore_merges": true` (a pre-token that is itself in
    the vocabulary is taken whole), and llama.cpp does the same for llama-bpe; transformers 5.23's
    GGUF reader leaves it false, which splits e.g. " Việt" (1 token) into 3 ("Cửa Việt" vector)."""
    model = tokenizer.backend_tokenizer.model
    model.ignore_merges = True
    tokenizer.backend_tokenizer.model = model


def _fix_deepseek_llm_split(tokenizer) -> None:
    """transformers 5.23's GGUF reader has no split regex for pre-tokenizer type "deepseek-llm" and
    keeps GPT-2's, which e.g. cuts "ied 4 ½ months" differently; use the reference's regex list."""
    from tokenizers import Regex, pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(expr), behavior="isolated") for expr in _DEEPSEEK_LLM_SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


# vocab -> [(name, fix)] applied to the GGUF-loaded tokenizer before it is saved.
_FIXES = {
    "llama-bpe": [("ignore_merges=true", _fix_ignore_merges)],
    "deepseek-llm": [("deepseek-llm split regexes", _fix_deepseek_llm_split)],
}

# vocab -> tokenizer class used when AutoTokenizer cannot read the GGUF file. gemma-4: AutoTokenizer
# first builds the model config from the file, and transformers 5.23 rejects Gemma 4's per-layer
# list of `num_key_value_heads` (StrictDataclassFieldValidationError); the tokenizer itself is fine.
_CLASS_FALLBACK = {"gemma-4": "GemmaTokenizer"}


class _Unavailable(Exception):
    """The llama-cpp-python sdist could not be found, read or downloaded."""


def _unavailable(reason: str):
    message = f"llama.cpp vocabulary files unavailable: {reason}"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{message} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(message)


def cache_root() -> Path:
    """`${XDG_CACHE_HOME:-~/.cache}/medtune-tests` (an empty XDG_CACHE_HOME counts as unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medtune-tests"


def _version_root(version: str) -> Path:
    return cache_root() / f"llama-cpp-python-{version}"


def _sdist_version(tar: tarfile.TarFile, path: Path) -> tuple[str, str]:
    """(top folder, version) of an sdist, e.g. ("llama_cpp_python-0.3.36", "0.3.36")."""
    first = tar.next()
    if first is None:
        raise _Unavailable(f"{path} is an empty archive")
    top = first.name.split("/", 1)[0]
    if not top.startswith("llama_cpp_python-"):
        raise _Unavailable(f"{path} is not a llama-cpp-python sdist (top folder {top!r})")
    return top, top.removeprefix("llama_cpp_python-")


def _extract_models(sdist: Path) -> Path:
    """Extract only `*/vendor/llama.cpp/models/*` of `sdist` into the cache, atomically: into a
    temporary folder beside the final one, renamed into place once complete (a killed run leaves
    only a `.extract-*` folder, which is never read and is removed by the next extraction)."""
    try:
        with tarfile.open(sdist, "r:*") as tar:
            top, version = _sdist_version(tar, sdist)
            final = _version_root(version)
            if (final / "models").is_dir():
                return final / "models"
            prefix = f"{top}/vendor/llama.cpp/models/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            if not any(m.name.endswith(".gguf") for m in members):
                raise _Unavailable(f"{sdist} holds no {prefix}*.gguf")
            root = cache_root()
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".extract-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would stay on the renamed cache folder
            try:
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **kwargs)
                os.rename(tmp / prefix.rstrip("/"), tmp / "models")
                shutil.rmtree(tmp / top)
                (tmp / "SOURCE").write_text(f"{sdist.name}\n{prefix}\n")
                try:
                    os.rename(tmp, final)
                except OSError:  # another process got there first; its copy is complete
                    if not (final / "models").is_dir():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return final / "models"
    except (OSError, tarfile.TarError) as exc:
        raise _Unavailable(f"cannot extract {sdist}: {exc}") from exc


def _download_sdist() -> Path:
    """`pip download` the pinned sdist into the cache, and return its path."""
    dest = cache_root() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not (dest / name).is_file():
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dest),
        ]  # fmt: skip
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _Unavailable(f"{' '.join(command)} failed: {exc}") from exc
        # Only the file is needed: should pip fail after saving it (e.g. preparing metadata), use it.
        if not (dest / name).is_file():
            tail = (run.stdout + run.stderr).strip()[-1500:]
            raise _Unavailable(f"{' '.join(command)} exited {run.returncode}:\n{tail}")
    return dest / name


@functools.cache
def _models_dir() -> Path | str:
    """The models/ folder, or the reason there is none (a string), found once per process."""
    reasons = []
    sdist = os.environ.get(SDIST_ENV)
    if sdist:
        try:
            return _extract_models(Path(sdist).expanduser())
        except _Unavailable as exc:
            reasons.append(f"${SDIST_ENV}={sdist}: {exc}")
    cached = _version_root(LLAMA_CPP_PYTHON_VERSION) / "models"
    if cached.is_dir():
        return cached
    reasons.append(f"no extracted copy at {cached}")
    try:
        path = _download_sdist()
        models = _extract_models(path)
        path.unlink(missing_ok=True)  # 77 MB; the extracted models/ is all that is used
        return models
    except _Unavailable as exc:
        reasons.append(f"download: {exc}")
    return "; ".join(reasons)


def llama_cpp_models_dir() -> Path:
    """llama.cpp's `models/` folder from the llama-cpp-python sdist, found in this order:
    1. $MEDTUNE_LLAMA_CPP_SDIST, a path to the sdist .tar.gz (its models/ extracted into the cache),
    2. an extracted copy at ${XDG_CACHE_HOME:-~/.cache}/medtune-tests/llama-cpp-python-0.3.36/models,
    3. `pip download` of llama-cpp-python==0.3.36, extracted there.
    Skips the calling test (fails it when CI is set) if none works."""
    found = _models_dir()
    if isinstance(found, str):
        _unavailable(found)
    return found


def template_text(name: str) -> str:
    """The chat template `models/templates/{name}.jinja`, e.g. "Qwen-Qwen2.5-7B-Instruct"."""
    return (llama_cpp_models_dir() / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


def read_vectors(vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test vectors for `vocab`: (text, ids) pairs, read as tests/test-tokenizer-0.cpp
    reads them. The ids are the reference tokenizer's `encode(text, add_special_tokens=False)`
    (convert_hf_to_gguf_update.py), so they carry no BOS."""
    models = llama_cpp_models_dir()
    raw = (models / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8")
    lines = (models / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
    texts, pos = [], 0
    while pos < len(raw):
        end = raw.find(VECTOR_SEPARATOR, pos)
        if end < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:end])
        pos = end + len(VECTOR_SEPARATOR)
    if lines and lines[-1] == "":
        lines.pop()
    if len(texts) != len(lines):
        raise ValueError(f"{vocab}: {len(texts)} inputs but {len(lines)} outputs")
    return [(text, [int(t) for t in line.split()]) for text, line in zip(texts, lines, strict=False)]


def _load_from_gguf(vocab: str):
    import transformers

    models = llama_cpp_models_dir()
    gguf = f"ggml-vocab-{vocab}.gguf"
    if not (models / gguf).is_file():
        raise FileNotFoundError(f"no {gguf} in {models}")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(models), gguf_file=gguf)
    except Exception as exc:
        fallback = _CLASS_FALLBACK.get(vocab)
        if fallback is None:
            raise RuntimeError(f"transformers {transformers.__version__} cannot load {gguf}: {exc}") from exc
        return getattr(transformers, fallback).from_pretrained(str(models), gguf_file=gguf)


@functools.cache
def _gguf_tokens(vocab: str) -> tuple[list[str], list[int]]:
    """The GGUF file's tokens and token types (3 = CONTROL, 4 = USER_DEFINED)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    path = llama_cpp_models_dir() / f"ggml-vocab-{vocab}.gguf"
    metadata, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"))
    return list(metadata["tokenizer.ggml.tokens"]), [int(t) for t in metadata["tokenizer.ggml.token_type"]]


def _align_with_gguf(folder: Path, vocab: str) -> list[str]:
    """Put every CONTROL token of the GGUF file at the GGUF's id, as one special token, and drop
    added tokens the file does not have. Returns what it changed.

    transformers 5.23 spells a byte-level vocabulary's tokens in the byte alphabet, and skips as
    "mislabelled" a control token written in other characters -- deepseek-llm's
    `<｜begin▁of▁sentence｜>` (100000) and `<｜end▁of▁sentence｜>` (100001) -- then adds them again as
    new tokens (102401, 102402). It also adds GPT-2's default `<|endoftext|>` beyond the vocabulary
    where the file has none (llama-bpe: 128256, deepseek-llm: 102400). The reference tokenizers have
    neither."""
    tokens, types = _gguf_tokens(vocab)
    index = {token: i for i, token in enumerate(tokens)}
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model, changes, moved = data["model"], [], {}
    spelled = {i: key for key, i in model["vocab"].items()}
    for i, kind in enumerate(types):
        if kind == 3 and spelled.get(i) not in (None, tokens[i]):
            model["vocab"][tokens[i]] = model["vocab"].pop(spelled[i])
            changes.append(f"{tokens[i]} spelled as in the file at {i}")
    kept = []
    for added in data["added_tokens"]:
        if added["id"] < len(tokens):
            kept.append(added)
        elif added["content"] in index:
            moved[added["id"]] = index[added["content"]]
            changes.append(f"{added['content']} moved from {added['id']} to {index[added['content']]}")
        else:
            changes.append(f"{added['content']} ({added['id']}) dropped, not in the file")
    have = {added["id"] for added in kept}
    for i, kind in enumerate(types):
        if kind == 3 and i not in have:
            kept.append(
                {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
            )  # fmt: skip
    data["added_tokens"] = sorted(kept, key=lambda added: added["id"])

    def remap(node):
        if isinstance(node, dict):
            return {k: ([moved.get(i, i) for i in v] if k == "ids" else remap(v)) for k, v in node.items()}
        return [remap(v) for v in node] if isinstance(node, list) else node

    data["post_processor"] = remap(data.get("post_processor"))
    if changes:
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return changes


def _check_specials(tokenizer, vocab: str) -> None:
    tokens, types = _gguf_tokens(vocab)
    if len(tokenizer) != len(tokens):
        raise AssertionError(f"{vocab}: {len(tokenizer)} tokens, the GGUF file has {len(tokens)}")
    control = [i for i, kind in enumerate(types) if kind == 3]
    encoded = tokenizer([tokens[i] for i in control], add_special_tokens=False)["input_ids"]
    wrong = [(tokens[i], i, ids) for i, ids in zip(control, encoded, strict=False) if ids != [i]]
    if wrong:
        raise AssertionError(f"{vocab}: control tokens not single tokens at the GGUF's id: {wrong[:10]}")


def _key(*parts) -> str:
    import tokenizers
    import transformers

    blob = json.dumps([_FORMAT, transformers.__version__, tokenizers.__version__, *parts], ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_atomically(tokenizer, final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, final)
        except OSError:  # built meanwhile by another process
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _encode_all(tokenizer, texts) -> list[list[int]]:
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


@functools.cache
def _base_dir(vocab: str) -> Path:
    """The tokenizer folder of `vocab` as converted from the GGUF file (fixes applied), built once.
    Built fresh, the folder is reloaded and must give the GGUF-loaded tokenizer's ids on every vector."""
    import transformers

    models = llama_cpp_models_dir()
    final = models.parent / "tokenizers" / f"{vocab}-{_key(vocab)}"
    if final.is_dir():
        return final
    tokenizer = _load_from_gguf(vocab)
    for _, fix in _FIXES.get(vocab, ()):
        fix(tokenizer)
    texts = [text for text, _ in read_vectors(vocab)]
    expected = _encode_all(tokenizer, texts)
    tmp = Path(tempfile.mkdtemp(prefix=".check-", dir=models.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        aligned = _align_with_gguf(tmp, vocab)
        if aligned:
            print(f"{vocab}: special tokens aligned with the GGUF file: {'; '.join(aligned)}")
        reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp))
        _check_specials(reloaded, vocab)
        got = _encode_all(reloaded, texts)
        if got != expected:
            bad = [t for t, a, b in zip(texts, got, expected, strict=False) if a != b]
            raise AssertionError(
                f"{vocab}: the saved tokenizer ({type(reloaded).__name__}, {len(reloaded)} tokens) differs from "
                f"the GGUF-loaded one ({type(tokenizer).__name__}, {len(tokenizer)} tokens) on {bad!r}"
            )
        return _save_atomically(reloaded, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.cache
def _vector_report(vocab: str) -> tuple[int, int, tuple[str, ...]]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(_base_dir(vocab)))
    vectors = read_vectors(vocab)
    diffs = []
    for text, ids in vectors:
        got = tokenizer.encode(text, add_special_tokens=False)
        if got != ids:
            diffs.append(f"{text!r}: llama.cpp {ids}, here {got}")
    fixes = [name for name, _ in _FIXES.get(vocab, ())]
    note = f" (fixes applied: {', '.join(fixes)})" if fixes else ""
    print(f"{vocab}: {len(vectors) - len(diffs)} of {len(vectors)} llama.cpp test vectors identical{note}")
    return len(vectors) - len(diffs), len(vectors), tuple(diffs)


def check_against_vectors(vocab: str) -> tuple[int, int]:
    """(identical, total): how many of llama.cpp's test vectors for `vocab` the built tokenizer
    (loaded from its saved folder, no GGUF) encodes to exactly llama.cpp's ids. Prints the figure."""
    identical, total, _ = _vector_report(vocab)
    return identical, total


def vector_differences(vocab: str) -> tuple[str, ...]:
    """The vectors (text, llama.cpp's ids, ours) that `check_against_vectors` found different."""
    return _vector_report(vocab)[2]


@functools.cache
def _tokenizer_dir(vocab: str, extra_special: tuple[str, ...], chat_template: str | None) -> Path:
    identical, total, diffs = _vector_report(vocab)
    if identical != total:
        raise AssertionError(
            f"{vocab}: {total - identical} of {total} llama.cpp test vectors differ:\n" + "\n".join(diffs)
        )
    base = _base_dir(vocab)
    if not extra_special and chat_template is None:
        return base
    import transformers

    final = base.parent / f"{vocab}-{_key(vocab, list(extra_special), chat_template)}"
    if final.is_dir():
        return final
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
    if extra_special:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": list(extra_special)}, replace_extra_special_tokens=False
        )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    _save_atomically(tokenizer, final)
    reloaded = transformers.AutoTokenizer.from_pretrained(str(final))
    for token in extra_special:
        ids = reloaded.encode(f"a{token}b", add_special_tokens=False)
        if (
            ids.count(reloaded.convert_tokens_to_ids(token)) != 1
            or reloaded.decode(ids, skip_special_tokens=True) != "ab"
        ):
            shutil.rmtree(final, ignore_errors=True)
            raise AssertionError(f"{vocab}: extra special token {token!r} is not one token skipped on decode: {ids}")
    vectors = read_vectors(vocab)
    if any(reloaded.encode(text, add_special_tokens=False) != ids for text, ids in vectors):
        shutil.rmtree(final, ignore_errors=True)
        raise AssertionError(f"{vocab}: adding {list(extra_special)} changed the ids of llama.cpp's test vectors")
    return final


def vocab_tokenizer_dir(vocab: str, extra_special: list[str] = (), chat_template: str | None = None) -> Path:
    """A Hugging Face tokenizer folder (loads with `AutoTokenizer.from_pretrained(dir)`, no GGUF) of
    llama.cpp's `ggml-vocab-{vocab}.gguf`, e.g. "qwen2", "llama-bpe", "gemma-4", "deepseek-llm",
    with `extra_special` added as special tokens (single tokens, skipped on decode) and
    `chat_template` set. Raises if any of llama.cpp's test vectors encodes differently. Built once
    into ${XDG_CACHE_HOME:-~/.cache}/medtune-tests/llama-cpp-python-<version>/tokenizers/."""
    return _tokenizer_dir(vocab, tuple(extra_special), chat_template)
