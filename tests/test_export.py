"""`medtune export`: the GGUF files run in llama.cpp itself, and run the model in its training format.

llama.cpp is llama-cpp-python 0.3.36, built from its sdist (a dev dependency: pip builds it once and caches the
wheel). Each parity figure is printed (`pytest -s` shows them):
(a) llama.cpp tokenizes the GGUF's own chat template, rendered for real Chinese conversations, to medtune's
    training-prompt ids, on the real Chinese-LLaMA-2 (SentencePiece) and Qwen2 (byte-level BPE) vocabularies;
(b) llama.cpp's logits equal transformers' (f32 within 1e-4; f16/bf16/q8_0/q4_k_m within stated bounds) and
    greedy decoding picks the same 32 tokens (f32, f16);
(c) llama.cpp's chat completion with the embedded template is `medtune predict`'s reply.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEMO_DATA, REPO, tiny_llama_with_tokenizer
from references import DATA, SYSTEM, TOKENIZERS, chatmed_texts, real_conversations
from transformers import GenerationConfig

from medtune.console import MedtuneError
from medtune.data.jinja_templates import first_difference
from medtune.data.templates import TEMPLATES, encode_conversation, get_template, render_text, stop_token_ids
from medtune.infer.export import export_gguf, export_ollama
from medtune.infer.ollama import go_template

TYPES = ["f32", "f16", "bf16", "q8_0", "q4_k_m"]
# Largest |logit difference| to transformers' fp32 logits allowed per type, on the trained tiny model (logits of
# magnitude ~9). f32: the bound. The others: the rounding of the stored weights (f16 keeps 11 bits,
# bf16 8, q8_0 8 per block of 32, q4_k_m ~4.5) through two layers, with a margin of about 3x the figure measured
# (f16 3.7e-3, bf16 3.7e-2, q8_0 1.0e-1, q4_k_m 4.3e-1 on 2026-12-05).
TOLERANCE = {"f32": 1e-4, "f16": 0.03, "bf16": 0.3, "q8_0": 0.3, "q4_k_m": 2.0}


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def llama_cpp():
    """llama-cpp-python, or a skip (a failure under CI: CI must run llama.cpp, not pass by skipping)."""
    try:
        import llama_cpp as module
    except ImportError as exc:
        message = f"llama-cpp-python is not installed ({exc}); `pip install -c constraints.txt -e '.[dev]'` builds it"
        if _ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return module


class Gguf:
    """A GGUF file opened in llama.cpp: f32 KV cache (llama.cpp's default f16 cache would round every key)."""

    def __init__(self, path: Path, vocab_only: bool = False):
        self.llm = llama_cpp().Llama(
            str(path),
            n_ctx=512,
            n_threads=2,
            logits_all=True,
            verbose=False,
            type_k=0,
            type_v=0,
            vocab_only=vocab_only,
        )

    def __enter__(self):
        return self.llm

    def __exit__(self, *exc):
        self.llm.close()


def chat_prompt(llm, messages) -> list[int]:
    """What llama-cpp-python's chat completion feeds the model: the GGUF's template rendered, tokenized whole."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    token_text = lambda i: llm.detokenize([i], special=True).decode("utf-8")  # noqa: E731
    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=token_text(llm.token_eos()),
        bos_token=token_text(llm.token_bos()),
        add_generation_prompt=True,
    )
    return llm.tokenize(formatter(messages=messages).prompt.encode("utf-8"), add_bos=False, special=True)


def real_prompts() -> list[list[dict[str, str]]]:
    """40 real generation prompts: the real conversations (references.py) up to their last question."""
    return [messages[:-1] for messages in real_conversations()]


def qwen2_base(out: Path) -> None:
    """A random 2-layer Qwen2ForCausalLM (GQA, tied embeddings, q/k/v biases) over Qwen2's real vocabulary."""
    from real_vocab import vocab_tokenizer_dir
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(vocab_tokenizer_dir("qwen2"))
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config)
    # A second stop of the model's own besides EOS, one llama.cpp does not know by its text: it must still stop.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@pytest.mark.skipif(not DATA.is_dir() or not TOKENIZERS.is_dir(), reason="../shared/data and tokenizers are needed")
