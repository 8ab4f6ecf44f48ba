"""Token-exact on the real tokenizers: medtune's ids and labels equal the original projects' (tests/references.py).

Skipped cleanly when ../shared (the real tokenizers and samples) is absent.
"""

from __future__ import annotations

import pytest
from references import (
    ALPACA2_PROMPT,
    ALPACA2_SYSTEM,
    ALPACA_PROMPT,
    DATA,
    TOKENIZERS,
    LegacyLlamaTokenizer,
    alpaca2_demo_prompt,
    as_messages,
    build_dataset_pair,
    chatmed_texts,
    cmtmedqa_dialogues,
    promptcblue_chatmed,
    zhongjing_ziya,
)

pytestmark = pytest.mark.skipif(
    not (TOKENIZERS / "llama").is_dir() or not DATA.is_dir(),
    reason="../shared/tokenizers and ../shared/data are needed",
)
REAL = ["llama", "chinese_llama2"]


@pytest.fixture(scope="module", params=REAL)
def real(request):
    """(medtune's tokenizer, the 2023 slow tokenizer re-implemented) for one real SentencePiece model."""
    from medtune.data.tokenizer import load_tokenizer

    directory = TOKENIZERS / request.param
    return load_tokenizer(str(directory)), LegacyLlamaTokenizer(directory / "tokenizer.model")


def real_texts() -> list[str]:
    texts = [t for pair in chatmed_texts(120) for t in pair]
    texts += [t for turns in cmtmedqa_dialogues(40) for pair in turns for t in pair]
    return texts


def test_sentencepiece_tokenization_equals_sentencepiece(real):
    tokenizer, reference = real
    texts = real_texts()
    ours = tokenizer(texts, add_special_tokens=False)["input_ids"]
    differences = sum(a != reference.sp.encode(t) for a, t in zip(ours, texts, strict=True))
    print(f"{tokenizer.name_or_path}: {len(texts)} real texts, {differences} differ from sentencepiece")
    assert len(texts) >= 200 and differences == 0


EDGE_TEXTS = [
    "",
    " ",
    "  两个空格开头",
    "\n换行开头\n\n",
    "▁下划线",
    "</s>",
    "<s>问：\n头痛\n答：\n",
    "多喝水\n</s>",
    "<s></s><unk><pad>",
    "前<s>中</s>后",
    "<s> 空格</s> ",
    "<s<s>>",
    "</s</s>",
    "<unk",
    "𠀾𠮷罕见字",
    "emoji 😷 and ASCII",
    "\t制表\r\n回车",
    "全角　空格",
]


def test_encode_texts_equals_the_tokenizer_call(real):
    """medtune's batched path (the trie's split, then sentencepiece's batch encoder) gives the ids of
    transformers' own call on real texts and on texts full of special-token strings and odd whitespace."""
    from medtune.data.tokenizer import encode_texts

    tokenizer, _ = real
    texts = real_texts() + EDGE_TEXTS + [t + "</s>" for t in real_texts()[:50]]
    ours = encode_texts(tokenizer, texts)
    library = tokenizer(texts, add_special_tokens=False)["input_ids"]
    differences = sum(a != b for a, b in zip(ours, library, strict=True))
    print(f"{tokenizer.name_or_path}: encode_texts vs the tokenizer call, {len(texts)} texts, {differences} differ")
    assert len(ours) == len(texts) and differences == 0


def test_decode_round_trips_byte_fallback(real):
    from medtune.data.tokenizer import decode

    tokenizer, reference = real
    text = "第一行\n第二行：𠀾 ok"
    assert decode(tokenizer, reference.sp.encode(text)) == text


def test_chatmed_equals_promptcblue(real):
    from medtune.data.templates import encode_conversation, get_template

    tokenizer, reference = real
    for q, a in chatmed_texts(60):
        ours = encode_conversation(tokenizer, get_template("chatmed"), as_messages([(q, a)]))
        assert ours == promptcblue_chatmed(reference, q, a)


def test_chatmed_multi_turn_is_the_one_string_chatmed_tokenizes(real):
    """ChatMed/PromptCBLUE are single-turn; medtune continues the string they tokenize at once,
    '<s>问：…答：\n{a1}\n</s>问：…', each turn's prompt masked by PromptCBLUE's rule."""
    from medtune.data.templates import IGNORE_INDEX, encode_conversation, get_template

    tokenizer, reference = real
    for turns in cmtmedqa_dialogues(20):
        ids, labels = encode_conversation(tokenizer, get_template("chatmed"), as_messages(turns))
        text = "<s>" + "".join(f"问：\n{q}\n答：\n{a}\n</s>" for q, a in turns)
        assert ids == reference(text, add_special_tokens=False)
        expected = []
        for i, (q, a) in enumerate(turns):
            turn_ids, turn_labels = promptcblue_chatmed(reference, q, a)
            if i:  # later turns have no BOS of their own: '</s>问：…' continues the one string
                turn_ids, turn_labels = turn_ids[1:], turn_labels[1:]
            expected += turn_labels
        assert labels == expected and labels.count(IGNORE_INDEX) < len(labels)


