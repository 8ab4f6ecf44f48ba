"""Chat templates: exact ids and labels, and the same text through the saved Jinja chat_template."""

import pytest

from medtune.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    encode_conversation,
    get_template,
    jinja_chat_template,
    render_text,
)

ONE_TURN = [{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "多休息，必要时就医。"}]
TWO_TURNS = ONE_TURN + [
    {"role": "user", "content": "需要吃药吗？"},
    {"role": "assistant", "content": "可以服用布洛芬。"},
]


def enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_chatmed_exact_ids_and_labels(tokenizer):
    ids, labels = encode_conversation(tokenizer, get_template("chatmed"), ONE_TURN)
    prompt = [tokenizer.bos_token_id] + enc(tokenizer, "问：\n头痛怎么办？\n答：\n")
    answer = enc(tokenizer, "多休息，必要时就医。\n") + [tokenizer.eos_token_id]
    assert ids == prompt + answer
    assert labels == [IGNORE_INDEX] * len(prompt) + answer


def test_ziya_multi_turn_trains_every_reply_or_only_the_last(tokenizer):
    template = get_template("ziya")
    eos = tokenizer.eos_token_id
    p1 = [tokenizer.bos_token_id] + enc(tokenizer, "<human>:头痛怎么办？\n<bot>:")  # a BPE without <human>
    a1 = enc(tokenizer, "多休息，必要时就医。") + [eos]
    # Zhongjing: every later turn starts with "\n" + BOS; each piece is encoded alone
    p2 = enc(tokenizer, "\n") + [tokenizer.bos_token_id] + enc(tokenizer, "<human>:需要吃药吗？\n<bot>:")
    a2 = enc(tokenizer, "可以服用布洛芬。") + [eos]
    ids, labels = encode_conversation(tokenizer, template, TWO_TURNS)
    assert ids == p1 + a1 + p2 + a2
    mask = lambda x: [IGNORE_INDEX] * len(x)  # noqa: E731
    assert labels == mask(p1) + a1 + mask(p2) + a2
    _, last_only = encode_conversation(tokenizer, template, TWO_TURNS, train_on="last_turn")
    assert last_only == mask(p1) + mask(a1) + mask(p2) + a2


def test_llama2_zh_puts_system_inside_first_inst_and_bos_every_turn(tokenizer):
    template = get_template("llama2_zh")
    messages = [{"role": "system", "content": "你是医生。"}] + TWO_TURNS
    text = render_text(template, messages, "<s>", "</s>")
    assert text == (
        "<s>[INST] <<SYS>>\n你是医生。\n<</SYS>>\n\n头痛怎么办？ [/INST] 多休息，必要时就医。</s>"
        "<s>[INST] 需要吃药吗？ [/INST] 可以服用布洛芬。</s>"
    )
    ids, _ = encode_conversation(tokenizer, template, messages)
    assert ids.count(tokenizer.bos_token_id) == 2 and ids.count(tokenizer.eos_token_id) == 2


def test_chinese_alpaca_and_chatml_text():
    alpaca = render_text(get_template("chinese_alpaca"), ONE_TURN, "<s>", "</s>")
    assert alpaca == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n头痛怎么办？\n\n### Response: 多休息，必要时就医。</s>"
    )
    chatml = render_text(get_template("chatml"), TWO_TURNS, "<s>", "</s>")
    assert chatml.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n头痛怎么办？"
    )
    assert "多休息，必要时就医。<|im_end|>\n<|im_start|>user\n需要吃药吗？" in chatml  # no EOS after <|im_end|>
    assert "</s>" not in chatml


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize(
    "messages", [ONE_TURN, TWO_TURNS, TWO_TURNS[:3], [{"role": "system", "content": "你是一名全科医生。"}] + TWO_TURNS]
)
def test_saved_chat_template_renders_the_training_format(tokenizer, name, messages):
    template = get_template(name)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=jinja_chat_template(template))
    assert rendered == render_text(template, messages, tokenizer.bos_token, tokenizer.eos_token)


