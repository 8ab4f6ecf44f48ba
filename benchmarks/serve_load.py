"""Load on `medtune serve`: N concurrent clients × M requests, with batching on and off.

    python benchmarks/serve_load.py [MODEL --template T] [--clients 32] [--requests 4] [--max-tokens 32]

Starts `medtune serve` in a subprocess on 127.0.0.1 (a free port), once with --max-batch 8 and once with
--max-batch 1, sends clients × requests chat completions from a thread pool (the official `openai`
client, one per client), and prints requests/s and p50/p95 latency. Every request must be answered
with a 200: an error stops the benchmark. Without MODEL, the built-in tiny base (random weights: every
reply runs to --max-tokens, so every request costs the same) is served with the chatmed template.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "最近总是头痛，晚上睡不好，需要做什么检查吗？"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, template: str | None, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "medtune.cli", "serve", model, "--port", str(port), "--max-batch", str(max_batch)]
    command += ["--max-queue", "256"] + (["--template", template] if template else [])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(600):
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the server did not start in 120 s")


def load(url: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    from openai import OpenAI

    def client_run(_: int) -> list[float]:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        latencies = []
        for _ in range(requests):
            began = time.perf_counter()
            reply = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=max_tokens, temperature=0)
            assert reply.choices[0].finish_reason in ("stop", "length")
            latencies.append(time.perf_counter() - began)
        return latencies

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(x for run in pool.map(client_run, range(clients)) for x in run)
    elapsed = time.perf_counter() - began
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="run or model directory (default: the built-in tiny base)")
    parser.add_argument("--template", help="chat template (default chatmed for the tiny base)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    model, template = args.model, args.template
    if model is None:
        os.chdir(REPO)
        from medtune.model.tiny import ensure_tiny_llama

        model, template = str(ensure_tiny_llama([str(REPO / "recipes/data/demo_medical.jsonl")])), "chatmed"
    print(f"{args.clients} clients × {args.requests} requests, max_tokens {args.max_tokens}, model {model}")
    for max_batch in (8, 1):
        server, url = start(model, template, max_batch)
        try:
            figures = load(url, args.clients, args.requests, args.max_tokens)
        finally:
            server.terminate()
            server.wait(timeout=30)
        print(
            f"--max-batch {max_batch}: {figures['requests']} answered, {figures['requests_per_s']:.2f} requests/s, "
            f"latency p50 {figures['p50_s']:.2f} s, p95 {figures['p95_s']:.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