@pytest.mark.parametrize(
    "vocab, template",
    [("chinese_llama2", "llama2_zh"), ("chinese_llama2", "chinese_alpaca"), ("qwen2", "chatml")],
)
def test_llama_cpp_tokenizes_training_prompts_to_medtune_ids(vocab, template, tmp_path, capsys):
    from medtune.data.tokenizer import load_tokenizer

    llama_cpp()
    base = tmp_path / "base"
    if vocab == "qwen2":
        qwen2_base(base)
    else:
        tiny_llama_with_tokenizer(base, TOKENIZERS / vocab)
    export_gguf(str(base), tmp_path / "m.gguf", "f32", template)
    tokenizer = load_tokenizer(str(base))
    model_stops = GenerationConfig.from_pretrained(base).eos_token_id
    stops = stop_token_ids(tokenizer, get_template(template), model_stops)
    same, first_turn_same, first_turns, total = 0, 0, 0, 0
    with Gguf(tmp_path / "m.gguf", vocab_only=True) as llm:
        in_llama_cpp = llama_cpp().llama_model_get_vocab(llm.model)
        ends = [i for i in range(llm.n_vocab()) if llama_cpp().llama_vocab_is_eog(in_llama_cpp, i)]
        assert set(stops) <= set(ends), f"medtune stops {stops}, llama.cpp ends generation at {ends}"
        for messages in real_prompts():
            ours = encode_conversation(tokenizer, get_template(template), messages)[0]
            theirs = chat_prompt(llm, messages)
            users = sum(m["role"] == "user" for m in messages)
            total += 1
            same += ours == theirs
            if users == 1:
                first_turns += 1
                first_turn_same += ours == theirs
                assert ours == theirs, first_difference(tokenizer, ours, theirs)
    with capsys.disabled():
        print(
            f"\n[export parity a] {vocab}/{template}: llama.cpp = medtune training-prompt ids on "
            f"{first_turn_same}/{first_turns} first-turn prompts, {same}/{total} prompts in all; "
            f"every stop of the run ends generation in llama.cpp ({stops} within {ends})"
        )
    if template != "chinese_alpaca":  # its reference tokenized each reply alone: later turns cannot match
        assert same == total


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> str:
    """recipes/demo.yaml trained 200 steps (15-50 s): enough for replies of real text that end at EOS."""
    from medtune.recipe import load_recipe
    from medtune.train import train

    out = tmp_path_factory.mktemp("demo") / "run"
    overrides = [f"output.dir={out}", "train.max_steps=200", "train.save_steps=0", "train.eval_steps=0"]
    train(load_recipe(REPO / "recipes" / "demo.yaml", overrides))
    return str(out)


@pytest.fixture(scope="module")
def exports(demo_run, tmp_path_factory):
    """The demo run exported to every type, and its merged model in memory (what predict runs)."""
    from medtune.infer.generation import load_model_for_inference

    llama_cpp()
    out = tmp_path_factory.mktemp("exports")
    for type_name in TYPES:
        export_gguf(demo_run, out / f"{type_name}.gguf", type_name)
    return demo_run, out, load_model_for_inference(demo_run, "fp32", None)


PROMPTS = [  # two questions of the demo data, one new
    "感冒了一直流鼻涕，需要吃抗生素吗？",
    json.loads(DEMO_DATA.read_text(encoding="utf-8").splitlines()[5])["messages"][0]["content"],
    "孩子咳嗽有痰怎么办？",
]


def _greedy_llama_cpp(llm, ids: list[int], steps: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


@torch.no_grad()
def _greedy_transformers(model, ids: list[int], steps: int) -> list[int]:
    sequence = list(ids)
    for _ in range(steps):
        sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(ids) :]


