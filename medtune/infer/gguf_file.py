"""A transformers causal LM and its tokenizer as one GGUF file, written with llama.cpp's own `gguf` package.

What llama.cpp needs, and where each fact comes from (its `convert_hf_to_gguf.py` is the reference):

- the architecture's hyper-parameters under ``{arch}.*`` keys, and tensors under llama.cpp's names
  (``gguf.get_tensor_name_map``); LLaMA's q/k rows reordered for GGML's rotary layout (``permute``),
  Qwen2's kept (llama.cpp runs it with NeoX rotary, as transformers does);
- the tokenizer: a SentencePiece model's pieces, scores and types read from its ``tokenizer.model`` (an
  extended Chinese vocabulary is simply a longer piece list), or a byte-level BPE's tokens, merges and the
  name of its pre-tokenizer (llama.cpp knows each by name, not by regex);
- BOS/EOS/UNK/PAD, the end-of-turn marker, whether prompts start with BOS, and the run's chat template.

Tensors are converted one at a time and streamed to the file: memory is the model plus one tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from sentencepiece import sentencepiece_model_pb2

from medtune.console import MedtuneError

# export type → (what 2-D weights become, the file type llama.cpp records). 1-D tensors (norms, biases)
# stay F32 in every type, as convert_hf_to_gguf.py writes them.
TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


@dataclass(frozen=True)
class Architecture:
    arch: gguf.MODEL_ARCH
    permute_qk: bool  # LLaMA: q/k rows reordered from HF's rotate-half layout to GGML's interleaved one


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),  # LLaMA, Chinese-LLaMA(-2), Ziya, tiny-llama
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, permute_qk=False),  # Qwen1.5, Qwen2, Qwen2.5
}

# Byte-level BPE pre-tokenizers llama.cpp knows, by the regex of the tokenizer.json's Split (or "" for
# the GPT-2 regex built into a ByteLevel pre-tokenizer). llama.cpp applies the regex of the name it reads.
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = _QWEN2.replace(r"\p{N}|", r"\p{N}{1,3}|")
PRE_TOKENIZERS = {"": "gpt-2", _QWEN2: "qwen2", _LLAMA3: "llama-bpe"}


def check_architecture(config) -> Architecture:
    """The architecture's entry, or one clear error before any weight is read."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise MedtuneError(
            f"architecture {model_type!r}: medtune exports {', '.join(ARCHITECTURES)} models to GGUF; "
            "for others use llama.cpp's convert_hf_to_gguf.py on a merged model (medtune merge)"
        )
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise MedtuneError(
            f"rope scaling {rope.get('rope_type')!r}: medtune's GGUF export writes default and linear rotary "
            "scaling only; use llama.cpp's convert_hf_to_gguf.py on a merged model"
        )
    return ARCHITECTURES[model_type]


