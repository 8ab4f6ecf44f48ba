"""Today's bases, token-exact: medtune's named templates and ``data.template: model`` give exactly the ids of
each family's published chat template (``apply_chat_template``) on its real vocabulary, on real Chinese
medical conversations; labels cover exactly the replies.

Vocabularies and published templates come from llama.cpp's own files (tests/real_vocab.py); conversations
from ../shared/data (ChatMed-Consult single turns, CMtMedQA multi-turn dialogues)."""

from __future__ import annotations

import pytest
from references import DATA
from references import real_conversations as conversations

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is needed (real conversations)")

THINK = ["<think>", "</think>"]  # Qwen3's added tokens (not special: decoded like text)
R1 = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
GLM = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>"]


def tokenizer_for(vocab: str, template_file: str, added: list[str] = (), special: list[str] = ()):
    from real_vocab import template_text, vocab_tokenizer_dir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vocab_tokenizer_dir(vocab))
    if added:
        tokenizer.add_tokens(list(added))
    if special:
        tokenizer.add_tokens(list(special), special_tokens=True)
    tokenizer.chat_template = template_text(template_file)
    return tokenizer


def reference_messages(messages):
    return [
        {"role": m["role"], "content": m["content"]}
        | ({"reasoning_content": m["reasoning"]} if "reasoning" in m else {})
        for m in messages
    ]


def apply(tokenizer, messages, generation: bool, variables) -> list[int]:
    out = tokenizer.apply_chat_template(
        reference_messages(messages), tokenize=True, add_generation_prompt=generation, **variables
    )
    return list(out["input_ids"])


def check_family(name: str, tokenizer, convs, variables, appended: int = 0) -> int:
    """Ids and prompt ids equal apply_chat_template's; trained tokens are replies only. Returns how many
    conversations were identical (all must be)."""
    from medtune.data.templates import IGNORE_INDEX, encode_conversation, get_template

    template = get_template(name)
    identical = 0
    for messages in convs:
        ids, labels = encode_conversation(tokenizer, template, messages)
        prompt_ids, prompt_labels = encode_conversation(tokenizer, template, messages[:-1])
        expected = apply(tokenizer, messages, False, variables)
        assert ids[: len(ids) - appended] == expected, name
        assert prompt_ids == apply(tokenizer, messages[:-1], True, variables), name
        assert set(prompt_labels) == {IGNORE_INDEX}
        trained = tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
        assert messages[-1]["content"].strip() in trained  # the last reply is always trained
        for m in messages:
            if m["role"] == "user":
                assert m["content"].strip() not in trained  # no prompt text is
        identical += 1
    print(f"{name}: {identical} of {len(convs)} identical to the published template's ids")
    return identical


