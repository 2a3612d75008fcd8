"""One model, one generation at a time: a FIFO of jobs run by a worker thread, each job's events
handed to the event loop that waits for them. The context persists between jobs, so a prompt that
extends the previous one (the next turn of a chat) prefills only its new tokens."""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..generate import StepEvent, generate_ids

__all__ = ["Busy", "Engine", "Job"]


class Busy(Exception):
    """The queue is full."""


@dataclass
class Job:
    prompt: list[int]
    max_new_tokens: int
    sampler: dict[str, Any]
    eos_ids: list[int]
    # Called on the worker thread after every denoising step; returns False to stop the generation.
    on_step: Callable[[StepEvent], bool]
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: asyncio.Future | None = None  # the Generation, or the exception
    reused_tokens: int = 0


class Engine:
    """Runs jobs in order on one context of `n_ctx` tokens."""

    def __init__(self, model, *, n_ctx: int, max_queue: int, sc_top_k: int = 0, kv_type: str = "f16") -> None:
        self.model = model
        self.n_ctx = n_ctx
        self.max_queue = max_queue
        self.ctx = model.context(n_ctx=n_ctx, sc_top_k=sc_top_k, kv_type=kv_type)
        self._cached: list[int] = []  # the tokens whose K/V the context holds
        self._jobs: deque[tuple[Job, asyncio.AbstractEventLoop]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running: Job | None = None
        self._closed = False
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}  # generations, for /health
        self._thread = threading.Thread(target=self._work, name="pydgemma-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._jobs)

    def submit(self, job: Job) -> asyncio.Future:
        """Queues `job`; the future resolves on the calling loop. Raises Busy when `max_queue` jobs wait."""
        loop = asyncio.get_running_loop()
        job.done = loop.create_future()
        with self._lock:
            if len(self._jobs) >= self.max_queue:
                raise Busy()
            self._jobs.append((job, loop))
            self._wake.notify()
        return job.done

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for job, _ in self._jobs:
                job.cancelled.set()
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self._wake.wait()
                if self._closed:
                    pending = list(self._jobs)
                    self._jobs.clear()
                    break
                job, loop = self._jobs.popleft()
            result: Any
            try:
                result = self._run(job) if not job.cancelled.is_set() else None
                cancelled = result is None or result.cancelled and job.cancelled.is_set()
                self.counts["cancelled" if cancelled else "completed"] += 1
            except BaseException as exc:  # handed to the request; the worker goes on
                result = exc
                self.counts["failed"] += 1
            loop.call_soon_threadsafe(_resolve, job.done, result)
        for job, loop in pending:
            loop.call_soon_threadsafe(_resolve, job.done, RuntimeError("the server is shutting down"))

    def _run(self, job: Job):
        prompt = job.prompt
        shared = 0
        for a, b in zip(self._cached, prompt):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(prompt) - 1, self.ctx.n_past)  # always prefill at least one token
        self.ctx.truncate(shared)
        shared = self.ctx.n_past  # a sliding layers' ring may keep fewer
        self._cached = self._cached[:shared]
        job.reused_tokens = shared

        def hook(event: StepEvent) -> bool:
            if job.cancelled.is_set():
                return False
            return job.on_step(event) is not False

        try:
            gen = generate_ids(self.ctx, prompt[shared:], max_new_tokens=job.max_new_tokens, sampler=job.sampler,
                               eos_ids=job.eos_ids, on_step=hook)
        except BaseException:
            self.ctx.reset()  # what the cache holds is unknown now
            self._cached = []
            raise
        self._cached = prompt + gen.committed
        self._cached = self._cached[: self.ctx.n_past]
        return gen


def _resolve(future: asyncio.Future, result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
