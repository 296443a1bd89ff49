"""One model, one worker: every piece of model work runs on one thread.

The answers being decoded (requests and session questions) are held in one Batch
(m4.runtime.answer) and advance together, one batched decode step over all of them per
iteration. Between two steps the worker runs one other job, in arrival order: a frame
ingest, a session's cache, or a new answer's encode and prefill, after which that answer
joins the batch. So a new request starts within a step instead of after the answers ahead
of it end, and concurrent answers share each step's weight reads. A batched step gives each
answer the tokens it gets alone, so every answer is exactly what the same request gets
alone. A client that leaves frees its row at the next step (a live context's question
rolled back); a job's failure goes to its client only. A job may decode several answers
one after another (a session's watches after a frame): each next one joins the batch as
the one before ends. Nothing runs on the event loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from m4.errors import M4Error
from m4.runtime.answer import Answer, Batch

END = object()
CLOSE = object()  # queued by close(): the worker stops there


class Busy(M4Error):
    """The queue is full: the request is refused, not queued without bound."""


@dataclass
class Decode:
    """What a job returns to have an answer decoded in the worker's batch: `token(id)` is the
    item its client gets for each token (None: nothing yet), `end()` the last one; `then()`,
    called as it ends, the job's next answer to decode (None: the job is done)."""

    answer: Answer
    token: Callable[[int], object]
    end: Callable[[], object]
    then: Callable[[], Decode | None] = lambda: None


def at_once() -> bool:
    return True


@dataclass
class Job:
    """A unit of the worker's work, as Scheduler.submit queues it."""

    work: Callable[[], object]
    deliver: Callable[[object], object]
    ready: Callable[[], bool] = at_once
    cancelled: bool = False  # its client left: it does not start, or its answer leaves the batch
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(self, max_queue: int, on_start: Callable[[float], None] = lambda ms: None,
                 on_step: Callable[[int], None] = lambda rows: None):
        self.jobs: queue.Queue = queue.Queue()
        self.held: list[Job] = []  # arrived but not ready (their context is answering): they start when ready
        self.batch = Batch()
        self.decoding: dict[Answer, tuple[Job, Decode]] = {}  # each answer in the batch: its job, its Decode
        # on_start: ms a job waited; on_step: answers one decode step carried
        self.max_queue, self.on_start, self.on_step = max_queue, on_start, on_step
        self.thread = threading.Thread(target=self._run, name="m4-model", daemon=True)
        self.thread.start()

    @property
    def depth(self) -> int:
        return self.jobs.qsize() + len(self.held)

    def submit(self, work: Callable[[], object], deliver: Callable[[object], object],
               ready: Callable[[], bool] | None = None) -> Job:
        """Queue `work`; `deliver` gets what it returns (or, where that is a Decode, the items
        of its answer), then END; or the exception it raised. A job starts once `ready()`
        (checked on the worker); jobs behind it that are ready go first meanwhile."""
        if self.depth >= self.max_queue:
            raise Busy(f"server busy: {self.max_queue} requests are already waiting for the model; retry later")
        job = Job(work, deliver, ready or at_once)
        self.jobs.put(job)
        return job

    def stream(self, work: Callable[[], object], ready: Callable[[], bool] | None = None) -> AsyncJob:
        """Queue `work` for a coroutine: iterate the returned job's items with `async for`."""
        return AsyncJob(self, work, ready)

    async def call(self, fn: Callable[[], object]):
        """fn() run on the worker, for a coroutine: its result."""
        async for value in self.stream(fn):
            return value

    def close(self) -> None:
        self.jobs.put(CLOSE)
        self.thread.join(5)

    def _run(self) -> None:
        while (job := self._next()) is not CLOSE:
            if job is not None and not job.cancelled:
                self._start(job)
            if self.decoding:
                self._step()

    def _next(self):
        """The first job that may start: a held one, else the next to arrive (waited for only
        while nothing decodes); None if there is none yet."""
        for job in self.held:
            if job.cancelled or job.ready():
                self.held.remove(job)
                return job
        while True:
            try:
                job = self.jobs.get(block=not self.decoding)
            except queue.Empty:
                return None
            if job is CLOSE or job.cancelled or job.ready():
                return job
            self.held.append(job)

    def _start(self, job: Job) -> None:
        self.on_start((time.perf_counter() - job.submitted) * 1e3)
        try:
            out = job.work()
            if isinstance(out, Decode):
                self.decoding[self.batch.join(out.answer)] = job, out
            else:
                job.deliver(out)
                job.deliver(END)
        except Exception as e:  # a job's failure is its client's answer; the worker goes on
            fail(job, e)

    def _step(self) -> None:
        """Rows whose client left leave; then one decode step for all, each token to its job."""
        for answer, (job, _) in list(self.decoding.items()):
            if job.cancelled:
                self._drop(answer)
        if rows := sum(a.needs_step for a in self.batch.answers):  # those that just joined need no decoding
            self.on_step(rows)
        try:
            tokens = dict(self.batch.step())
        except Exception as e:  # one step for all rows: its failure is each of theirs
            for answer, (job, _) in list(self.decoding.items()):
                self._drop(answer)
                fail(job, e)
            return
        for answer, (job, decode) in list(self.decoding.items()):
            try:
                if answer in tokens and (item := decode.token(tokens[answer])) is not None:
                    job.deliver(item)
                if answer.done:  # it has left the batch
                    del self.decoding[answer]
                    job.deliver(decode.end())
                    if (after := decode.then()) is None:
                        job.deliver(END)
                    else:
                        self.decoding[self.batch.join(after.answer)] = job, after
            except Exception as e:
                self._drop(answer)
                fail(job, e)

    def _drop(self, answer: Answer) -> None:
        """An answer out of the batch before its end (closed: a live question rolled back)."""
        self.decoding.pop(answer, None)
        if answer in self.batch:
            self.batch.leave(answer)


def fail(job: Job, e: Exception) -> None:
    try:
        job.deliver(e)
    except RuntimeError:  # its event loop has closed: the server is stopping
        pass


class AsyncJob:
    """A job whose items reach a coroutine through an asyncio queue."""

    def __init__(self, scheduler: Scheduler, work: Callable[[], object], ready: Callable[[], bool] | None):
        self.loop = asyncio.get_running_loop()
        self.items: asyncio.Queue[object] = asyncio.Queue()
        self.job = scheduler.submit(work, self.put, ready)

    def put(self, item: object) -> None:
        """An item from the worker's thread, into the queue on the event loop's."""
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    def __aiter__(self) -> AsyncJob:
        return self

    async def __anext__(self) -> object:
        item = await self.items.get()
        if item is END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.job.cancel()
