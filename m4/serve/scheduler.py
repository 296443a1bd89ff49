"""One model, one worker: every piece of model work runs on one thread, in arrival order.

A job is a function returning an iterator (an answer's text pieces, or nothing for a frame
ingest); the worker runs it to its end, checking between items whether its client is still
there, so a client that leaves frees the worker at the next token. Nothing runs on the event
loop, and each answer is exactly what the same request gets alone: jobs never share a context.

Batching decode steps across requests slots in here: the worker would hold the jobs that are
decoding and step them together (one decoder call over a pool of caches) instead of running
one to its end; jobs already yield one token per step, which is the unit it would batch.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator

from m4.errors import M4Error

END = object()


class Busy(M4Error):
    """The queue is full: the request is refused, not queued without bound."""


class Job:
    def __init__(self, work: Callable[[], Iterator | None], deliver: Callable[[object], None]):
        self.work, self.deliver = work, deliver
        self.cancelled = False
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(self, max_queue: int, on_start: Callable[[float], None] = lambda ms: None):
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.max_queue, self.on_start = max_queue, on_start  # on_start: ms a job waited
        self.thread = threading.Thread(target=self._run, name="m4-model", daemon=True)
        self.thread.start()

    @property
    def depth(self) -> int:
        return self.jobs.qsize()

    def submit(self, work: Callable[[], Iterator | None], deliver: Callable[[object], None]) -> Job:
        """Queue `work`; `deliver` gets each item it yields, then END, or the exception it raised."""
        if self.jobs.qsize() >= self.max_queue:
            raise Busy(f"server busy: {self.max_queue} requests are already waiting for the model; retry later")
        job = Job(work, deliver)
        self.jobs.put(job)
        return job

    def stream(self, work: Callable[[], Iterator | None]) -> AsyncJob:
        """Queue `work` for a coroutine: iterate the returned job's items with `async for`."""
        return AsyncJob(self, work)

    async def call(self, fn: Callable[[], object]):
        """fn() run on the worker, for a coroutine: its result."""
        async for value in self.stream(lambda: iter([fn()])):
            return value

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(5)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled:
                continue
            self.on_start((time.perf_counter() - job.submitted) * 1e3)
            try:
                self._step(job)
            except Exception as e:  # a job's failure is its client's answer; the worker goes on
                try:
                    job.deliver(e)
                except RuntimeError:  # its event loop has closed: the server is stopping
                    pass

    def _step(self, job: Job) -> None:
        items = job.work()
        try:
            for item in items or ():
                if job.cancelled:
                    break
                job.deliver(item)
        finally:
            if hasattr(items, "close"):
                items.close()  # runs the generator's cleanup now (a live context's rollback)
        job.deliver(END)


class AsyncJob:
    """A job whose items reach a coroutine through an asyncio queue."""

    def __init__(self, scheduler: Scheduler, work: Callable[[], Iterator | None]):
        loop = asyncio.get_running_loop()
        self.items: asyncio.Queue = asyncio.Queue()
        self.job = scheduler.submit(work, lambda x: loop.call_soon_threadsafe(self.items.put_nowait, x))

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.items.get()
        if item is END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.job.cancel()
