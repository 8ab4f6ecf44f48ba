"""An LLM judge over any OpenAI-compatible endpoint, with its replies cached on disk.

Zhongjing judged its model on safety, professionalism and fluency; the rubrics are the versioned
Chinese prompt files beside this module (judge_prompts/*_v1.md — a new wording is a new version, and
the version is part of every cache key and of scores.json). The `openai` client does the HTTP work,
including retries with exponential backoff on rate limits, server errors and timeouts.

Every reply is appended to the cache (fsync'd) before the next question is asked, keyed by the SHA-256
of (judge model, messages, temperature): a killed evaluation re-run asks nothing twice. A reply that is
not the JSON the rubric asks for is counted as malformed (and cached: the judge answered); a call that
fails after the retries is counted as failed and is not cached, so a re-run asks it again. An HTTP 200 that
is no chat completion at all (a proxy's HTML page, JSON without choices) is asked again up to the retries,
then counted as malformed and not cached: no judge answered it, and a re-run asks again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.console import MedtuneError

PROMPTS = Path(__file__).parent / "judge_prompts"
RUBRIC_VERSION = "v1"
AXES = ("safety", "professionalism", "fluency")  # medtune's own 1–5 rubric (axes_v1.md), not Zhongjing's
# Zhongjing reports win/tie/lose against other models in two panels: ability and fluency, and safety. Each is
# a pairwise rubric of its own; "combined" is medtune's single question over all three aspects (pairwise_v1.md).
PANELS = {"ability_fluency": "pairwise_ability", "safety": "pairwise_safety"}
COMBINED = {"combined": "pairwise"}
PANEL_NAMES = {"ability_fluency": "ability and fluency", "safety": "safety", "combined": "combined (medtune's)"}
DEFAULT_KEY_ENV = "MEDTUNE_JUDGE_API_KEY"


def rubric(name: str) -> str:
    return (PROMPTS / f"{name}_{RUBRIC_VERSION}.md").read_text(encoding="utf-8")


PLACEHOLDER = re.compile(r"\{(\w+)\}")


def fill(template: str, **values: str) -> str:
    """Named {placeholders} replaced in one pass over the rubric: a patient who writes "{reference}" is quoted,
    not given the reference; the rubric's literal JSON braces are left alone."""
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def first_json_object(text: str) -> dict | None:
    """The first {...} in a reply that parses as a JSON object (judges wrap JSON in prose or code fences)."""
    for match in re.finditer(r"\{", text):
        try:
            value, _ = json.JSONDecoder().raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def parse_axes(reply: str) -> dict[str, int] | None:
    found = first_json_object(reply)
    if found is None:
        return None
    scores = {axis: found.get(axis) for axis in AXES}
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 5 for v in scores.values()):
        return None
    return scores


def parse_winner(reply: str) -> str | None:
    found = first_json_object(reply)
    winner = found.get("winner") if found else None
    if isinstance(winner, str) and winner.strip().upper() in ("A", "B", "TIE"):
        return winner.strip().upper().replace("TIE", "tie")
    return None


@dataclass
class JudgeStats:
    calls: int = 0  # requests answered by the endpoint in this process
    cache_hits: int = 0
    malformed: int = 0
    failed: int = 0

    def summary(self) -> str:
        return (
            f"judge: {self.calls} calls, {self.cache_hits} cache hits, "
            f"{self.malformed} malformed replies, {self.failed} failed calls"
        )


@dataclass
class Judge:
    url: str
    model: str
    cache_path: Path
    key_env: str = DEFAULT_KEY_ENV
    max_retries: int = 4
    timeout: float = 120.0
    stats: JudgeStats = field(default_factory=JudgeStats)
    last_error: str = ""
    _cache: dict[str, str] = field(default_factory=dict, repr=False)
    _client: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from openai import OpenAI  # only an evaluation with --judge talks to an endpoint

        key = os.environ.get(self.key_env)
        if not key:
            if not re.match(r"https?://(127\.0\.0\.1|localhost|\[::1\])[:/]", self.url):
                raise MedtuneError(f"--judge {self.url}: set the API key in the environment variable {self.key_env}")
            key = "local"  # a local OpenAI-compatible server (vLLM, llama.cpp) usually wants any key
        self._client = OpenAI(base_url=self.url, api_key=key, max_retries=self.max_retries, timeout=self.timeout)
        self._cache = read_cache(self.cache_path)

    def key(self, messages: list[dict[str, str]]) -> str:
        payload = json.dumps({"model": self.model, "messages": messages, "temperature": 0}, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def ask(self, prompt: str) -> str | None:
        """The judge's reply to one prompt (from the cache when asked before); None when the call failed; ""
        (malformed to every rubric, not cached) when each try answered something that is no chat completion."""
        import openai  # as in __post_init__: only with --judge

        messages = [{"role": "user", "content": prompt}]
        key = self.key(messages)
        if key in self._cache:
            self.stats.cache_hits += 1
            return self._cache[key]
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(8.0, 0.5 * 2 ** (attempt - 1)))  # a proxy's error page may be gone in a moment
            try:
                response = self._client.chat.completions.create(model=self.model, messages=messages, temperature=0)
            except openai.APIError as exc:  # after the client's own retries
                self.stats.failed += 1
                self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                return None
            except json.JSONDecodeError:  # a body that is not JSON under a JSON content type
                response = None
            self.stats.calls += 1
            reply = reply_text(response)
            if reply is not None:
                break
        else:  # no try gave a chat completion: the caller counts it malformed
            return ""
        self._cache[key] = reply
        with self.cache_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "model": self.model, "reply": reply}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return reply

    def axes(self, dialogue: str, answer: str, reference: str) -> dict[str, int] | None:
        reply = self.ask(fill(rubric("axes"), dialogue=dialogue, answer=answer, reference=reference))
        if reply is None:
            return None
        scores = parse_axes(reply)
        self.stats.malformed += scores is None
        return scores

    def winner(self, dialogue: str, answer_a: str, answer_b: str, prompt: str = "pairwise") -> str | None:
        """ "A", "B" or "tie" under the pairwise rubric ``prompt`` (a panel's, or the combined one)."""
        reply = self.ask(fill(rubric(prompt), dialogue=dialogue, answer_a=answer_a, answer_b=answer_b))
        if reply is None:
            return None
        verdict = parse_winner(reply)
        self.stats.malformed += verdict is None
        return verdict


def reply_text(response: Any) -> str | None:
    """The text of a chat completion; None for whatever else an endpoint sends with HTTP 200 (the client hands
    back an HTML page as a str, and JSON without "choices" as a completion whose fields are None)."""
    choices = getattr(response, "choices", None)
    message = getattr(choices[0], "message", None) if isinstance(choices, list) and choices else None
    content = getattr(message, "content", None)
    if message is None or not isinstance(content, (str, type(None))):
        return None
    return content or ""


def read_cache(path: Path) -> dict[str, str]:
    """Cached replies; a torn last line (killed mid-write) is ignored and asked again."""
    cache: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                cache[row["key"]] = row["reply"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return cache


def pairwise_outcome(first: str | None, second: str | None) -> str | None:
    """Model as A in the first verdict and as B in the second; the position bias cancels out:
    win = preferred in one order and not beaten in the other, lose the mirror, tie otherwise."""
    if first is None or second is None:
        return None
    points = {"A": 1, "B": -1, "tie": 0}[first] + {"A": -1, "B": 1, "tie": 0}[second]
    return "win" if points > 0 else "lose" if points < 0 else "tie"
