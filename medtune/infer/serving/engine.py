"""The generation engine behind `medtune serve`: one thread owns the model and decodes batches.

Requests wait in a bounded queue. The engine takes what is waiting (up to --max-batch), left-pads the
prompts and decodes them together, step by step with the KV cache, each row with its own temperature,
top-p and limits; rows leave the batch when they stop, are cancelled, or hit max_tokens. A batch runs
to its end before the next one starts (dynamic, not continuous, batching). transformers' generate() is
not used because it streams only one row and samples all rows alike; the loop below makes the same
greedy choices (the tests check the server's greedy replies against `medtune predict`'s).

A request fails alone: each row's generator is seeded before its batch starts, and a row that cannot start
or fails while it decodes gets an error event and leaves; the other rows of its batch go on. Only a failure
of the batch's forward pass (out of memory, a bug) reaches every row still decoding.

Text goes out as it is decoded: a delta is held back while it ends inside a multi-byte character or
could be the start of a stop string, so a client never sees half a character or part of a stop word.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from medtune.data.rows import padded
from medtune.data.tokenizer import decode
from medtune.infer.generation import GenerationSettings


class QueueFull(Exception):
    """More requests are waiting than the queue holds: the client should retry later (HTTP 429)."""


@dataclass
class Job:
    prompt_ids: list[int]
    settings: GenerationSettings  # this request's: max_new_tokens, greedy or sampled (temperature, top_p, seed)
    stop: list[str] = field(default_factory=list)
    emit: Callable[[dict[str, Any]], None] = print  # called from the engine thread with each event
    cancelled: threading.Event = field(default_factory=threading.Event)


def held_back(text: str, stop: list[str]) -> int:
    """How many trailing characters to keep unsent: a partial character, a prefix of a stop string, or white
    space (the finished reply is stripped, as predict strips it: white space goes out only once text follows)."""
    settled = len(text)  # every pending byte of a character decodes to its own U+FFFD, in any order with spaces
    while settled and (text[settled - 1] == "\ufffd" or text[settled - 1].isspace()):
        settled -= 1
    hold = len(text) - settled
    for word in stop:
        for n in range(min(len(word) - 1, len(text)), 0, -1):
            if text.endswith(word[:n]):
                hold = max(hold, n)
                break
    return hold


@dataclass
class _Row:
    job: Job
    generated: list[int] = field(default_factory=list)  # the reply's tokens, the stop token not among them
    steps: int = 0  # tokens chosen, the stop token included (the usage figure)
    sent: str = ""  # text sent so far; leading white space is never sent (predict strips it too)
    generator: torch.Generator | None = None  # seeded from the request's seed; None: torch's global one
    done: bool = False  # finished, cancelled or failed: nothing more is sent to its client


class Engine:
    def __init__(self, model, tokenizer, stop_ids: list[int], max_batch: int = 8, max_queue: int = 64):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, set(stop_ids)
        self.decode = lambda ids: decode(tokenizer, ids)
        self.max_batch = max_batch
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batches: list[int] = []  # sizes of the batches run: what the load benchmark reports
        self.cancelled_rows = 0  # requests dropped because their client left (waiting or mid-generation)
        self.thread = threading.Thread(target=self._serve, name="medtune-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def _serve(self) -> None:
        while True:
            live = self._take_batch()
            rows = [row for row in map(self._start, live) if row is not None]
            if not rows:
                continue
            self.batches.append(len(rows))
            try:
                self._generate(rows)
            except Exception as exc:  # the batch's forward pass (a bug, out of memory): its unfinished rows hear
                for row in rows:
                    if not row.done:
                        self._fail(row.job, exc)

    def _take_batch(self) -> list[Job]:
        """What is waiting (up to max_batch), less the jobs whose clients left while they waited."""
        batch = [self.queue.get()]
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        live = [job for job in batch if not job.cancelled.is_set()]
        self.cancelled_rows += len(batch) - len(live)
        return live

    def _start(self, job: Job) -> _Row | None:
        """A row ready to decode, its generator seeded now so that a seed torch refuses fails this request
        alone, before the batch starts; None after telling the client why."""
        try:
            seed = job.settings.seed
            generator = None if seed is None else torch.Generator(device=self.model.device).manual_seed(seed)
        except Exception as exc:
            self._fail(job, exc)
            return None
        return _Row(job, generator=generator)

    def _fail(self, job: Job, exc: Exception) -> None:
        with contextlib.suppress(Exception):  # a client that cannot be told any more (its loop closed) is dropped
            job.emit({"type": "error", "message": f"generation failed: {type(exc).__name__}: {exc}"})

    @torch.no_grad()
    def _generate(self, rows: list[_Row]) -> None:
        device = self.model.device
        ids, mask = padded([row.job.prompt_ids for row in rows], self.pad, left=True, device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        active = list(range(len(rows)))
        while active:
            logits = out.logits[:, -1, :].float()
            next_tokens = torch.full((len(rows),), self.pad, dtype=torch.long, device=device)
            still = []
            for i in active:
                token = self._step(rows[i], logits[i])
                if token is not None:
                    next_tokens[i] = token
                    still.append(i)
            active = still
            if not active:
                break
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=next_tokens[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )

    def _step(self, row: _Row, logits: torch.Tensor) -> int | None:
        """The row's next token, or None when it is done; an error in one row ends that row only."""
        try:
            token = self._choose(logits, row)
            if self._advance(row, token):
                return token
        except Exception as exc:
            self._fail(row.job, exc)
        row.done = True
        return None

    def _choose(self, logits: torch.Tensor, row: _Row) -> int:
        settings = row.job.settings
        if not settings.do_sample:
            return int(logits.argmax())
        # shifted first: a tiny temperature (1e-45) sends the best token to 0 and the rest to -inf, not to nan
        probs = torch.softmax((logits - logits.max()) / settings.temperature, dim=-1)
        if settings.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < settings.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _advance(self, row: _Row, token: int) -> bool:
        """Record one token, send what can be sent; False when the row is done."""
        job = row.job
        if job.cancelled.is_set():
            self.cancelled_rows += 1
            return False
        row.steps += 1
        if token in self.stop_ids:
            self._finish(row, self.decode(row.generated), "stop")
            return False
        row.generated.append(token)
        text = self.decode(row.generated)
        for word in job.stop:
            if word in text:
                self._finish(row, text[: text.index(word)], "stop")
                return False
        if len(row.generated) >= job.settings.max_new_tokens:
            self._finish(row, text, "length")
            return False
        self._send(row, text[: len(text) - held_back(text, job.stop)].lstrip())
        return True

    def _send(self, row: _Row, ready: str) -> None:
        if len(ready) > len(row.sent) and ready.startswith(row.sent):
            row.job.emit({"type": "delta", "text": ready[len(row.sent) :]})
            row.sent = ready

    def _finish(self, row: _Row, text: str, reason: str) -> None:
        final = text.strip()
        if final.startswith(row.sent):
            self._send(row, final)
        row.job.emit(
            {
                "type": "done",
                "text": final,
                "finish_reason": reason,
                "prompt_tokens": len(row.job.prompt_ids),
                "completion_tokens": row.steps,
            }
        )
