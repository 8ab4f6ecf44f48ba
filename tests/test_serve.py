"""`medtune serve`, through the official `openai` client against a real server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from browser import CHROMIUM
from helpers import REPO, tiny_llama_with_tokenizer

from medtune.console import MedtuneError
from medtune.infer.generation import GenerationSettings
from medtune.infer.serving import api_key_for, build, parser

QUESTIONS = [
    [{"role": "user", "content": "最近总是头痛，晚上睡不好，怎么办？"}],
    [{"role": "user", "content": "孩子发烧38度5"}],  # chatmed has no system slot: serve refuses a system message
    [
        {"role": "user", "content": "我血压有点高"},
        {"role": "assistant", "content": "请问具体多少？"},
        {"role": "user", "content": "150/95，平时不头晕"},
    ],
    [{"role": "user", "content": "糖尿病人能吃水果吗？我平时喜欢吃西瓜和葡萄，也常喝果汁，这样会不会影响血糖控制？"}],
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The app under uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, model: Path, *extra: str, env: dict[str, str] | None = None):
        import uvicorn

        self.args = parser().parse_args([str(model), "--port", str(free_port()), *extra])
        self.app, self.loaded, self.engine = build(self.args)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.args.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.args.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def client(self, key: str = "unused"):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def served(tiny_base):
    """The untrained tiny base (it writes long varied replies, never stopping early) in the chatmed format."""
    with Server(tiny_base, "--template", "chatmed", "--max-new-tokens", "2048") as server:
        yield server


def test_replies_equal_predicts_for_the_same_messages_batched_or_not(served, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from medtune.infer.predict import predict

    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"q{i}", "source": "t", "messages": m}) + "\n" for i, m in enumerate(QUESTIONS)),
        encoding="utf-8",
    )
    predict(
        str(served.args.model),
        data,
        tmp_path / "pred.jsonl",
        template="chatmed",
        generation=GenerationSettings(max_new_tokens=24),
    )
    expected = [json.loads(line)["prediction"] for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    client = served.client()

    def ask(messages):
        reply = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=24)
        return reply.choices[0].message.content, reply.usage

    with ThreadPoolExecutor(4) as pool:  # concurrently: they are decoded in one left-padded batch
        together = list(pool.map(ask, QUESTIONS))
    alone = [ask(m) for m in QUESTIONS]
    assert max(served.engine.batches) > 1
    for (text, usage), (single, _), want, messages in zip(together, alone, expected, QUESTIONS, strict=True):
        assert text == single == want and text
        assert usage.prompt_tokens == len(served.loaded.prompt_ids(messages))
    print(f"{len(QUESTIONS)} replies equal medtune predict's; batch sizes run: {sorted(set(served.engine.batches))}")


def test_streaming_sends_the_same_reply_in_openai_chunks(served) -> None:
    client = served.client()
    messages = QUESTIONS[0]
    whole = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=32)
    chunks = list(
        client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=32, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert len(chunks) > 5  # streamed as it was decoded, not in one piece


def test_a_request_without_sampling_settings_gets_the_models_own(served) -> None:
    """The tiny base's generation_config does not sample: a request naming no temperature is answered greedily
    (not at OpenAI's temperature 1), and /v1/models says so, which the chat page starts from."""
    client = served.client()
    plain = client.chat.completions.create(model="m", messages=QUESTIONS[0], max_tokens=24)
    greedy = client.chat.completions.create(model="m", messages=QUESTIONS[0], temperature=0, max_tokens=24)
    assert plain.choices[0].message.content == greedy.choices[0].message.content
    info = httpx.get(f"{served.url}/v1/models").json()["data"][0]["medtune"]
    assert info["sampling"] == {"temperature": 0.0, "top_p": 1.0}


def test_stop_strings_cut_the_reply(served) -> None:
    client = served.client()
    full = client.chat.completions.create(model="m", messages=QUESTIONS[0], temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    word = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(model="m", messages=QUESTIONS[0], temperature=0, max_tokens=40, stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert (
        cut.choices[0].message.content == text[: text.index(word)].strip()
        and word not in cut.choices[0].message.content
    )
    streamed = client.chat.completions.create(
        model="m", messages=QUESTIONS[0], temperature=0, max_tokens=40, stop=[word], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.choices[0].message.content


def test_sampling_with_a_seed_repeats(served) -> None:
    client = served.client()
    ask = lambda seed: client.chat.completions.create(  # noqa: E731
        model="m", messages=QUESTIONS[0], temperature=1.0, top_p=0.9, max_tokens=16, seed=seed
    )
    assert ask(1).choices[0].message.content == ask(1).choices[0].message.content
    assert ask(1).choices[0].message.content != ask(2).choices[0].message.content


BAD = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "doctor", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "assistant", "content": "您好"}]}, "last message must be the user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    ({"messages": [{"role": "user", "content": "头痛" * 9000}]}, "context"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 10**9}, "limit"),
    ({"messages": [{"role": "user", "content": "a"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "a"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "a"}], "stop": ["", "x"]}, "stop"),
    ({"messages": "hello"}, "messages"),
]


