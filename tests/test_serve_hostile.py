"""`medtune serve` against hostile input: each bad request is one 400 that says what to fix, a request that
fails never fails the requests batched beside it, and a damaged adapter is one line at start-up."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_serve import QUESTIONS, Server

from medtune.infer.generation import GenerationSettings
from medtune.infer.serving import main as serve_main
from medtune.infer.serving.engine import Engine, Job

GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def served(tiny_base):
    """The untrained tiny base in the chatmed format (no system slot), three requests to a batch."""
    with Server(tiny_base, "--template", "chatmed", "--max-batch", "3", "--max-new-tokens", "64") as server:
        yield server


def post(server: Server, body: dict | bytes) -> httpx.Response:
    url = f"{server.url}/v1/chat/completions"
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(url, json=body, timeout=60)


def invalid(message: str, param: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


def test_a_seed_torch_cannot_take_is_a_400_and_the_requests_beside_it_are_answered(served) -> None:
    asks = [{"messages": QUESTIONS[0], **GREEDY}, {"messages": QUESTIONS[2], **GREEDY}]
    alone = [post(served, body).json()["choices"][0]["message"]["content"] for body in asks]
    hostile = {"messages": QUESTIONS[0], "temperature": 1, "max_tokens": 12, "seed": 2**70}
    with ThreadPoolExecutor(3) as pool:
        bad, *good = pool.map(lambda body: post(served, body), [hostile, *asks])
    assert bad.status_code == 400
    assert bad.json() == invalid("seed: must be an integer with 0 <= seed < 2**63 (9223372036854775808)", "seed")
    assert [r.status_code for r in good] == [200, 200]
    assert [r.json()["choices"][0]["message"]["content"] for r in good] == alone and all(alone)


def wait_for_end(events: queue.Queue) -> dict:
    while True:
        event = events.get(timeout=60)
        if event["type"] in ("done", "error"):
            return event


def test_one_failing_row_never_fails_the_rows_of_its_batch(served) -> None:
    """Driven under the API's checks: a seed torch refuses (fails before the batch starts) and a stop list
    that breaks mid-decode (fails at the first token) each end their own row; the two greedy rows decoded
    with them reply exactly as they do alone."""
    loaded = served.loaded
    engine = Engine(loaded.model, loaded.tokenizer, loaded.stop_ids, max_batch=4)
    greedy = GenerationSettings(max_new_tokens=12)
    prompts = [loaded.prompt_ids(QUESTIONS[0]), loaded.prompt_ids(QUESTIONS[2])]

    def job(prompt: list[int], settings: GenerationSettings = greedy, stop: list | None = None):
        events: queue.Queue = queue.Queue()
        return Job(prompt, settings, stop or [], emit=events.put), events

    # a first job holds the engine inside its batch until the four others are all waiting: one batch of them
    started, release = threading.Event(), threading.Event()
    blocker = Job(prompts[0], GenerationSettings(max_new_tokens=60), emit=lambda e: started.set() or release.wait())
    engine.submit(blocker)
    assert started.wait(60)
    bad_seed = job(prompts[0], GenerationSettings(max_new_tokens=12, do_sample=True, seed=2**70))
    bad_stop = job(prompts[1], stop=[None])
    good = [job(prompts[0]), job(prompts[1])]
    for each, _ in (bad_seed, good[0], bad_stop, good[1]):
        engine.submit(each)
    blocker.cancelled.set()
    release.set()
    ends = [wait_for_end(events) for _, events in (bad_seed, bad_stop, *good)]
    alone = []
    for prompt in prompts:
        single, events = job(prompt)
        engine.submit(single)
        alone.append(wait_for_end(events)["text"])
    assert engine.batches[:2] == [1, 3]  # the blocker; then the four waiting, less the seed that could not start
    assert ends[0] == {"type": "error", "message": "generation failed: ValueError: Overflow when unpacking long long"}
    assert ends[1]["type"] == "error" and ends[1]["message"].startswith("generation failed: TypeError: ")
    assert [e["type"] for e in ends[2:]] == ["done", "done"]
    assert [e["text"] for e in ends[2:]] == alone and all(alone)
    assert engine.batches[2:] == [1, 1]


def test_a_lone_surrogate_is_named_not_a_hex_escape_puzzle(served) -> None:
    reply = post(served, b'{"messages": [{"role": "user", "content": "\\u5934\\u75db \\ud83d"}], "max_tokens": 4}')
    assert reply.status_code == 400
    message = "messages.0.content: a lone UTF-16 surrogate \\ud83d is not text; send valid UTF-8/Unicode"
    assert reply.json() == invalid(message, "messages.0.content")
    emoji = post(served, b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 4}')
    assert emoji.status_code == 200  # a whole pair is a character
    broken = post(served, b'{"messages": [')
    assert broken.status_code == 400 and broken.json()["error"]["message"].startswith("the body is not valid JSON")


def test_a_system_message_to_a_template_without_one_is_refused(served) -> None:
    reply = post(served, {"messages": [{"role": "system", "content": "你是儿科医生。"}, *QUESTIONS[0]], **GREEDY})
    assert reply.status_code == 400
    message = (
        "messages.0: this run's template chatmed takes no system prompt (it has no place for one, and training "
        "saw none); put the instructions in the user message"
    )
    assert reply.json() == invalid(message, "messages.0.role")


def test_a_truncated_adapter_is_one_line_naming_it(tiny_base, tmp_path: Path, capsys) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), lora).save_pretrained(adapter)
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a copy that stopped half way
    capsys.readouterr()  # the progress bar of the load above
    assert serve_main([str(adapter), "--template", "chatmed", "--port", "9"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith(f"error: {weights}: "), captured.err
    assert "truncated" in lines[0] and "Traceback" not in captured.err


def test_a_character_still_in_bytes_is_held_back_whole() -> None:
    """Byte-fallback tokenizers decode each pending byte of a character as its own U+FFFD: all are held, so the
    next delta still extends what was sent (one held byte let the stream diverge and stop)."""
    from medtune.infer.serving.engine import held_back

    assert held_back("好\ufffd\ufffd", []) == 2 and held_back("好\ufffd \n", []) == 3
    assert held_back("好 ", []) == 1 and held_back("好", []) == 0 and held_back("答案</", ["</s>"]) == 2