def test_chinese_alpaca_multi_turn_continues_build_dataset(real):
    """Chinese-LLaMA-Alpaca trains single turns; medtune's later turns are build_dataset's (source, target)
    again, the source starting '\n\n### Instruction:' after the EOS, with no preamble and no BOS."""
    from medtune.data.templates import encode_conversation, get_template

    tokenizer, reference = real
    for turns in cmtmedqa_dialogues(20):
        ours = encode_conversation(tokenizer, get_template("chinese_alpaca"), as_messages(turns))
        ids, labels = build_dataset_pair(reference, ALPACA_PROMPT.format(instruction=turns[0][0]), turns[0][1])
        for q, a in turns[1:]:
            source = reference(f"\n\n### Instruction:\n{q}\n\n### Response: ", add_special_tokens=False)
            target = reference(a + "</s>", add_special_tokens=False)
            ids, labels = ids + source + target, labels + [-100] * len(source) + target
        assert ours == (ids, labels)


def test_chinese_alpaca_equals_build_dataset(real):
    from medtune.data.templates import encode_conversation, get_template

    tokenizer, reference = real
    for q, a in chatmed_texts(60):
        ours = encode_conversation(tokenizer, get_template("chinese_alpaca"), as_messages([(q, a)]))
        assert ours == build_dataset_pair(reference, ALPACA_PROMPT.format(instruction=q), a)


@pytest.mark.parametrize("system", [None, "你是一名经验丰富的全科医生。"])
def test_llama2_zh_equals_build_dataset_and_demo(real, system):
    from medtune.data.templates import IGNORE_INDEX, encode_conversation, get_template

    tokenizer, reference = real
    template = get_template("llama2_zh")
    for q, a in chatmed_texts(40):
        ours = encode_conversation(tokenizer, template, as_messages([(q, a)]), system)
        source = ALPACA2_PROMPT.format(system=system or ALPACA2_SYSTEM, instruction=q)
        assert ours == build_dataset_pair(reference, source, a)
    for turns in cmtmedqa_dialogues(30):
        messages = as_messages(turns, system)
        prompt, _ = encode_conversation(tokenizer, template, messages[:-1])
        assert prompt == alpaca2_demo_prompt(reference, turns[:-1], turns[-1][0], system or ALPACA2_SYSTEM)
        ids, labels = encode_conversation(tokenizer, template, messages)
        assert ids == prompt + reference(turns[-1][1] + "</s>", add_special_tokens=False)
        replies = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
        assert replies == [t for _, a in turns for t in reference(a + "</s>", add_special_tokens=False)]


@pytest.mark.parametrize("system", [None, "你是一名医生。"])
def test_ziya_equals_zhongjing(real, system):
    from medtune.data.templates import encode_conversation, get_template

    tokenizer, reference = real
    for turns in cmtmedqa_dialogues(30) + [[pair] for pair in chatmed_texts(10)]:
        ours = encode_conversation(tokenizer, get_template("ziya"), as_messages(turns, system))
        assert ours == zhongjing_ziya(reference, turns, system or "")


def test_ziya_uses_the_marker_tokens_when_the_vocabulary_has_them(tmp_path):
    """Ziya's vocabulary has <human> and <bot> as tokens: each is one id, as convert_tokens_to_ids gives."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    from medtune.data.templates import encode_conversation, get_template

    tokenizer = SentencePieceBackend.from_pretrained(str(TOKENIZERS / "llama"), legacy=True)
    tokenizer.add_tokens(["<human>", "<bot>"], special_tokens=True)
    human, bot = tokenizer.convert_tokens_to_ids(["<human>", "<bot>"])
    reference = LegacyLlamaTokenizer(TOKENIZERS / "llama" / "tokenizer.model", {"<human>": human, "<bot>": bot})
    turns = cmtmedqa_dialogues(3)[0]
    ids, labels = encode_conversation(tokenizer, get_template("ziya"), as_messages(turns))
    assert (ids, labels) == zhongjing_ziya(reference, turns)
    assert ids.count(human) == len(turns) and ids.count(bot) == len(turns)


def qwen_like_tokenizer():
    """A byte-level BPE with Qwen's markers: <|endoftext|> is its EOS, <|im_start|>/<|im_end|> special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(real_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )


