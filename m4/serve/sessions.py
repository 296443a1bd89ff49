"""Live sessions: each a LiveContext over the one shared model, fed by pushed frames or by a
source read in a thread of its own (a camera, an rtsp/http stream, or the demo scene).

A source is read as `m4 run` reads it (m4.media.Latest: the newest frame kept, a dropped
stream reopened), sampled at the session's fps, and each frame offered to the model: one
that arrives while the session's previous frame still waits for the model, or that reaches
the model while the session is answering a question, is dropped and counted, never queued.
Sessions idle for `ttl` seconds are closed; at most `max_sessions` are open at once, each
holding its own fixed-size cache.

A session's watches (m4.runtime.watch) are asked on the worker after the frames they are
due at enter, one after another, each answer in the scheduler's batch beside the other
sessions' watches and questions; a change goes to the session's event listeners.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

from m4.errors import M4Error
from m4.histogram import Histogram
from m4.media import Frame, Latest, Source, is_live, open_source, sample_rate
from m4.runtime.reuse import Reuse
from m4.runtime.live import enter_frames
from m4.runtime.watch import Asking, Watch
from m4.serve.errors import ApiError
from m4.serve.inputs import check_host
from m4.serve.metrics import Metrics
from m4.serve.scheduler import END, Busy, Decode, Scheduler

SOURCES = "cam<N>, an rtsp:// or http(s):// URL, demo, or null (frames pushed to /frames)"
MAX_WATCHES = 16  # per session: each is a prefill and an answer per frame it is due at
EVENTS_BUFFER = 256  # change events held for a listener that reads slower than they come
KEEPALIVE_S = 15.0  # a listener that left is found out by the next write at the latest


class Events:
    """A session's change events for its listeners (GET .../events), each a bounded queue on
    the event loop: one that falls behind loses its oldest events, one that leaves is
    forgotten, and with none a change costs nothing. Published from the worker's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.listeners: set[asyncio.Queue] = set()

    def listen(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(EVENTS_BUFFER)
        self.listeners.add(q)
        return q

    def leave(self, q: asyncio.Queue) -> None:
        self.listeners.discard(q)

    def publish(self, event: dict | None) -> None:
        """An event to every listener (None: the session closed, the streams end)."""
        if self.listeners:
            self.loop.call_soon_threadsafe(self._put, event)

    def _put(self, event: dict | None) -> None:
        for q in self.listeners:
            if q.full():
                q.get_nowait()
            q.put_nowait(event)


class PacedDemo(Source):
    """The demo scene in real time, looped: a session on `demo` runs until it is closed."""

    is_live = True

    def __init__(self):
        self.scene = open_source("demo").scene

    def frames(self) -> Iterator[Frame]:
        start, index = time.monotonic(), 0
        while True:
            for i in range(self.scene.num_frames):
                t = index / self.scene.fps
                time.sleep(max(0.0, start + t - time.monotonic()))
                yield Frame(self.scene.frame(i), t, index)
                index += 1


class Session:
    def __init__(self, source: str | None, window: int, fps: float, max_fps: float, live):
        self.id = "sess_" + secrets.token_hex(8)
        self.source, self.window, self.fps, self.live = source, window, fps, live
        self.created, self.used = time.time(), time.monotonic()
        self.lock = threading.Lock()
        self.pending = False  # a frame from the source waits for the model
        self.recent: collections.deque = collections.deque(maxlen=max(1, int(max_fps)))  # pushes in the last second
        self.latest = None  # the newest frame in the window (HxWx3 uint8)
        self.seen = self.dropped = 0
        self.error: str | None = None  # why the source stopped
        self.closed = False
        self.reader: Latest | None = None
        self.stages = {s: Histogram() for s in ("vision", "ingest", "ttft")}
        self.watches: dict[str, Watch] = {}  # by id, in the order they were set; changed on the worker only
        self.events = Events(asyncio.get_running_loop())

    def touch(self) -> None:
        self.used = time.monotonic()

    def describe(self, ttl: float) -> dict:
        idle = time.monotonic() - self.used
        stats = dict(self.live.stats)
        return {"id": self.id, "object": "session", "source": self.source, "window": self.window, "fps": self.fps,
                "frames": len(self.live.frames), "frames_seen": self.seen, "frames_dropped": self.dropped,
                "created": int(self.created), "idle_s": round(idle, 1), "expires_in_s": round(max(0.0, ttl - idle), 1),
                "error": self.error, "stats": {k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()},
                "watches": [describe_watch(wid, w) for wid, w in list(self.watches.items())],
                "percentiles": {k: {f"p{p}": round(h.percentile(p), 2) for p in (50, 95)}
                                for k, h in self.stages.items() if h.count}}


def describe_watch(wid: str, w: Watch) -> dict:
    return {"id": wid, "object": "watch", "question": w.question, "every": w.every, "answer": w.answer}


class Sessions:
    def __init__(self, model, scheduler: Scheduler, metrics: Metrics, max_sessions: int, ttl: float,
                 max_fps: float, max_tokens: int, allow_urls: bool, allow_private_urls: bool, reuse: Reuse):
        self.model, self.scheduler, self.metrics = model, scheduler, metrics
        self.reuse = reuse  # the server's caches: sessions' frames go through its encoder cache
        self.max_sessions, self.ttl, self.max_fps, self.max_tokens = max_sessions, ttl, max_fps, max_tokens
        self.allow_urls, self.allow_private_urls = allow_urls, allow_private_urls
        self.open: dict[str, Session] = {}
        self.starting = 0  # sessions being created: they count against the limit already

    async def create(self, source: str | None, window: int, fps: float) -> Session:
        await self.expire()
        if len(self.open) + self.starting >= self.max_sessions:
            raise ApiError(429, f"session limit reached: {self.max_sessions} sessions are open (m4 serve "
                           f"--max-sessions); delete one, or wait for an idle one to expire after {self.ttl:g} s",
                           "too_many_sessions")
        if fps <= 0 or fps > self.max_fps:
            raise ApiError(400, f"fps must be in (0, {self.max_fps:g}] (m4 serve --max-fps)", "invalid_fps", "fps")
        self.starting += 1
        try:
            opened = await asyncio.to_thread(self._open, source) if source is not None else None
            try:
                live = await self.scheduler.call(
                    lambda: self.model.stream(window, max_new_tokens=self.max_tokens, reuse=self.reuse))
            except BaseException:
                if opened is not None:
                    opened.close()
                raise
        finally:
            self.starting -= 1
        s = Session(source, window, fps, self.max_fps, live)
        self.open[s.id] = s
        self.metrics.sessions.set(len(self.open))
        if source is not None and opened is not None:
            s.reader = Latest(source, opened)
            threading.Thread(target=self._read, args=(s, s.reader), name=f"m4-{s.id}", daemon=True).start()
        return s

    def _open(self, spec: str) -> Source:
        """A session's source, opened (blocking: a network stream waits for its first bytes)."""
        if spec == "demo":
            return PacedDemo()
        if not is_live(spec):  # a path: never read for a client
            raise ApiError(400, f"unknown source {spec!r}: a source is {SOURCES}", "invalid_source", "source")
        if "://" in spec:
            if not self.allow_urls:
                raise ApiError(400, "this server does not open stream URLs (m4 serve --allow-urls)",
                               "url_not_allowed", "source")
            check_host(spec, self.allow_private_urls, "source")
        return open_source(spec)

    def get(self, sid: str) -> Session:
        s = self.open.get(sid)
        if s is None:
            raise ApiError(404, f"no session {sid!r} (closed, expired or never opened)", "session_not_found")
        s.touch()
        return s

    async def delete(self, sid: str) -> None:
        s = self.get(sid)
        await self.close(s)

    async def close(self, s: Session) -> None:
        self.open.pop(s.id, None)
        self.metrics.sessions.set(len(self.open))
        s.closed = True
        s.events.publish(None)
        if s.reader is not None:
            await asyncio.to_thread(s.reader.close)

    async def close_all(self) -> None:
        for s in list(self.open.values()):
            await self.close(s)

    async def expire(self) -> None:
        now = time.monotonic()
        for s in [s for s in self.open.values() if now - s.used > self.ttl]:
            await self.close(s)

    # -- frames -------------------------------------------------------------------------------

    def check_rate(self, s: Session) -> None:
        """At most max_fps pushed frames in any second."""
        now = time.monotonic()
        if len(s.recent) == s.recent.maxlen and now - s.recent[0] < 1.0:
            self.metrics.frames.labels("refused").inc()
            raise ApiError(429, f"frame rate over the limit of {self.max_fps:g} per second for one session "
                           "(m4 serve --max-fps)", "frame_rate_exceeded")
        s.recent.append(now)

    # -- watches (on the worker) -------------------------------------------------------------

    def watch(self, s: Session, question: str, constraint: dict[str, Any], every: int, max_tokens: int) -> dict:
        """A watch set on the session (checked and its constraint compiled here)."""
        if len(s.watches) >= MAX_WATCHES:
            raise ApiError(400, f"a session has at most {MAX_WATCHES} watches: delete one first", "too_many_watches")
        try:
            w = s.live.watch(question, every=every, max_new_tokens=max_tokens, **constraint)
        except M4Error as e:
            raise ApiError(400, str(e), "invalid_watch") from None
        wid = "watch_" + secrets.token_hex(6)
        s.watches[wid] = w
        return describe_watch(wid, w)

    def unwatch(self, s: Session, wid: str) -> None:
        w = s.watches.pop(wid, None)
        if w is None:
            raise ApiError(404, f"session {s.id} has no watch {wid!r}", "watch_not_found")
        s.live.unwatch(w)

    def asking(self, s: Session) -> Decode | None:
        """The session's next due watch asked, for the worker's batch: as its answer ends, a
        change goes to the listeners (and is the job's item), and the next due watch starts."""
        due = s.live.due()
        if s.closed or not due:
            return None
        a = Asking(due[0], s.live)

        def end() -> dict | None:
            change = a.end()
            if change is None:
                return None
            wid = next((k for k, w in list(s.watches.items()) if w is change.watch), None)
            event = change.event(s.source, watch=wid)
            s.events.publish(event)
            return event
        return Decode(a.answer, a.take, end, lambda: self.asking(s))

    # -- frames -------------------------------------------------------------------------------

    def ingest(self, s: Session, image) -> bool | Decode:
        """A frame into the session's window (on the model's worker); False if it was dropped:
        the session is answering, and a frame is not held for the answer's end (a source's
        next one comes soon, and a late frame is stale). Where watches are due at it, their
        answers to decode (the job's items are then their changes, or None where unchanged)."""
        if s.closed:
            raise ApiError(404, f"session {s.id} was closed", "session_not_found")
        if s.live.answering:
            s.dropped += 1
            self.metrics.frames.labels("dropped").inc()
            return False
        enter_frames([(s.live, image)])
        s.latest = image
        st = s.live.stats
        s.stages["vision"].add(st["vision_ms"])
        s.stages["ingest"].add(st["ingest_ms"])
        self.metrics.observe(vision=st["vision_ms"], ingest=st["ingest_ms"])
        self.metrics.frames.labels("ingested").inc()
        return self.asking(s) or True

    def _read(self, s: Session, reader: Latest) -> None:
        """A source session's reading: frames at its fps, offered to the model, the late dropped."""
        for f in sample_rate(reader.frames(), s.fps):
            if s.closed:
                break
            self._offer(s, f.image)
        if not s.closed:
            s.error = reader.error or "source ended"

    def _offer(self, s: Session, image) -> None:
        with s.lock:
            s.seen += 1
            if s.pending:
                s.dropped += 1
                self.metrics.frames.labels("dropped").inc()
                return
            s.pending = True

        def done(item) -> None:  # what the ingest gave, then END; or the error that stopped it
            if isinstance(item, Exception):
                s.error = str(item)
            if item is END or isinstance(item, Exception):
                s.pending = False
        try:
            self.scheduler.submit(lambda: self.ingest(s, image), done)
        except Busy:
            s.pending = False
            s.dropped += 1
            self.metrics.frames.labels("dropped").inc()