FAMILIES = [
    # (named template, vocabulary, published template, added tokens, added special tokens, variables)
    ("qwen2_5", "qwen2", "Qwen-Qwen2.5-7B-Instruct", [], [], {}),
    ("qwen3", "qwen2", "Qwen-Qwen3-0.6B", THINK, [], {}),
    ("qwen3_nothink", "qwen2", "Qwen-Qwen3-0.6B", THINK, [], {"enable_thinking": False}),
    ("llama3", "llama-bpe", "meta-llama-Llama-3.1-8B-Instruct", [], [], {"date_string": "26 Jul 2024"}),
    ("llama3", "llama-bpe", "meta-llama-Llama-3.2-3B-Instruct", [], [], {"date_string": "26 Jul 2024"}),
    ("llama3", "llama-bpe", "meta-llama-Llama-3.3-70B-Instruct", [], [], {"date_string": "26 Jul 2024"}),
    ("deepseek_r1", "llama-bpe", "deepseek-ai-DeepSeek-R1-Distill-Llama-8B", THINK, R1, {}),
    ("deepseek_r1", "qwen2", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", THINK, R1, {"enable_thinking": True}),
    ("glm4", "qwen2", "GLM-4.6", THINK, GLM, {}),
    ("gemma", "gemma-4", "google-gemma-2-2b-it", [], ["<start_of_turn>", "<end_of_turn>"], {}),
]


# The inner loop (pytest -m "not slow") checks one Qwen and one Llama rendering; CI checks every family.
INNER_LOOP = {"Qwen-Qwen2.5-7B-Instruct", "meta-llama-Llama-3.1-8B-Instruct"}


@pytest.mark.parametrize(
    "family",
    [pytest.param(f, marks=() if f[2] in INNER_LOOP else pytest.mark.slow) for f in FAMILIES],
    ids=lambda f: f"{f[0]}-{f[2]}",
)
def test_named_template_equals_the_published_one(family):
    name, vocab, published, added, special, variables = family
    tokenizer = tokenizer_for(vocab, published, added, special)
    convs = conversations(reasoning=False)
    if name == "gemma":  # Gemma 2 has no system role: its template refuses one
        convs = [[m for m in c if m["role"] != "system"] for c in convs]
    appended = 1 if name == "glm4" else 0  # GLM: the <|user|> stop after the last reply (see glm4's labels)
    assert check_family(name, tokenizer, convs, variables, appended) == 40
    if name in ("qwen3", "glm4"):
        assert check_family(name, tokenizer, conversations(reasoning=True), variables, appended) == 40


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"model-{f[2]}")
def test_model_template_is_the_tokenizers_own(family):
    """data.template: model renders the tokenizer's own template (medtune fixes only date_string)."""
    _, vocab, published, added, special, variables = family
    tokenizer = tokenizer_for(vocab, published, added, special)
    convs = conversations(reasoning=False)
    if "gemma" in published:
        convs = [[m for m in c if m["role"] != "system"] for c in convs]
    variables = {"date_string": "26 Jul 2024"}  # what data.template: model passes
    if "enable_thinking" in published:
        variables["enable_thinking"] = True
    assert check_family("model", tokenizer, convs, variables) == 40


def test_qwen3_multi_turn_trains_only_what_the_model_writes():
    """Qwen3 drops earlier replies' reasoning once a later turn follows: those replies are left untrained,
    the last reply is trained with its <think> block and <|im_end|>\\n."""
    from medtune.data.templates import IGNORE_INDEX, encode_conversation, get_template

    tokenizer = tokenizer_for("qwen2", "Qwen-Qwen3-0.6B", THINK)
    messages = conversations(reasoning=True)[25]
    ids, labels = encode_conversation(tokenizer, get_template("qwen3"), messages)
    trained = tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    last = messages[-1]
    assert trained == f"<think>\n{last['reasoning']}\n</think>\n\n{last['content']}<|im_end|>\n"
    assert messages[-3]["content"] not in trained  # an earlier reply: written without its block, not trained


def test_glm_replies_learn_their_stop_token():
    from medtune.data.templates import encode_conversation, get_template

    tokenizer = tokenizer_for("qwen2", "GLM-4.6", THINK, GLM)
    messages = conversations(reasoning=False)[30]
    ids, labels = encode_conversation(tokenizer, get_template("glm4"), messages)
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    replies = sum(m["role"] == "assistant" for m in messages)
    assert ids[-1] == user and labels[-1] == user  # appended after the last reply, as GLM's finetune does
    assert sum(1 for i, label in zip(ids, labels, strict=True) if i == user and label == user) == replies


