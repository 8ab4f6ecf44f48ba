"""The OpenAI-compatible HTTP API of `medtune serve` (FastAPI), and the chat page at `/`.

Prompts are encoded by the same function `medtune predict` uses (InferenceModel.prompt_ids: the run's
template, system prompt and tokenizer), so the ids a model is served with are the ids it was trained on.
A request system message replaces the run's system prompt, as it would in training data; a template with
no place for one (chatmed) refuses it rather than drop it unseen.

Every bad request is a 4xx with OpenAI's error shape {"error": {"message", "type", "param", "code"}};
a 500 means a bug. A request that names no temperature/top_p gets the model's own generation settings
(greedy unless its generation_config samples); temperature 0 is greedy.
(Route handlers annotate `request: Request`; FastAPI resolves that name at module level.)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medtune.console import MedtuneError
from medtune.data.jinja_templates import streamed_parts
from medtune.data.templates import ChatTemplate, Template
from medtune.infer.generation import GenerationSettings, InferenceModel
from medtune.infer.serving.engine import Engine, Job, QueueFull

PAGE = Path(__file__).with_name("chat.html")
SEEDS = 2**63  # a request's seed is 0 <= seed < 2**63: a 64-bit seed torch.Generator.manual_seed always takes
SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: JSON can escape one, but it is not text


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # logprobs, user, … are accepted and not acted on

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)  # unset: the model's own (Served.defaults)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    seed: int | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def parse_request(body: bytes) -> ChatRequest:
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "json_invalid":
            raise lone_surrogate(body) or ApiError(400, f"the body is not valid JSON: {first['msg']}") from None
        raise ApiError(400, f"{where}: {first['msg']}", param=where or None) from None


def lone_surrogate(body: bytes) -> ApiError | None:
    """The 400 for JSON that escapes half of a UTF-16 pair ("\\ud83d" alone, from a client that cut an emoji
    in two): the strict parser only says "unexpected end of hex escape", which does not tell a client what to
    fix. None when that is not what is wrong with the body."""
    try:
        found = first_surrogate(json.loads(body), "")
    except (ValueError, RecursionError):  # not JSON even to the lenient parser: the parser's own message
        return None
    if found is None:
        return None
    where, char = found
    message = f"{where}: a lone UTF-16 surrogate \\u{ord(char):04x} is not text; send valid UTF-8/Unicode"
    return ApiError(400, message, param=where)


def first_surrogate(value: Any, where: str) -> tuple[str, str] | None:
    """(the field's path as the other errors write it, e.g. messages.0.content; the surrogate) of the first
    string in ``value`` holding a lone surrogate."""
    if isinstance(value, str):
        match = SURROGATE.search(value)
        return (where, match.group()) if match else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = first_surrogate(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


@dataclass(frozen=True)
class Served:
    """What every route reads: the model in its training format, its engine and this server's limits."""

    loaded: InferenceModel
    engine: Engine
    model_name: str  # the id clients see
    max_new_tokens: int  # the most a request may ask for
    context: int  # the model's positions: prompt + reply must fit
    defaults: GenerationSettings  # a request's sampling when it names none: the model's generation_config

    @classmethod
    def of(cls, loaded: InferenceModel, engine: Engine, model_name: str, max_new_tokens: int) -> Served:
        context = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 1 << 30)
        return cls(loaded, engine, model_name, max_new_tokens, context, model_defaults(loaded))


def model_defaults(loaded: InferenceModel) -> GenerationSettings:
    """The sampling a model ships (Qwen's generation_config samples at 0.7/0.8), else greedy: what a request gets
    when it names none, so a run is served as it was meant to be read, not at OpenAI's temperature 1."""
    config = loaded.model.generation_config
    if not getattr(config, "do_sample", False):
        return GenerationSettings(do_sample=False, temperature=0.0, top_p=1.0)
    return GenerationSettings(do_sample=True, temperature=config.temperature or 1.0, top_p=config.top_p or 1.0)


def create_app(
    loaded: InferenceModel,
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    max_new_tokens: int = 1024,
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """The FastAPI application over a loaded model and its engine; ``max_new_tokens`` is the most a request
    may ask for (the server's GenerationSettings)."""
    served = Served.of(loaded, engine, model_name, max_new_tokens)
    app = FastAPI(title="medtune serve", docs_url=None, redoc_url=None, openapi_url=None)
    defaults = {"temperature": served.defaults.temperature, "top_p": served.defaults.top_p}
    info = {
        "template": loaded.template.name,
        "source": loaded.source.to_json(),
        "context": served.context,
        "sampling": defaults,  # what a request that names none gets
    }

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if api_key is not None:
                given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                if not hmac.compare_digest(given.encode(), api_key.encode()):
                    error = ApiError(
                        401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key"
                    )
                    return JSONResponse(error.body(), status_code=401)
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > max_body_bytes:
                error = ApiError(413, f"the body is over {max_body_bytes} bytes", code="request_too_large")
                return JSONResponse(error.body(), status_code=413)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "waiting": engine.queue.qsize()}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "medtune", "medtune": info}],
        }

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await request.body()
        if len(body) > max_body_bytes:
            raise ApiError(413, f"the body is over {max_body_bytes} bytes", code="request_too_large")
        chat = parse_request(body)
        job = make_job(served, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        try:
            engine.submit(job)
        except QueueFull:
            raise ApiError(429, "the server is busy: too many requests waiting; retry later", code="busy") from None
        reply = Reply(served, job, events, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))
        if chat.stream:
            return StreamingResponse(stream(reply), media_type="text/event-stream")
        return await complete(request, reply)

    return app


