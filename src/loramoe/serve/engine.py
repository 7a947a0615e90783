"""Generation for many clients at once: dynamic batching on one worker thread.

Requests wait in a queue. Whenever the model is free, the worker takes the oldest request and
every queued request that can share its batch (the same model; greedy with greedy, or sampling at
the same temperature and top-p) and decodes them together with ``transformers``' ``generate``,
left-padded, so a batch of 16 costs little more than one on a CPU. Requests that arrive meanwhile
form the next batch. Each prompt gets the tokens it would get alone (``generate`` derives
positions from the attention mask; in float32 padding changes nothing, tested), and a sampled
request with a ``seed`` runs alone, so its seed alone decides its tokens.

Each step's new tokens are read by a stopping criterion, which ``generate`` calls after every
step with the sequences so far: it turns each row's token into text for its client, ends the rows
whose stop string, own token limit or cancellation came, and tells ``generate`` which rows are
done (a batch ends when all are). Text is released to the client only once it is final: not while
it could still be the start of a stop string (the answer ends before a stop string, as OpenAI's),
nor while it ends in an incomplete UTF-8 character.

With routing asked, the LoRAMoE gates of each step are captured and each row's token gets its gate
share per expert group at the position that predicted it, averaged over layers: the numbers of
``loramoe generate --show-routing``.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from loramoe.adapters import LoraMoEConfig
from loramoe.attach import adapter_config
from loramoe.generate.routing_strip import share_rows
from loramoe.generation import left_pad, stop_token_ids
from loramoe.routing import RoutingRecord, capture_routing
from loramoe.serve.registry import Registry, ServedModel


@dataclass
class Job:
    """What one request asks the model for (checked by the caller)."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    routing: bool = False

    def batch_key(self) -> tuple:
        """Jobs with equal keys may share a batch; a seeded sample shares with nothing."""
        if self.temperature == 0:
            return (self.model, "greedy")
        return (self.model, "sample", self.temperature, self.top_p, self.seed is None or object())


@dataclass
class Token:
    """One generated token: the text it made final (maybe ""), its own text, its routing."""

    text: str
    token: str
    routing: dict[str, float] | None = None


@dataclass
class Finished:
    reason: str
    """``"stop"`` (end of turn or a stop string) or ``"length"`` (the job's ``max_tokens``)."""
    text: str
    """Text held back until the end (a possible stop string's start that was not one)."""
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


Event = Token | Finished | Failed


class Handle:
    """A submitted job's events, delivered to the event loop that submitted it."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """The client went away: the job ends at its next token."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def push(self, event: Event) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is left to read it
            self._cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        """The job's tokens, then one Finished or Failed."""
        while True:
            event = await self._queue.get()
            yield event
            if not isinstance(event, Token):
                return


class _Row:
    """One job's state inside a batch."""

    def __init__(self, handle: Handle, tokenizer, stops: set[int]) -> None:
        self.handle, self.job, self.tokenizer, self.stops = handle, handle.job, tokenizer, stops
        self.ids: list[int] = []
        self.released = 0  # characters of the text already sent
        self.done = False

    def step(self, token: int, routing: dict[str, float] | None) -> None:
        if self.handle.cancelled:
            self._finish("stop", "")
            return
        if token in self.stops:
            self._finish("stop", self._text()[self.released:])
            return
        self.ids.append(token)
        text = self._text()
        cut = min((i for i in (text.find(s) for s in self.job.stop) if i >= 0), default=-1)
        final = text[:cut] if cut >= 0 else text[:len(text) - self._held(text)]
        self.handle.push(Token(final[self.released:], self.tokenizer.decode([token]), routing))
        self.released = max(self.released, len(final))
        if cut >= 0:
            self._finish("stop", "")
        elif len(self.ids) >= self.job.max_tokens:
            self._finish("length", text[self.released:])

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _held(self, text: str) -> int:
        """How many trailing characters may still change: an incomplete character, or the
        longest end of the text that a stop string starts with."""
        if text.endswith("\ufffd"):
            return len(text) - len(text.rstrip("\ufffd"))
        return max((n for s in self.job.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def _finish(self, reason: str, text: str) -> None:
        self.done = True
        self.handle.push(Finished(reason, text, len(self.job.prompt_ids), len(self.ids)))


class _Steps(StoppingCriteria):
    """Reads every step's new tokens (see the module docstring)."""

    def __init__(self, rows: list[_Row], served: ServedModel, record: RoutingRecord | None) -> None:
        self.rows, self.record, self.config = rows, record, adapter_config(served.model)

    def _shares(self) -> list[dict[str, float]] | None:
        if self.record is None:
            return None
        last = torch.stack([forwards[-1][:, -1] for forwards in self.record.gates.values()])  # (layers, rows, E)
        self.record.clear()  # one step at a time: a long batch keeps no history
        return share_rows(last, self.config)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        shares = self._shares()
        for i, (row, token) in enumerate(zip(self.rows, input_ids[:, -1].tolist())):
            if not row.done:
                row.step(token, shares[i] if shares is not None and row.job.routing else None)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


class Engine:
    """One worker thread that serves submitted jobs in dynamic batches."""

    def __init__(self, registry: Registry, *, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.registry, self.max_batch = registry, max_batch
        self._pending: deque[Handle] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="loramoe-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> Handle:
        """Queue ``job``; call from the event loop that reads its events."""
        handle = Handle(job)
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is stopping")
            self._pending.append(handle)
            self._wake.notify()
        return handle

    def stop(self) -> None:
        """Serve every job already submitted, then end the worker."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _take(self) -> list[Handle]:
        """The oldest job and the queued jobs that may share its batch."""
        first = self._pending.popleft()
        key, batch, rest = first.job.batch_key(), [first], deque()
        while self._pending:
            handle = self._pending.popleft()
            (batch if len(batch) < self.max_batch and handle.job.batch_key() == key else rest).append(handle)
        self._pending.extendleft(reversed(rest))
        return batch

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait()
                if not self._pending:
                    return
                batch = self._take()
            try:
                self._generate(batch)
            except Exception as error:  # noqa: BLE001 - one bad batch must not end the server; its clients are told
                for handle in batch:
                    handle.push(Failed(f"generation failed: {type(error).__name__}: {error}"))

    def _generate(self, batch: list[Handle]) -> None:
        served = self.registry.get(batch[0].job.model)
        model, tokenizer = served.model, served.tokenizer
        stops = stop_token_ids(model, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
        rows = [_Row(handle, tokenizer, set(stops)) for handle in batch]
        job = batch[0].job
        config = GenerationConfig(
            max_new_tokens=max(h.job.max_tokens for h in batch), do_sample=job.temperature > 0,
            temperature=job.temperature if job.temperature > 0 else None,
            top_p=job.top_p if job.temperature > 0 else None, num_beams=1, repetition_penalty=1.0,
            eos_token_id=stops or None, pad_token_id=pad_id)
        routed = any(h.job.routing for h in batch) and isinstance(adapter_config(model), LoraMoEConfig)
        ids, mask = left_pad([h.job.prompt_ids for h in batch], pad_id, model.device)
        if job.seed is not None and job.temperature > 0:
            torch.manual_seed(job.seed)
        with torch.no_grad(), (capture_routing(model, per_token=True) if routed else nullcontext()) as record:
            steps = _Steps(rows, served, record)
            model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                           stopping_criteria=StoppingCriteriaList([steps]))
        for row in rows:
            if not row.done:  # generate ended on its own limit (the batch's longest) or every row's EOS
                row._finish("length", row._text()[row.released:])