def test_reasoning_where_the_template_has_no_place_for_it_is_refused():
    from medtune.console import MedtuneError
    from medtune.data.templates import encode_conversation, get_template

    convs = conversations(reasoning=True)
    r1 = tokenizer_for("qwen2", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", THINK, R1)
    with pytest.raises(MedtuneError, match="deepseek_r1 renders no reasoning"):
        encode_conversation(r1, get_template("deepseek_r1"), convs[0])
    qwen3 = tokenizer_for("qwen2", "Qwen-Qwen3-0.6B", THINK)
    with pytest.raises(MedtuneError, match="qwen3_nothink: its generation prompt"):
        encode_conversation(qwen3, get_template("qwen3_nothink"), convs[0])
    with pytest.raises(MedtuneError, match="chatmed has no place for reasoning"):
        encode_conversation(qwen3, get_template("chatmed"), convs[0])


def test_stop_ids_come_from_template_and_model():
    from medtune.data.templates import get_template, stop_token_ids

    llama = tokenizer_for("llama-bpe", "meta-llama-Llama-3.1-8B-Instruct")
    vocab = llama.get_vocab()
    # the model's generation_config gives <|end_of_text|>; the template's replies end with <|eot_id|>
    ids = stop_token_ids(llama, get_template("model"), [vocab["<|end_of_text|>"]])
    assert vocab["<|eot_id|>"] in ids and vocab["<|end_of_text|>"] in ids
    qwen = tokenizer_for("qwen2", "Qwen-Qwen2.5-7B-Instruct")
    assert qwen.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(qwen, get_template("model"))


def test_a_named_template_other_than_the_models_own_is_named_with_its_first_difference():
    from medtune.data.templates import get_template, warn_if_not_models_own

    said = []
    qwen3 = tokenizer_for("qwen2", "Qwen-Qwen3-0.6B", THINK)
    warn_if_not_models_own(qwen3, get_template("qwen2_5"), None, said.append)
    assert len(said) == 1 and "qwen2_5 gives other ids" in said[0] and "token 1: 'system'" in said[0]
    said.clear()
    warn_if_not_models_own(qwen3, get_template("qwen3"), None, said.append)
    assert said == []


@pytest.mark.parametrize(
    "reply, opens",
    [
        ("<think>\n头痛伴发热。\n</think>\n\n建议测体温。", False),
        ("头痛伴发热。\n</think>\n\n建议测体温。", True),  # DeepSeek-R1: the prompt opened the block
        ("建议测体温。", False),
        ("<think>\n只想了一半", False),
    ],
)
def test_streamed_reasoning_and_answer_add_up_to_the_whole_reply(reply, opens):
    """Serve's stream: the reasoning_content and content deltas, sent as tokens arrive, add up to exactly the
    non-streamed split (split_reasoning), whatever the cut points."""
    from medtune.data.jinja_templates import split_reasoning, streamed_parts
    from medtune.infer.serving.api import split_deltas

    sent, got = ("", ""), {"reasoning_content": "", "content": ""}
    for end in range(1, len(reply) + 1):
        now = streamed_parts(reply[:end], opens)
        for delta in split_deltas(sent, now):
            for key, text in delta.items():
                got[key] += text
        sent = (got["reasoning_content"], got["content"])
    reasoning, answer = split_reasoning(reply, opens)
    for delta in split_deltas(sent, (reasoning or "", answer)):
        for key, text in delta.items():
            got[key] += text
    assert (got["reasoning_content"], got["content"]) == (reasoning or "", answer)
    assert "<think>" not in got["content"] + got["reasoning_content"]


def test_a_template_without_reasoning_refuses_even_a_one_letter_reasoning():
    """Found by rendering with and without it, not by searching the text (a letter is in any rendering)."""
    from medtune.console import MedtuneError
    from medtune.data.templates import encode_conversation, get_template

    qwen = tokenizer_for("qwen2", "Qwen-Qwen2.5-7B-Instruct")
    short = [{"role": "user", "content": "头痛"}, {"role": "assistant", "content": "休息", "reasoning": "r"}]
    with pytest.raises(MedtuneError, match="qwen2_5 renders no reasoning"):
        encode_conversation(qwen, get_template("qwen2_5"), short)


def test_the_tokenize_report_counts_the_replies_a_template_leaves_untrained():
    from medtune.data.rows import tokenize_chat
    from medtune.data.templates import get_template

    qwen3 = tokenizer_for("qwen2", "Qwen-Qwen3-0.6B", THINK)
    records = [{"messages": m} for m in conversations(reasoning=True)]
    replies = sum(m["role"] == "assistant" for r in records for m in r["messages"])
    _, report = tokenize_chat(records, qwen3, get_template("qwen3"), 4096)
    assert report.untrained_replies == replies - 40  # all but each conversation's last reply
    assert f"{replies - 40} earlier replies untrained" in report.summary()
    _, report = tokenize_chat(records, qwen3, get_template("qwen3"), 4096, train_on="last_turn")
    assert report.untrained_replies == 0  # asked for: not reported
    qwen25 = tokenizer_for("qwen2", "Qwen-Qwen2.5-7B-Instruct")
    _, report = tokenize_chat([{"messages": m} for m in conversations(False)], qwen25, get_template("qwen2_5"), 4096)
    assert report.untrained_replies == 0