def make_job(served: Served, chat: ChatRequest) -> Job:
    """The engine's job for a request, or the 400 that says what is wrong with it."""
    prompt = prompt_of(served, [m.model_dump() for m in chat.messages])
    if chat.seed is not None and not 0 <= chat.seed < SEEDS:
        raise ApiError(400, f"seed: must be an integer with 0 <= seed < 2**63 ({SEEDS})", param="seed")
    asked = chat.max_completion_tokens or chat.max_tokens
    if asked is not None and asked > served.max_new_tokens:
        raise ApiError(400, f"max_tokens {asked} is over this server's limit {served.max_new_tokens}", "max_tokens")
    room = served.context - len(prompt)
    limit = asked or min(served.max_new_tokens, room)
    if limit > room or room < 1:
        raise ApiError(
            400,
            f"the prompt is {len(prompt)} tokens; with max_tokens {limit} it is over the model's context "
            f"of {served.context}",
            param="messages",
            code="context_length_exceeded",
        )
    stop = [chat.stop] if isinstance(chat.stop, str) else list(chat.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
    defaults = served.defaults
    temperature = chat.temperature if chat.temperature is not None else defaults.temperature
    sampled = temperature > 0 and (chat.temperature is not None or defaults.do_sample)  # temperature 0 is greedy
    settings = GenerationSettings(
        max_new_tokens=limit,
        do_sample=sampled,
        temperature=temperature,
        top_p=chat.top_p if chat.top_p is not None else defaults.top_p,
        seed=chat.seed,
    )
    return Job(prompt, settings, stop)


def prompt_of(served: Served, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's ids in the run's training format, or the 400 that says why the messages have none."""
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's: the model answers it", param="messages")
    if messages[0]["role"] == "system" and not takes_system(served.loaded.template):
        raise ApiError(
            400,
            f"messages.0: this run's template {served.loaded.template.name} takes no system prompt (it has no "
            "place for one, and training saw none); put the instructions in the user message",
            param="messages.0.role",
        )
    try:
        return served.loaded.prompt_ids(messages)
    except MedtuneError as exc:
        raise ApiError(400, f"messages: {exc}", param="messages") from None


def takes_system(template: Template) -> bool:
    """Whether a system message has a place in the template: a 2023 template without a system block drops
    one unseen; a Jinja template renders it or refuses it itself (Gemma's raises, a 400 from prompt_ids)."""
    return not isinstance(template, ChatTemplate) or bool(template.system)


@dataclass
class Reply:
    """One request's reply as it is sent: its job, the engine's events for it, its OpenAI id and time."""

    served: Served
    job: Job
    events: asyncio.Queue
    id: str
    created: int

    def chunk(self, delta: dict, finish: str | None = None) -> str:
        payload = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.served.model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream(reply: Reply):
    """Server-sent events: the role, the text as it is decoded (reasoning apart), the finish, [DONE]."""
    job, events, loaded = reply.job, reply.events, reply.served.loaded
    received, sent = "", ("", "")
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if event["type"] == "delta" and not loaded.thinks:
                yield reply.chunk({"content": event["text"]})
            elif event["type"] == "delta":
                received += event["text"]
                now = streamed_parts(received, loaded.prompt_opens_think)
                for delta in split_deltas(sent, now):
                    yield reply.chunk(delta)
                sent = now
            elif event["type"] == "done":
                if loaded.thinks:
                    reasoning, answer = loaded.split(event["text"])
                    for delta in split_deltas(sent, (reasoning or "", answer)):
                        yield reply.chunk(delta)
                yield reply.chunk({}, event["finish_reason"])
                break
            else:
                yield f"data: {json.dumps(ApiError(500, event['message']).body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that left stops its row; a finished row is not affected


async def complete(request: Request, reply: Reply):
    """The whole reply as one chat.completion, once the engine is done (a client that leaves cancels it)."""
    job, events = reply.job, reply.events
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                return JSONResponse(ApiError(499, "the client closed the request").body(), status_code=499)
            continue
        if event["type"] == "error":
            raise ApiError(500, event["message"])
        if event["type"] == "done":
            break
    usage = {"prompt_tokens": event["prompt_tokens"], "completion_tokens": event["completion_tokens"]}
    reasoning, answer = reply.served.loaded.split(event["text"])
    message = {"role": "assistant", "content": answer}
    if reasoning is not None:
        message["reasoning_content"] = reasoning  # as OpenAI-compatible reasoning servers return it
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.served.model_name,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": event["finish_reason"],
            }
        ],
        "usage": usage,
    }


def split_deltas(sent: tuple[str, str], now: tuple[str, str]) -> list[dict[str, str]]:
    """The stream chunks that take what was sent of (reasoning, answer) to ``now``: each part only grows."""
    deltas = []
    for key, before, after in zip(("reasoning_content", "content"), sent, now, strict=True):
        if len(after) > len(before) and after.startswith(before):
            deltas.append({key: after[len(before) :]})
    return deltas
