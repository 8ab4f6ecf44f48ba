"""The real tokenizers of tests/real_vocab.py: llama.cpp's vectors, round trips, special tokens."""

from __future__ import annotations

import pytest
from real_vocab import VOCABS, check_against_vectors, template_text, vocab_tokenizer_dir

MEDICAL = "患者男，45岁，反复上腹痛3年，加重伴黑便2天。诊断：十二指肠溃疡（DU）并出血？建议PPI + 内镜检查。"


def _load(vocab, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(vocab_tokenizer_dir(vocab, **kwargs)))


@pytest.mark.parametrize("vocab", sorted(VOCABS))
def test_vocab_matches_llama_cpp_vectors(vocab, capsys):
    identical, total = check_against_vectors(vocab)
    with capsys.disabled():
        print(f"\n{vocab} ({VOCABS[vocab]}): {identical} of {total} llama.cpp test vectors identical")
    assert total >= 40
    assert identical == total


@pytest.mark.parametrize("vocab", sorted(VOCABS))
def test_chinese_medical_round_trip(vocab):
    tokenizer = _load(vocab)
    ids = tokenizer.encode(MEDICAL, add_special_tokens=False)
    assert tokenizer.decode(ids) == MEDICAL
    assert tokenizer.unk_token_id not in ids or tokenizer.unk_token_id is None


@pytest.mark.parametrize(
    "vocab,tokens",
    [
        ("qwen2", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
        ("llama-bpe", ["<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]),
    ],
)
def test_special_tokens_are_single(vocab, tokens):
    tokenizer = _load(vocab)
    for token in tokens:
        ids = tokenizer.encode(f"x{token}y", add_special_tokens=False)
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id in ids and ids.count(token_id) == 1, (token, ids)
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == "xy"


def test_qwen2_chat_template_ids():
    """The real Qwen2.5 template through the real vocabulary: `<|im_start|>` is 151644 there."""
    tokenizer = _load("qwen2", chat_template=template_text("Qwen-Qwen2.5-7B-Instruct"))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "头痛怎么办？"}], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\n头痛怎么办？<|im_end|>\n")
    assert ids[0] == 151644 and ids.count(151645) == 2  # <|im_start|>, <|im_end|>


def test_extra_special_tokens():
    tokenizer = _load("llama-bpe", extra_special=["<|medtune_sep|>"])
    ids = tokenizer.encode("a<|medtune_sep|>b", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<|medtune_sep|>") in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"