def test_turns_must_alternate(tokenizer):
    with pytest.raises(ValueError, match="alternate"):
        encode_conversation(tokenizer, get_template("chatmed"), [ONE_TURN[1], ONE_TURN[0]])


def test_template_show_refuses_bad_messages_files_in_one_line(tiny_base, tmp_path, capsys):
    """Hostile --messages: a torn JSON line, a wrong role, a missing file: exit 2, one error line naming the
    file (and line), no --json output written."""
    from medtune.infer.inspect_template import main

    cases = {
        "torn.jsonl": (
            '{"messages": [{"role": "user", "content": "头痛"}]}\n{"messages": [{"ro',
            "torn.jsonl:2: not JSON",
        ),
        "role.jsonl": ('[{"role": "doctor", "content": "x"}]', "role.jsonl:1: field 'messages[0].role'"),
        "reasoning.jsonl": (
            '[{"role": "user", "content": "x", "reasoning": "y"}]',
            "reasoning.jsonl:1: field 'messages[0].reasoning'",
        ),
    }
    for name, (text, _) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    for name, (_, expected) in [*cases.items(), ("missing.jsonl", ("", "--messages"))]:
        argv = ["show", "chatmed", "--tokenizer", str(tiny_base), "--messages", str(tmp_path / name)]
        assert main([*argv, "--json", str(tmp_path / "out.jsonl")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err, err
        assert not (tmp_path / "out.jsonl").exists()


def test_template_show_json_replaces_only_its_own_file(tiny_base, tmp_path, capsys):
    import hashlib
    import json

    from medtune.infer.inspect_template import main

    out, foreign = tmp_path / "ids.jsonl", tmp_path / "data.jsonl"
    argv = ["show", "chatmed", "--tokenizer", str(tiny_base), "--json"]
    assert main([*argv, str(out)]) == 0 and main([*argv, str(out)]) == 0  # twice: its own file is replaced
    assert set(json.loads(out.read_text().splitlines()[0])) == {"ids", "labels", "prompt_ids"}
    foreign.write_text('{"id": "a", "source": "s", "text": "病历"}\n', encoding="utf-8")
    before = hashlib.sha256(foreign.read_bytes()).hexdigest()
    capsys.readouterr()
    assert main([*argv, str(foreign)]) == 2
    assert "is not ids written by medtune template show" in capsys.readouterr().err
    assert hashlib.sha256(foreign.read_bytes()).hexdigest() == before


def test_template_show_reads_a_run_directory(trained, capsys):
    """A run directory brings its own tokenizer, template and system prompt: what it trains on and is served with."""
    from medtune.infer.inspect_template import main

    result, _, _ = trained
    assert main(["show", str(result.run.root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("template chatmed: ") and f"tokenizer: {result.run.adapter_dir} (" in out
    assert main(["show", "chatmed"]) == 2
    assert "give --tokenizer DIR_OR_HUB_ID (or a run directory)" in capsys.readouterr().err
    assert main(["show", str(result.run.root / "nothing-here")]) == 2
    assert "neither a template (chatmed," in capsys.readouterr().err


def test_trained_runs_counts_each_stretch_of_trained_labels():
    """The bytes-mask count equals the plain definition (a trained label whose predecessor is not) on random
    label rows, including empty, all-trained and all-masked ones."""
    import random

    from medtune.data.rows import trained_runs

    rng = random.Random(0)
    rows = [[], [-100], [5], [-100, -100], [1, 2, 3]]
    rows += [[rng.choice([-100, -100, 7, 8]) for _ in range(rng.randint(0, 40))] for _ in range(2000)]
    for labels in rows:
        plain = sum(1 for i, x in enumerate(labels) if x != -100 and (i == 0 or labels[i - 1] == -100))
        assert trained_runs(labels) == plain, labels
