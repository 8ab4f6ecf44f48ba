"""merge, predict, score, chat and data_prep tell the truth and destroy nothing, met through their CLIs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from helpers import DEMO_DATA, REPO
from test_honest_runs import snapshot

from medtune.infer.generation import GenerationSettings


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo recipe as shipped, trained in this process (about 15 s on 2 cores)."""
    from medtune.recipe import load_recipe
    from medtune.train import train

    out = tmp_path_factory.mktemp("demo") / "run"
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        train(load_recipe("recipes/demo.yaml", [f"output.dir={out}", "train.save_steps=0"]))
    finally:
        os.chdir(cwd)
    return out


def test_merge_out_never_destroys_a_folder(demo_run, tiny_base, tmp_path, capsys):
    from medtune.infer.merge import main

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = {p: snapshot(p) for p in (demo_run, tiny_base, foreign)}
    for out, message in (
        (demo_run, "that is (or holds) the input"),
        (tiny_base, "that is (or holds) the input"),
        (demo_run.parent, "that is (or holds) the input"),
        (foreign, "not an earlier merge output"),
    ):
        assert main([str(demo_run), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert {p: snapshot(p) for p in before} == before
    merged = tmp_path / "merged"
    for _ in range(2):  # an earlier merge output is replaced, atomically
        assert main([str(demo_run), "--out", str(merged)]) == 0
    assert "parity check: max |logits(merged) - logits(base + adapter)|" in capsys.readouterr().out


def test_merge_refuses_a_base_of_another_shape_and_a_moved_base(demo_run, tiny_base, tmp_path, capsys):
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    from medtune.infer.merge import main

    config = LlamaConfig.from_pretrained(tiny_base)
    config.vocab_size += 64
    other = tmp_path / "other-base"
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    assert main([str(demo_run), "--base", str(other), "--out", str(tmp_path / "m")]) == 2
    assert f"not the base this run trained on (vocab_size {config.vocab_size - 64} → {config.vocab_size})" in (
        capsys.readouterr().err
    )
    moved = tmp_path / "moved-run"
    shutil.copytree(demo_run, moved)
    info = json.loads((moved / "run_info.json").read_text())
    (moved / "run_info.json").write_text(json.dumps({**info, "base_model": str(tmp_path / "gone")}))
    assert main([str(moved), "--out", str(tmp_path / "m")]) == 2
    assert "no such directory (moved?); merge with --base" in capsys.readouterr().err
    assert main([str(demo_run), "--base", "models/llama-7b", "--out", str(tmp_path / "m")]) == 2
    assert "--base: models/llama-7b: no such model directory" in capsys.readouterr().err


def write_prompts(path, n: int = 2) -> None:
    rows = [json.loads(line) for line in DEMO_DATA.read_text(encoding="utf-8").splitlines()[:n]]
    path.write_text(
        "".join(json.dumps({**r, "messages": r["messages"][:1]}, ensure_ascii=False) + "\n" for r in rows),
        encoding="utf-8",
    )


def test_the_demo_visibly_learns_and_chat_speaks(demo_run, tmp_path, capsys):
    """Greedy decoding of the demo reproduces a training answer's first words, in predict and in chat."""
    import io

    from medtune.infer.chat import converse
    from medtune.infer.generation import load_model_for_inference
    from medtune.infer.predict import main

    data, out = tmp_path / "p.jsonl", tmp_path / "pred.jsonl"
    write_prompts(data)
    assert main([str(demo_run), "--data", str(data), "--out", str(out), "--max-new-tokens", "12"]) == 0
    answers = [json.loads(line)["messages"][1]["content"] for line in DEMO_DATA.read_text().splitlines()[:2]]
    predictions = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    assert all(p and a.startswith(p[:8]) for p, a in zip(predictions, answers, strict=True)), predictions
    question = json.loads(data.read_text().splitlines()[0])["messages"][0]["content"]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    loaded = load_model_for_inference(str(demo_run), "fp32", None)
    lines = ["/help\n", question + "\n", "/reset\n", "/foo bar\n", "/exit\n", "never read\n"]
    assert converse(loaded, lines, screen, GenerationSettings(max_new_tokens=12)) == 1
    text = screen.getvalue()
    assert "/reset starts a new conversation" in text and f"医生> {predictions[0]}" in text
    assert "(new conversation)\n你> " in text  # the prompt is drawn again after a command, not only a reply
    assert "unknown command /foo; commands: /reset" in text and text.count("医生>") == 1


def test_served_streams_add_up_to_the_replies_on_the_demo(demo_run):
    """The demo model ends its replies with "\n" before the end marker: the reply is stripped (as predict strips
    it), so the stream must not send that "\n" either."""
    from test_serve import Server

    questions = [json.loads(line)["messages"][:1] for line in DEMO_DATA.read_text(encoding="utf-8").splitlines()[:4]]
    with Server(demo_run) as served:
        client = served.client()
        for messages in questions:
            kwargs = {"model": "m", "messages": messages, "temperature": 0, "max_tokens": 200}
            whole = client.chat.completions.create(**kwargs).choices[0].message.content
            chunks = client.chat.completions.create(**kwargs, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole and whole


def test_predict_resumes_only_what_the_same_settings_wrote(demo_run, tmp_path, capsys):
    from medtune.infer.predict import main

    data, out = tmp_path / "p.jsonl", tmp_path / "pred.jsonl"
    write_prompts(data)
    argv = [str(demo_run), "--data", str(data), "--out", str(out), "--max-new-tokens", "4"]
    assert main(argv) == 0 and "generated 2" in capsys.readouterr().out
    assert main(argv) == 0 and "generated 0" in capsys.readouterr().out  # resumed: nothing left to do
    before = out.read_bytes()
    assert main(argv[:-1] + ["6"]) == 2
    assert "were made otherwise (settings.max_new_tokens changed)" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(argv[:-1] + ["6", "--overwrite"]) == 0 and "generated 2" in capsys.readouterr().out
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"id": "x", "prediction": "mine"}\n')
    assert main([str(demo_run), "--data", str(data), "--out", str(foreign)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and "mine" in foreign.read_text()


def test_predict_samples_reproducibly_with_a_seed_and_records_it(demo_run, tmp_path, capsys):
    """--do-sample --seed N twice gives the same replies; resuming with another seed is refused."""
    from medtune.infer.predict import main

    data = tmp_path / "p.jsonl"
    write_prompts(data)
    sample = ["--max-new-tokens", "6", "--do-sample", "--temperature", "1.5", "--seed"]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main([str(demo_run), "--data", str(data), "--out", str(first), *sample, "11"]) == 0
    assert main([str(demo_run), "--data", str(data), "--out", str(second), *sample, "11"]) == 0
    assert first.read_text(encoding="utf-8") == second.read_text(encoding="utf-8")
    capsys.readouterr()
    assert main([str(demo_run), "--data", str(data), "--out", str(first), *sample, "12"]) == 2
    assert "settings.seed changed" in capsys.readouterr().err
    assert main([str(demo_run), "--data", str(data), "--out", str(first), "--do-sample", "--temperature", "0"]) == 2
    assert "--temperature must be positive" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("123", "expected a JSON object, got 123"),
        ("null", "expected a JSON object, got null"),
        ('{"source": "x", "messages": [{"role": "user", "content": "q"}]}', "field 'id': a non-empty string"),
    ],
)
def test_predict_names_a_malformed_input_line(demo_run, tmp_path, capsys, line, message):
    from medtune.infer.predict import main

    data = tmp_path / "bad.jsonl"
    data.write_text(line + "\n")
    assert main([str(demo_run), "--data", str(data), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:1: {message}" in err and err.count("\n") == 1
    assert main([str(demo_run), "--data", str(data), "--out", str(tmp_path / "o.jsonl"), "--batch-size", "0"]) == 2


def test_score_refuses_to_score_nothing(tmp_path, capsys):
    from medtune.evaluate.score.promptcblue import main

    gold = tmp_path / "dev.json"
    sample = {
        "input": "判断意图：头痛\n答：",
        "target": "治疗方案",
        "answer_choices": ["治疗方案", "病因分析"],
        "task_type": "cls",
        "task_dataset": "KUAKE-QIC",
        "sample_id": "s1",
    }
    gold.write_text(json.dumps(sample, ensure_ascii=False) + "\n", encoding="utf-8")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**sample, "sample_id": "zz"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["--pred", str(other), "--gold", str(gold)]) == 2
    assert "none of its 1 predictions matches a sample_id" in capsys.readouterr().err
    no_ids = tmp_path / "no_ids.json"
    no_ids.write_text("".join(json.dumps({k: v for k, v in sample.items() if k != "sample_id"}) + "\n" for _ in "ab"))
    assert main(["--pred", str(no_ids), "--gold", str(gold)]) == 2
    assert "its 2 predictions carry no sample_id to match with" in capsys.readouterr().err
    replies = tmp_path / "replies.jsonl"
    replies.write_text('{"id": "a", "messages": [], "prediction": "y"}\n')
    assert main(["--pred", str(replies), "--gold", str(gold)]) == 2
    assert "no line of it is a PromptCBLUE prediction (input, target, task_dataset" in capsys.readouterr().err
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"id": "a", "messages": []}\n')
    assert main(["--pred", str(gold), "--gold", str(chat)]) == 2
    assert "no PromptCBLUE sample in it" in capsys.readouterr().err
    assert main(["--pred", str(tmp_path / "missing.json"), "--gold", str(gold)]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["--pred", str(gold), "--gold", str(gold)]) == 0
    assert "matched 1 of 1 gold samples (0 missing" in capsys.readouterr().out


def prep(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", *argv], cwd=REPO, capture_output=True, text=True)


def test_data_prep_loses_nothing_silently(tmp_path):
    """One subprocess per case would cost 6 s each: the cases run through main() but one real CLI call checks
    the exit code of writing nothing."""
    from data_prep.__main__ import main

    qa = {"query": "头痛怎么办？", "response": "多休息。"}
    line = json.dumps(qa, ensure_ascii=False)
    # a second top-level array is refused, not dropped
    two = tmp_path / "two.json"
    two.write_text(f"[{line}]\n[{line}]\n", encoding="utf-8")
    assert main(["chatmed-consult", str(two), "--out", str(tmp_path / "o.jsonl"), "--quiet"]) == 2
    # a BOM, a line holding an array, a lone surrogate and deep nesting: all counted
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        "\ufeff"
        + line
        + "\n"
        + f"[{line}, {line}]\n"
        + '{"query": "\\ud800", "response": "x"}\n'
        + "[" * 100000
        + "]" * 100000
        + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.dev.jsonl").write_text("stale\n")  # an earlier run's split of the same --out
    host = socket.gethostname()
    (tmp_path / f".out.jsonl.tmp-{host}-999999999").write_text("left by a killed run")
    (tmp_path / ".out.jsonl.tmp-other-machine-999999999").write_text("another machine's, maybe alive")
    assert main(["chatmed-consult", str(mixed), "--out", str(out), "--quiet"]) == 0
    assert len(out.read_text().splitlines()) == 3
    reasons = [json.loads(s)["reason"] for s in (tmp_path / "out.skipped.jsonl").read_text().splitlines()]
    assert sorted(reasons) == ["invalid text", "malformed JSON"]
    assert not (tmp_path / "out.dev.jsonl").exists() and not (tmp_path / f".out.jsonl.tmp-{host}-999999999").exists()
    assert (tmp_path / ".out.jsonl.tmp-other-machine-999999999").exists()
    # .TXT is text; the same file name in two folders gives distinct ids
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "BOOK.TXT").write_text("第一段。\n\n第二段。\n", encoding="utf-8")
    texts = tmp_path / "texts.jsonl"
    assert (
        main(
            [
                "text",
                str(tmp_path / "a" / "BOOK.TXT"),
                str(tmp_path / "b" / "BOOK.TXT"),
                "--out",
                str(texts),
                "--quiet",
            ]
        )
        == 0
    )
    ids = [json.loads(r)["id"] for r in texts.read_text().splitlines()]
    assert len(ids) == 4 and len(set(ids)) == 4
    # writing nothing is a failure, through the real command
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"unrelated": 1}) + "\n")
    proc = prep("chatmed-consult", str(empty), "--out", str(tmp_path / "none.jsonl"), "--quiet")
    assert proc.returncode == 1 and "no record was written" in proc.stderr