def test_chatml_has_no_eos_after_im_end_and_matches_qwen():
    from medtune.data.templates import IGNORE_INDEX, encode_conversation, get_template, stop_token_ids

    tokenizer = qwen_like_tokenizer()
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    newline = enc("\n")
    for turns in cmtmedqa_dialogues(10):
        messages = as_messages(turns)
        ids, labels = encode_conversation(tokenizer, get_template("chatml"), messages)
        # Qwen: <|im_start|>{role}\n{content}<|im_end|>\n per message, after the default system message
        expected = []
        for message in [{"role": "system", "content": "You are a helpful assistant."}] + messages:
            expected += [start] + enc(message["role"] + "\n" + message["content"]) + [end] + newline
        assert ids == expected
        assert tokenizer.eos_token_id not in ids
        trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
        assert trained == [t for _, a in turns for t in enc(a) + [end] + newline]
    assert stop_token_ids(tokenizer, get_template("chatml")) == [tokenizer.eos_token_id, end]


@pytest.mark.parametrize("name", ["chatmed", "chinese_alpaca", "llama2_zh", "ziya"])
@pytest.mark.parametrize("system", [None, "你是一名医生。"])
def test_saved_tokenizer_gives_the_training_prompt_ids(real, tmp_path, name, system):
    """The tokenizer saved with an adapter reloads with plain transformers (AutoTokenizer picks the
    SentencePiece backend from its config) and apply_chat_template gives the prompt ids medtune trains:
    always on a first turn; with history where one string tokenizes as the authors' calls (chatmed,
    llama2_zh, and ziya without a system prompt in Ziya's vocabulary, which has <human>/<bot>)."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    from medtune.data.templates import encode_conversation, get_template, jinja_chat_template

    _, reference = real
    tokenizer = SentencePieceBackend.from_pretrained(str(TOKENIZERS / reference.name), legacy=True)
    if name == "ziya":
        tokenizer.add_tokens(["<human>", "<bot>"], special_tokens=True)
    template = get_template(name)
    tokenizer.chat_template = jinja_chat_template(template, system)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").is_file() and not (tmp_path / "tokenizer.json").exists()
    saved = AutoTokenizer.from_pretrained(tmp_path)
    with_history = name in ("chatmed", "llama2_zh") or (name == "ziya" and not system)
    checked = 0
    for turns in cmtmedqa_dialogues(10):
        for n in (1, len(turns)) if with_history else (1,):
            messages = as_messages(turns[:n])[:-1]
            prompt, _ = encode_conversation(tokenizer, template, messages, system)
            rendered = saved.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            if name == "ziya" and system:  # Zhongjing encodes the system prompt and its "\n" apart
                assert rendered != prompt
                continue
            assert rendered == prompt, (name, n)
            checked += 1
    assert checked >= (20 if with_history else 10) or (name == "ziya" and system)
    assert saved(["山楂"], add_special_tokens=False)["input_ids"] == [reference.sp.encode("山楂")]


@pytest.mark.parametrize("vocab", ["qwen2", "llama-bpe", "gemma-4", "deepseek-llm"])
@pytest.mark.parametrize("split_special_tokens", [False, True])
def test_encode_texts_of_a_fast_tokenizer_equals_the_tokenizer_call(vocab, split_special_tokens, capsys):
    """Fast tokenizers: the Rust tokenizer's ids alone (encode_batch_fast) are the ids of transformers' call, on
    real texts, edge texts and texts around every special token of the vocabulary, with special tokens split or
    not; after the call has set truncation, medtune goes through the call itself."""
    from real_vocab import vocab_tokenizer_dir
    from transformers import AutoTokenizer

    from medtune.data.tokenizer import encode_texts

    tokenizer = AutoTokenizer.from_pretrained(vocab_tokenizer_dir(vocab), split_special_tokens=split_special_tokens)
    specials = [t for t in tokenizer.all_special_tokens if t]
    texts = (
        real_texts() + EDGE_TEXTS + [f"前{s}中 {s}后" for s in specials] + [t + specials[0] for t in real_texts()[:50]]
    )
    ours = encode_texts(tokenizer, texts)
    library = tokenizer(texts, add_special_tokens=False)["input_ids"]
    differences = sum(a != b for a, b in zip(ours, library, strict=True))
    with capsys.disabled():
        print(
            f"\n{vocab} (split_special_tokens={split_special_tokens}): encode_texts vs the call, {len(texts)} texts, "
            f"{differences} differ"
        )
    assert differences == 0
    tokenizer.backend_tokenizer.enable_truncation(8)  # a setting the call would turn off: the call is used
    assert encode_texts(tokenizer, texts[:20]) == tokenizer(texts[:20], add_special_tokens=False)["input_ids"]