@pytest.mark.parametrize("type_name", TYPES)
def test_llama_cpp_logits_equal_transformers(exports, type_name, capsys):
    run, out, loaded = exports
    gaps, greedy_same = [], 0
    with Gguf(out / f"{type_name}.gguf") as llm:
        for prompt in PROMPTS:
            ids = loaded.prompt_ids([{"role": "user", "content": prompt}])
            assert chat_prompt(llm, [{"role": "user", "content": prompt}]) == ids
            with torch.no_grad():
                expected = loaded.model(input_ids=torch.tensor([ids])).logits[0].numpy()
            llm.reset()
            llm.eval(ids)
            gaps.append(float(np.abs(np.array(llm.scores[: len(ids)]) - expected).max()))
            if type_name in ("f32", "f16"):
                greedy_same += _greedy_llama_cpp(llm, ids, 32) == _greedy_transformers(loaded.model, ids, 32)
        scale = float(np.abs(expected).max())
    with capsys.disabled():
        print(
            f"\n[export parity b] {type_name}: max |llama.cpp - transformers logit| = {max(gaps):.2e} "
            f"(bound {TOLERANCE[type_name]:g}; logits up to {scale:.1f})"
            + (
                f"; greedy 32 tokens identical on {greedy_same}/{len(PROMPTS)} prompts"
                if type_name in ("f32", "f16")
                else ""
            )
        )
    assert max(gaps) <= TOLERANCE[type_name]
    if type_name in ("f32", "f16"):
        assert greedy_same == len(PROMPTS)


def llama_cpp_reply(llm, messages, max_tokens: int) -> tuple[str, bool]:
    """(reply, ended at an end-of-generation token) as llama-cpp-python's chat completion makes it: the GGUF's
    template rendered and tokenized (chat_prompt), greedy sampling (temperature 0), stop at an end-of-generation
    token. The text is llama.cpp's llama_token_to_piece of each token: llama-cpp-python 0.3.36's own
    detokenizer has a 32-byte buffer and drops longer tokens (the tiny BPE has 36-byte Chinese tokens)."""
    import ctypes

    lib = llama_cpp()
    vocab = lib.llama_model_get_vocab(llm.model)
    tokens, ended = [], False
    for token in llm.generate(chat_prompt(llm, messages), temp=0.0, reset=True):
        if lib.llama_vocab_is_eog(vocab, token):
            ended = True
            break
        tokens.append(token)
        if len(tokens) == max_tokens:
            break
    buffer, pieces = ctypes.create_string_buffer(256), b""
    for token in tokens:
        size = lib.llama_token_to_piece(vocab, token, buffer, 256, 0, False)
        pieces += buffer.raw[:size]
    return pieces.decode("utf-8", "replace").strip(), ended