@pytest.mark.parametrize(("body", "says"), BAD)
def test_bad_requests_are_4xx_with_a_message(served, body: dict, says: str) -> None:
    reply = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=30)
    assert 400 <= reply.status_code < 500, reply.text
    assert says in reply.json()["error"]["message"] + str(reply.json()["error"]["param"])


def test_malformed_and_oversized_bodies(served) -> None:
    bad = httpx.post(f"{served.url}/v1/chat/completions", content=b'{"messages": [', timeout=30)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    big = httpx.post(f"{served.url}/v1/chat/completions", content=b"x" * (2 << 20), timeout=30)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    models = httpx.get(f"{served.url}/v1/models").json()["data"][0]
    assert models["medtune"]["template"] == "chatmed" and httpx.get(f"{served.url}/health").json()["status"] == "ok"


def test_a_client_that_leaves_stops_its_generation(served) -> None:
    before = served.engine.cancelled_rows
    # 2,000 tokens take seconds even on the tiny model: the hang-up comes long before the end
    body = {"messages": QUESTIONS[0], "max_tokens": 2000, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=30) as reply:
        next(reply.iter_lines())  # the first chunk, then hang up
    deadline = time.time() + 20
    while served.engine.cancelled_rows == before and time.time() < deadline:
        time.sleep(0.05)
    assert served.engine.cancelled_rows == before + 1
    assert served.client().chat.completions.create(model="m", messages=QUESTIONS[1], max_tokens=4).choices


def test_api_key_is_required_off_loopback_and_checked(tiny_base, monkeypatch) -> None:
    with pytest.raises(MedtuneError, match="--api-key-env"):
        api_key_for("0.0.0.0", None)
    assert api_key_for("127.0.0.1", None) is None and api_key_for("::1", None) is None
    with pytest.raises(MedtuneError, match="not set"):
        api_key_for("0.0.0.0", "MEDTUNE_TEST_KEY")
    monkeypatch.setenv("MEDTUNE_TEST_KEY", "s3cret-key")
    with Server(tiny_base, "--template", "chatmed", "--api-key-env", "MEDTUNE_TEST_KEY") as server:
        from openai import AuthenticationError

        with pytest.raises(AuthenticationError):
            server.client("wrong").chat.completions.create(model="m", messages=QUESTIONS[0], max_tokens=2)
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        ok = server.client("s3cret-key").chat.completions.create(model="m", messages=QUESTIONS[0], max_tokens=2)
        assert ok.choices[0].finish_reason == "length"
        assert httpx.get(server.url).status_code == 200  # the page itself; its API calls carry the key


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_chat_page_streams_a_reply_in_a_browser(served, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(served.url + "/")
        page.wait_for_function("document.getElementById('template').textContent.includes('chatmed')")
        page.fill("#max-tokens", "48")
        page.fill("#question", "最近总是头痛，晚上睡不好，怎么办？")
        page.click("#send")
        page.wait_for_selector(".assistant[data-done='true']", timeout=60_000)
        reply = page.inner_text(".assistant .text")
        page.fill("#question", "需要做什么检查吗？")
        page.click("#send")
        page.wait_for_selector(".assistant[data-done='true'] >> nth=1", timeout=60_000)
        shot = page.screenshot(path=str(tmp_path / "serve.png"))
        assert reply.strip() and page.locator(".msg.user").count() == 2 and page.locator(".msg.error").count() == 0
        page.click("#reset")
        assert page.locator(".msg").count() == 0
        browser.close()
    print(f"browser reply: {reply[:40]!r}…; screenshot {len(shot)} bytes")


@pytest.mark.skipif(
    not (REPO.parent / "shared" / "tokenizers" / "chinese_llama2").is_dir(), reason="../shared/tokenizers needed"
)
def test_streamed_text_is_whole_on_a_real_sentencepiece_vocabulary(tmp_path: Path) -> None:
    """Random weights over Chinese-LLaMA-2's vocabulary pick byte-fallback pieces too: a character split over
    several tokens is held back until complete, so the deltas add up to the reply exactly. (Random bytes
    that never form a character stay U+FFFD in both: that is the model's output, not the stream's.)"""
    base = tmp_path / "base"
    tiny_llama_with_tokenizer(base, REPO.parent / "shared" / "tokenizers" / "chinese_llama2")
    with Server(base, "--template", "llama2_zh", "--max-new-tokens", "96") as server:
        client = server.client()
        for seed in range(6):
            kwargs = dict(model="m", messages=QUESTIONS[0], temperature=1.0, max_tokens=96, seed=seed)
            whole = client.chat.completions.create(**kwargs).choices[0].message.content
            streamed = "".join(
                c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True)
            )
            assert streamed == whole and len(whole) > 20