def _rope_parameters(config) -> dict:
    """transformers 5 keeps rope_theta and scaling in ``rope_parameters``; older configs in two attributes."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


@dataclass(frozen=True)
class TokenizerFacts:
    """What llama.cpp needs to tokenize and stop exactly as the run did."""

    chat_template: str
    add_bos: bool  # the run's prompts start with BOS (llama.cpp then adds it and strips a rendered one)
    stops: tuple[int, ...] = ()  # every id besides EOS that ends a reply: the template's end marker first

    @property
    def end_of_turn(self) -> int | None:
        """The template's end marker when it is not EOS (chatml's <|im_end|>)."""
        return self.stops[0] if self.stops else None


def write_gguf(model, tokenizer, facts: TokenizerFacts, path: Path, type_name: str, medtune_key: dict) -> None:
    """Write ``model`` (a merged transformers LM) and ``tokenizer`` to ``path`` as GGUF of ``type_name``."""
    config = model.config
    architecture = check_architecture(config)
    qtype, file_type = TYPES[type_name]
    name = gguf.MODEL_ARCH_NAMES[architecture.arch]
    writer = gguf.GGUFWriter(path, name)
    _add_hparams(writer, config, file_type)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    _add_tokenizer(writer, tokenizer, n_vocab)
    _add_specials(writer, tokenizer, facts)
    writer.add_string("medtune.export", json.dumps(medtune_key, ensure_ascii=False, sort_keys=True))
    plan = list(_tensors(model, architecture))
    for gguf_name, tensor in plan:
        shape, dtype, nbytes, raw = _layout(tensor, qtype)
        writer.add_tensor_info(gguf_name, shape, dtype, nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for gguf_name, tensor in plan:
        writer.write_tensor_data(_convert(gguf_name, tensor, architecture, config, qtype))
    writer.close()


def _add_hparams(writer: gguf.GGUFWriter, config, file_type: gguf.LlamaFileType) -> None:
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = _rope_parameters(config)
    writer.add_name(getattr(config, "_name_or_path", "") or "medtune export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_head != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, n_vocab: int) -> None:
    """SentencePiece when the tokenizer has its ``tokenizer.model``, else byte-level BPE; anything else is
    refused (llama.cpp would load it and tokenize differently)."""
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if vocab_file and str(vocab_file).endswith(".model") and Path(vocab_file).is_file():
        tokens, scores, types = _sentencepiece_vocab(writer, tokenizer, Path(vocab_file))
    else:
        tokens, scores, types = _byte_level_vocab(writer, tokenizer)
    if len(tokens) > n_vocab:
        raise MedtuneError(f"the tokenizer has {len(tokens)} tokens but the model's embeddings only {n_vocab} rows")
    for i in range(len(tokens), n_vocab):  # rows past the tokenizer (a vocabulary padded to a multiple of 64)
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def _sentencepiece_vocab(writer: gguf.GGUFWriter, tokenizer, model_file: Path):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if proto.trainer_spec.model_type != 2:  # 1 unigram, 2 BPE: LLaMA's tokenizers are BPE
        raise MedtuneError(f"{model_file}: a SentencePiece model of type {proto.trainer_spec.model_type}, not BPE")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    writer.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # SentencePiece's type numbers are GGUF's token types
    for token_id in range(len(tokens), len(tokenizer)):  # added after the model (e.g. a [PAD] token)
        token = tokenizer.convert_ids_to_tokens(token_id)
        tokens.append(token)
        scores.append(-1000.0)
        types.append(gguf.TokenType.CONTROL if token in tokenizer.all_special_tokens else gguf.TokenType.USER_DEFINED)
    return tokens, scores, types


def _byte_level_vocab(writer: gguf.GGUFWriter, tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or (spec.get("decoder") or {}).get("type") != "ByteLevel"
    ):
        raise MedtuneError(
            f"tokenizer {type(tokenizer).__name__}: medtune exports SentencePiece (with its tokenizer.model) and "
            "byte-level BPE tokenizers to GGUF; this is neither"
        )
    pre = PRE_TOKENIZERS.get(_split_regex(spec.get("pre_tokenizer") or {}))
    if pre is None:
        raise MedtuneError(
            f"tokenizer pre-tokenizer regex {_split_regex(spec.get('pre_tokenizer') or {})!r} is not one medtune "
            f"knows llama.cpp's name for ({', '.join(PRE_TOKENIZERS.values())})"
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {token_id: item for token_id, item in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for token_id in range(max(by_id) + 1):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:  # written as text, matched whole: control if special, user-defined if not
            tokens.append(added[token_id].content)
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    # tokenizer.json writes a merge as "a b" or, since transformers 4.45, ["a", "b"]; llama.cpp reads "a b", with
    # a space inside a part written as U+0120 (the space + 256, as gguf's SpecialVocab writes it)
    pairs = model.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(part.replace(" ", "\u0120") for part in m) for m in pairs]
    writer.add_token_merges(merges)
    return tokens, [0.0] * len(tokens), types


def _split_regex(pre_tokenizer: dict) -> str | None:
    """The regex a byte-level pre-tokenizer splits with: a Split's, or "" for ByteLevel's built-in GPT-2 one."""
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    splits = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(splits) == 1 and len(byte_level) == 1 and not byte_level[0].get("use_regex", True):
        return splits[0]
    if not splits and len(byte_level) == 1 and byte_level[0].get("use_regex", True):
        return "" if not byte_level[0].get("add_prefix_space") else None
    return json.dumps(pre_tokenizer)[:200]


def _add_specials(writer: gguf.GGUFWriter, tokenizer, facts: TokenizerFacts) -> None:
    for setter, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
        # llama.cpp ends generation at EOS, EOT and EOM (and at tokens it knows by text, <|im_end|> …): the run's
        # stops take the two slots, so a model whose generation_config names a second stop stops there too.
        (writer.add_eot_token_id, facts.stops[0] if facts.stops else None),
        (writer.add_eom_token_id, facts.stops[1] if len(facts.stops) > 1 else None),
    ):
        if token_id is not None:
            setter(int(token_id))
    writer.add_add_bos_token(facts.add_bos)
    writer.add_add_eos_token(False)  # a prompt never ends with EOS; the reply's EOS is generated
    writer.add_chat_template(facts.chat_template)


def _tensors(model, architecture: Architecture) -> Iterator[tuple[str, torch.Tensor]]:
    config = model.config
    names = gguf.get_tensor_name_map(architecture.arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output matrix from token_embd when there is none
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise MedtuneError(f"tensor {hf_name}: no llama.cpp name for it in {architecture.arch.name}")
        yield gguf_name, tensor


def _target(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if tensor.dim() == 1:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if tensor.shape[-1] % block:  # as convert_hf_to_gguf.py: a row Q8_0 cannot split stays F16
        return gguf.GGMLQuantizationType.F16
    return qtype


def _layout(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType):
    """(shape, numpy dtype, bytes, raw type) of the tensor as written: known before its data is converted."""
    target = _target(tensor, qtype)
    shape = tuple(tensor.shape)
    count = math.prod(shape)
    if target == gguf.GGMLQuantizationType.F32:
        return shape, np.dtype(np.float32), count * 4, None
    if target == gguf.GGMLQuantizationType.F16:
        return shape, np.dtype(np.float16), count * 2, None
    byte_shape = gguf.quant_shape_to_byte_shape(shape, target)
    return byte_shape, np.dtype(np.uint8), math.prod(byte_shape), target


def _convert(gguf_name: str, tensor: torch.Tensor, architecture: Architecture, config, qtype) -> np.ndarray:
    data = tensor.detach().to(torch.float32).cpu()
    if architecture.permute_qk and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
        data = permute(data, config.num_attention_heads)
    elif architecture.permute_qk and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
        data = permute(data, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    array = data.numpy()
    target = _target(tensor, qtype)
    converted = gguf.quants.quantize(array, target)
    if target == gguf.GGMLQuantizationType.BF16:
        converted = converted.view(np.uint8).reshape(gguf.quant_shape_to_byte_shape(array.shape, target))
    return converted


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF LLaMA's q/k rows are [first halves of every head's pairs, second halves]; GGML rotates adjacent
    pairs. convert_hf_to_gguf.py's LlamaModel.permute, for one tensor of ``n_head`` heads."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
