"""Load a model's tokenizer so that it gives the ids the model's authors trained on, and decode exactly.

Why this module exists: transformers 5 turns a SentencePiece ``tokenizer.model`` into a
``tokenizers`` BPE whose merges are ranked by piece id. SentencePiece ranks them by piece score
and breaks ties leftmost-first; the Chinese pieces appended by Chinese-LLaMA(-2) all score 0, so
the converted tokenizer splits ~1/3 of real Chinese medical texts differently (山楂 → 山 + 3 byte
tokens). ChatMed, PromptCBLUE's baseline and Chinese-LLaMA-Alpaca(-2) tokenized with the
``sentencepiece`` library (the 2023 slow ``LlamaTokenizer``, "legacy" mode). transformers 5 keeps
that path as ``SentencePieceBackend`` (legacy by default: the text is split at special tokens and
every chunk is encoded by ``sentencepiece`` with its dummy prefix), so medtune uses it for
SentencePiece models and keeps the fast tokenizer for byte-level BPE models (Qwen) and for model
repos that ship a ``tokenizer.json`` their authors trained with (Ziya).

``SentencePieceBackend`` decodes byte-fallback pieces as text (``<0x0A>`` instead of a newline), so
:func:`decode` goes through ``sentencepiece`` itself for those tokenizers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

from huggingface_hub import snapshot_download
from transformers import AutoTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from medtune.console import MedtuneError
from medtune.paths import looks_local

TokenizerKind = Literal["auto", "sentencepiece", "fast"]
TOKENIZER_FILES = [
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "config.json",
]


class TokenizerError(MedtuneError):
    """A tokenizer that cannot be loaded as asked; the message says what to do."""


def local_tokenizer_dir(path_or_id: str) -> Path:
    """A local directory with the tokenizer files: the path itself, or the hub snapshot of just those files."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if looks_local(path_or_id):
        raise TokenizerError(f"{path_or_id}: no such tokenizer directory; a hub id looks like org/name")

    try:
        return Path(snapshot_download(path_or_id, allow_patterns=TOKENIZER_FILES))
    except Exception as exc:  # offline, unknown repo, no access: all mean "cannot get the tokenizer"
        raise TokenizerError(
            f"{path_or_id}: cannot fetch the tokenizer from the hub ({type(exc).__name__}); "
            "give a local model directory, or check the id and network"
        ) from None


def detect_kind(directory: Path) -> Literal["sentencepiece", "fast"]:
    """``sentencepiece`` when the directory's tokenizer is a SentencePiece model its authors ran as such:
    a ``tokenizer.model`` with no ``tokenizer.json``, or a config that asks for the slow tokenizer."""
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if not (directory / "tokenizer.model").is_file():
        return "fast"
    if config.get("use_fast") is False or config.get("tokenizer_class") == "SentencePieceBackend":
        return "sentencepiece"
    return "fast" if (directory / "tokenizer.json").is_file() else "sentencepiece"


