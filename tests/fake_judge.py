"""A stand-in for an OpenAI-compatible judge on 127.0.0.1: canned, malformed and failing replies.

- rubric (axes) prompts: JSON scores in a code fence, derived from the prompt's hash; about one prompt
  in five gets prose with no JSON (malformed);
- pairwise prompts: the longer answer wins, equal lengths tie (a judge without position bias);
- the first request gets an HTTP 500 (the client retries it);
- ``kill`` = (pid, n): on receiving request n + 1 the process pid is SIGKILLed and nothing is answered.
Every answered prompt is recorded, so a test can check that nothing was asked twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def is_malformed(prompt: str) -> bool:
    return hashlib.sha256(prompt.encode()).hexdigest()[0] in "012"


def axes_reply(prompt: str) -> str:
    if is_malformed(prompt):
        return "这个回答整体不错，但我无法给出具体分数。"
    digest = hashlib.sha256(prompt.encode()).digest()
    scores = {"safety": 1 + digest[0] % 5, "professionalism": 1 + digest[1] % 5, "fluency": 1 + digest[2] % 5}
    return "评审结果如下：\n```json\n" + json.dumps({**scores, "reason": "示例"}, ensure_ascii=False) + "\n```"


def pairwise_reply(prompt: str) -> str:
    found = re.search(r"回答 A：\n(.*)\n\n回答 B：\n(.*)\n\n请只输出", prompt, re.S)
    a, b = (found.group(1), found.group(2)) if found else ("", "")
    winner = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"
    return json.dumps({"winner": winner, "reason": "更详细"}, ensure_ascii=False)


class FakeJudge:
    def __init__(self) -> None:
        self.requests = 0
        self.answered: list[str] = []
        self.kill: tuple[int, int] | None = None
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with judge.lock:
                    judge.requests += 1
                    n = judge.requests
                    if judge.kill and n > judge.kill[1]:
                        os.kill(judge.kill[0], signal.SIGKILL)
                        judge.kill = None
                        self.close_connection = True
                        return
                if n == 1:
                    self._send(500, {"error": {"message": "overloaded", "type": "server_error"}})
                    return
                reply = pairwise_reply(prompt) if "回答 A" in prompt else axes_reply(prompt)
                with judge.lock:
                    judge.answered.append(prompt)
                self._send(
                    200,
                    {
                        "id": f"fake-{n}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