def test_llama_cpp_chat_completion_is_medtune_predict(exports, tmp_path, capsys):
    from medtune.infer.predict import main as predict_main

    run, out, _ = exports
    data = tmp_path / "prompts.jsonl"
    records = [
        {"id": f"p{i}", "source": "x", "messages": [{"role": "user", "content": p}]} for i, p in enumerate(PROMPTS)
    ]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert (
        predict_main([run, "--data", str(data), "--out", str(tmp_path / "pred.jsonl"), "--max-new-tokens", "48"]) == 0
    )
    predicted = [json.loads(line)["prediction"] for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    with Gguf(out / "f32.gguf") as llm:
        replies = [llama_cpp_reply(llm, r["messages"], 48) for r in records]
    texts = [text for text, _ in replies]
    with capsys.disabled():
        same = sum(a == b for a, b in zip(texts, predicted, strict=True))
        stopped = sum(ended for _, ended in replies)
        print(
            f"\n[export parity c] f32 llama.cpp chat reply = medtune predict on {same}/{len(PROMPTS)} prompts "
            f"({stopped} ended at the run's end marker); replies: {[t[:24] for t in texts]!r}"
        )
    assert texts == predicted
    assert all(texts) and stopped == len(PROMPTS)  # real replies, each ended by the model at EOS


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

// Renders each case's Ollama TEMPLATE with Go's text/template, as Ollama does, over its data.
func main() {
	var cases []struct {
		Template string
		Data     map[string]any
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		t := template.Must(template.New("modelfile").Parse(c.Template))
		var b []byte
		w := &writer{&b}
		if err := t.Execute(w, c.Data); err != nil {
			panic(err)
		}
		out = append(out, string(b))
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

type writer struct{ b *[]byte }

func (w *writer) Write(p []byte) (int, error) { *w.b = append(*w.b, p...); return len(p), nil }
"""


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """A function rendering (template, data) cases with Go's text/template: Ollama's template engine."""
    import shutil

    go = shutil.which("go")
    if go is None:
        message = "Go is not installed (Debian: apt-get install golang-go); Ollama templates are Go templates"
        if _ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("go")
    (folder / "main.go").write_text(GO_RENDER, encoding="utf-8")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GO111MODULE": "off", "GOCACHE": str(folder / "cache")}
    subprocess.run([go, "build", "-o", str(folder / "render"), str(folder / "main.go")], check=True, env=env)

    def render(cases: list[tuple[str, dict]]) -> list[str]:
        payload = json.dumps([{"Template": t, "Data": d} for t, d in cases], ensure_ascii=False)
        done = subprocess.run([str(folder / "render")], input=payload, capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    return render


def ollama_data(messages, system: str) -> dict:
    """Ollama's template data: every message (system ones too) and .System, the system message's content or
    else the Modelfile's SYSTEM."""
    given = [m["content"] for m in messages if m["role"] == "system"]
    return {
        "System": given[0] if given else system,
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
    }


SAMPLES = [
    [{"role": "user", "content": "头痛三天了，怎么办？"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "血压 150/95 要吃药吗？"}],
    [
        {"role": "user", "content": "孩子发烧 38.5℃。"},
        {"role": "assistant", "content": "先物理降温，多喝水。"},
        {"role": "user", "content": '还要注意什么？{content} "引号"'},
    ],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "失眠怎么办？"},
        {"role": "assistant", "content": "规律作息。"},
        {"role": "user", "content": "需要吃药吗？"},
    ],
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_ollama_template_renders_the_training_text(name, go_render):
    """Go renders each of medtune's templates (single and multi-turn, with and without a system message) to
    exactly medtune's prompt text, less the leading BOS that Ollama's tokenizer adds."""
    template = TEMPLATES[name]
    bos, eos = "<s>", "</s>"
    body = go_template(template, bos, eos)
    cases, expected = [], []
    for messages in SAMPLES:
        cases.append((body, ollama_data(messages, template.default_system)))
        text = render_text(template, messages, bos, eos)
        expected.append(text.removeprefix(bos) if template.bos != "none" else text)
    assert go_render(cases) == expected


def test_ollama_export_of_the_demo_run_prompts_with_its_training_ids(exports, tmp_path, go_render, capsys):
    """The Modelfile as Ollama reads it: TEMPLATE rendered by Go, tokenized by llama.cpp with BOS added (as
    Ollama does) = medtune's training-prompt ids."""
    import re

    run, _, loaded = exports
    out = tmp_path / "ollama"
    assert export_ollama(run, out, "q8_0") is not None
    text = (out / "Modelfile").read_text(encoding="utf-8")
    assert text.splitlines()[:3] == [
        text.splitlines()[0],
        "#   ollama create NAME -f Modelfile",
        "FROM ./model.gguf",
    ] and text.startswith("# Written by medtune export ollama from ")
    body = re.search(r'^TEMPLATE """(.*)"""$', text, re.M).group(1)
    assert 'PARAMETER stop "</s>"' in text and "SYSTEM" not in text  # chatmed: no system prompt, EOS ends
    same = 0
    with Gguf(out / "model.gguf", vocab_only=True) as llm:
        for messages in [[{"role": "user", "content": p}] for p in PROMPTS]:
            rendered = go_render([(body, ollama_data(messages, ""))])[0]
            same += llm.tokenize(rendered.encode("utf-8"), add_bos=True, special=True) == loaded.prompt_ids(messages)
    with capsys.disabled():
        print(
            f"\n[export ollama] Go-rendered TEMPLATE, tokenized as Ollama does = training ids on {same}/{len(PROMPTS)}"
        )
    assert same == len(PROMPTS)
    assert export_ollama(run, out, "q8_0") is None  # the same export again: up to date


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory) -> Path:
    """A random LLaMA of hidden size 256 (rows k-quants can take whole) over the real Chinese-LLaMA-2 vocabulary."""
    if not TOKENIZERS.is_dir():
        pytest.skip("../shared/tokenizers is needed")
    import shutil

    import sentencepiece
    from helpers import random_tiny_llama

    out = tmp_path_factory.mktemp("wide") / "base"
    source = TOKENIZERS / "chinese_llama2"
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model")).get_piece_size()
    model = random_tiny_llama(vocab, bos_token_id=1, eos_token_id=2)
    config = model.config
    config.update({"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2})
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, out / name)
    return out


def test_q4_k_m_is_llama_cpps_k_quants(wide_base, tmp_path, capsys):
    """On rows of 256, q4_k_m stores Q4_K (and Q6_K where llama.cpp's mix wants it): llama.cpp's quantizer ran."""
    import gguf
    from transformers import AutoModelForCausalLM

    llama_cpp()
    export_gguf(str(wide_base), tmp_path / "m.gguf", "q4_k_m", "llama2_zh")
    kinds = sorted({t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors})
    model = AutoModelForCausalLM.from_pretrained(wide_base, dtype=torch.float32).eval()
    ids = [1, *range(3000, 3040)]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    with Gguf(tmp_path / "m.gguf") as llm:
        llm.eval(ids)
        gap = float(np.abs(np.array(llm.scores[: len(ids)]) - expected).max())
    with capsys.disabled():
        print(
            f"\n[export q4_k_m] tensor types {kinds}; max |logit gap| {gap:.3f} "
            f"(logits up to {np.abs(expected).max():.2f})"
        )
    assert "Q4_K" in kinds and "Q6_K" in kinds
    assert gap < 0.25 * float(np.abs(expected).max())


def _cli(*args: str, cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medtune.cli", "export", *args], capture_output=True, text=True, cwd=cwd, **kwargs
    )


@pytest.mark.slow
def test_export_as_a_user_twice_foreign_out_and_a_kill(wide_base, tmp_path):
    """Through the CLI from another directory: a second export is up to date, a foreign --out is refused and left as
    it was, and SIGKILL mid-export leaves no file under the final name; the rerun completes and tidies up."""
    out = tmp_path / "out" / "m.gguf"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = _cli("gguf", str(wide_base), "--out", str(out), "--type", "q8_0", "--template", "llama2_zh", cwd=elsewhere)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"wrote {out} (q8_0") and "BOS added" in first.stdout
    stamp = out.stat().st_mtime_ns
    again = _cli("gguf", str(wide_base), "--out", str(out), "--type", "q8_0", "--template", "llama2_zh", cwd=elsewhere)
    assert again.returncode == 0 and again.stdout.startswith("up to date") and out.stat().st_mtime_ns == stamp
    other_type = _cli("gguf", str(wide_base), "--out", str(out), "--type", "f16", "--template", "llama2_zh")
    assert other_type.returncode == 0 and other_type.stdout.startswith("wrote")  # its own file: replaced

    foreign = tmp_path / "notes.gguf"
    foreign.write_text("a user's file\n", encoding="utf-8")
    refused = _cli("gguf", str(wide_base), "--out", str(foreign), "--template", "llama2_zh")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "did not write" in refused.stderr
    assert foreign.read_text(encoding="utf-8") == "a user's file\n"

    killed = tmp_path / "k" / "m.gguf"
    process = subprocess.Popen(
        [sys.executable, "-m", "medtune.cli", "export", "gguf", str(wide_base), "--out", str(killed), "--type", "q8_0"]
        + ["--template", "llama2_zh"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(killed.parent.glob(".m.gguf.tmp-*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not killed.exists(), "the kill came after the rename: the export was too quick to kill mid-way"
    assert list(killed.parent.glob(".m.gguf.tmp-*"))
    rerun = _cli("gguf", str(wide_base), "--out", str(killed), "--type", "q8_0", "--template", "llama2_zh")
    assert rerun.returncode == 0 and killed.is_file()
    assert not list(killed.parent.glob(".m.gguf.tmp-*"))  # the killed export's temp file is gone


def test_export_refuses_clearly_before_any_work(tmp_path, tiny_base, trained, monkeypatch):
    from transformers import GPT2Config

    run = str(trained[0].run.root)
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(gpt2)  # a config only: no weights to read
    with pytest.raises(MedtuneError, match="architecture 'gpt2': medtune exports llama, qwen2"):
        export_gguf(str(gpt2), tmp_path / "g.gguf", "f16", "chatmed")
    with pytest.raises(MedtuneError, match="no such run, adapter or model directory"):
        export_gguf(str(tmp_path / "missing"), tmp_path / "g.gguf", "f16")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(MedtuneError, match="exists and is not a file"):
        export_gguf(str(tiny_base), tmp_path / "dir.gguf", "f16", "chatmed")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not installed
    with pytest.raises(MedtuneError, match="q4_k_m is written by llama.cpp's quantizer: pip install llama-cpp-python"):
        export_gguf(str(tiny_base), tmp_path / "q.gguf", "q4_k_m", "chatmed")
    assert not (tmp_path / "g.gguf").exists() and not (tmp_path / "q.gguf").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "weights.bin").write_text("someone's", encoding="utf-8")
    with pytest.raises(MedtuneError, match="not an earlier `medtune export ollama`"):
        export_ollama(str(tiny_base), busy, "f16", "chatmed")
    with pytest.raises(MedtuneError, match="trained with the chatmed template; --template qwen3 would serve it"):
        export_gguf(run, tmp_path / "t.gguf", "f16", "qwen3")  # a run is served in the format it learned
    with pytest.raises(MedtuneError, match="Jinja template, which Ollama's Go templates cannot run"):
        export_ollama(str(tiny_base), tmp_path / "o", "f16", "qwen2_5")


@pytest.mark.parametrize("type_name", ["f32", "f16", "q8_0"])
def test_chinese_llama2_vocabulary_model_in_llama_cpp(wide_base, type_name, tmp_path, capsys):
    """A model over the real Chinese-LLaMA-2 vocabulary (55,296 SentencePiece pieces) exported to each type:
    llama.cpp's logits on a real training prompt against transformers', and greedy decoding."""
    from transformers import AutoModelForCausalLM

    from medtune.data.tokenizer import load_tokenizer

    llama_cpp()
    export_gguf(str(wide_base), tmp_path / "m.gguf", type_name, "llama2_zh")
    tokenizer = load_tokenizer(str(wide_base))
    question = chatmed_texts(1)[0][0] if DATA.is_dir() else PROMPTS[0]
    ids = encode_conversation(tokenizer, get_template("llama2_zh"), [{"role": "user", "content": question}])[0]
    model = AutoModelForCausalLM.from_pretrained(wide_base, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    with Gguf(tmp_path / "m.gguf") as llm:
        assert chat_prompt(llm, [{"role": "user", "content": question}]) == ids
        llm.eval(ids)
        gap = float(np.abs(np.array(llm.scores[: len(ids)]) - expected).max())
        greedy = _greedy_llama_cpp(llm, ids, 32) == _greedy_transformers(model, ids, 32)
    scale = float(np.abs(expected).max())
    bound = {"f32": 1e-4, "f16": 0.01 * scale, "q8_0": 0.05 * scale}[type_name]
    with capsys.disabled():
        print(
            f"\n[export chinese-llama2 vocab] {type_name}: {len(ids)}-token prompt, max |logit gap| {gap:.2e} "
            f"(bound {bound:.2e}, logits up to {scale:.2f}); greedy 32 tokens identical: {greedy}"
        )
    assert gap <= bound
    if type_name != "q8_0":
        assert greedy