def load_tokenizer(path_or_id: str, kind: TokenizerKind = "auto", trust_remote_code: bool = False):
    """The tokenizer of a model directory or hub id, with a pad token; ``kind`` overrides the detection."""
    directory = local_tokenizer_dir(path_or_id)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES[:2] + ["vocab.json"]):
        raise TokenizerError(f"{path_or_id}: no tokenizer in it (no tokenizer.model, tokenizer.json or vocab.json)")
    resolved = detect_kind(directory) if kind == "auto" else kind
    if resolved == "sentencepiece":
        if not (directory / "tokenizer.model").is_file():
            raise TokenizerError(
                f"{path_or_id}: no tokenizer.model, so no SentencePiece tokenizer; use model.tokenizer: auto or fast"
            )
        tokenizer = SentencePieceBackend.from_pretrained(str(directory), legacy=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise TokenizerError(f"{path_or_id}: the tokenizer has no EOS token; training could never learn to stop")
    if tokenizer.pad_token_id is None:
        # LLaMA tokenizers ship without a pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def tokenizer_kind(tokenizer) -> Literal["sentencepiece", "fast"]:
    return "sentencepiece" if hasattr(tokenizer, "sp_model") else "fast"


def decode(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    """Text of ``ids``; SentencePiece byte-fallback pieces become their characters (UTF-8 bytes joined)."""
    if tokenizer_kind(tokenizer) == "fast":
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    special = set(tokenizer.all_special_ids)
    size = tokenizer.sp_model.get_piece_size()
    parts: list[str] = []
    run: list[int] = []
    for token in ids:
        if token in special and skip_special_tokens:
            continue
        if token < size and token not in special:
            run.append(token)
            continue
        parts.append(tokenizer.sp_model.decode(run))
        run = []
        parts.append(tokenizer.convert_ids_to_tokens(token))
    parts.append(tokenizer.sp_model.decode(run))
    return "".join(parts)


# Threads a batch encoder may use: all cores (-1) in one process; one in each of several tokenizing processes,
# which are already one per core (medtune.data.token_cache sets it when it forks them).
ENCODER_THREADS = {"sentencepiece": -1}


def use_one_thread() -> None:
    """In a tokenizing process of several: sentencepiece's and the Rust tokenizers' batch encoders on one thread
    each, so N processes use N cores, not N times all of them."""
    ENCODER_THREADS["sentencepiece"] = 1
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the Rust tokenizers at every batch call


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's ids without special tokens added: exactly ``tokenizer(texts, add_special_tokens=False)``.

    Why: transformers' SentencePiece tokenizer encodes one text at a time in Python — 11x the cost of
    ``sentencepiece`` itself, and the whole cost of tokenizing a corpus. For a legacy SentencePiece tokenizer
    whose added tokens strip nothing, that call is: split the text at added tokens (the tokenizer's own trie),
    each added token its id, every other chunk ``sp_model.encode`` — so medtune makes the same split and
    hands all the chunks to ``sentencepiece``'s batch encoder at once (C++, one thread per core). A fast
    tokenizer's call is its Rust ``encode_batch`` plus a Python dict per text (offsets, masks: a quarter of the
    time): medtune asks the Rust tokenizer for the ids alone (``encode_batch_fast``), when no truncation,
    padding or special-token splitting is set that the call would change. Anything else: the library call."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and _backend_is_the_call(tokenizer, backend):
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    if not _splits_plainly(tokenizer):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    added = tokenizer.added_tokens_encoder
    has_added = re.compile("|".join(map(re.escape, added))).search if added else lambda text: None
    trie = tokenizer.tokens_trie  # character by character in Python: only for the texts that hold an added token
    split = [[c for c in trie.split(text) if c] if has_added(text) else [text] if text else [] for text in texts]
    plain = [chunk for chunks in split for chunk in chunks if chunk not in added]
    encoded = iter(tokenizer.sp_model.encode(plain, num_threads=ENCODER_THREADS["sentencepiece"]))
    out = []
    for chunks in split:
        ids: list[int] = []
        for chunk in chunks:
            if chunk in added:
                ids.append(added[chunk])
            else:
                ids.extend(next(encoded))
        out.append(ids)
    return out


def _backend_is_the_call(tokenizer, backend) -> bool:
    """``tokenizer(texts, add_special_tokens=False)`` is ``backend.encode_batch(texts, add_special_tokens=False)``:
    transformers turns truncation and padding off for that call and sets ``encode_special_tokens`` from
    ``split_special_tokens``; where the backend already matches, the ids are the same."""
    return (
        getattr(tokenizer, "is_fast", False)
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    )


def _splits_plainly(tokenizer) -> bool:
    """A legacy SentencePiece tokenizer whose added tokens are split out as they are (no stripping of the
    text around them, no single-word rule, no lower-casing): its call is the split ``encode_texts`` makes."""
    if tokenizer_kind(tokenizer) != "sentencepiece" or not getattr(tokenizer, "legacy", False):
        return False
    if getattr(tokenizer, "split_special_tokens", False) or getattr(tokenizer, "do_lower_case", False):
        return False
    return all(
        not (token.lstrip or token.rstrip or token.single_word) for token in tokenizer.added_tokens_decoder.values()
    )
