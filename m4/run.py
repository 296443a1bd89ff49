"""`m4 run`: feed images or video to a model, ask the questions, stream or emit JSON events.

Video has two modes. A file (or the demo scene) asked about once, at its end, is sampled
uniformly to `window` frames over its whole length, the way LLaVA reads a clip. Streaming
(a camera or URL, or any source with `--every`) runs frames at `--fps` through a live
context with a sliding window, asking every `--every` seconds of source time and at the end.
A live source is read in its own thread that keeps only the newest frame: frames that
arrive while the model is busy are dropped and counted, never queued.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from m4.errors import M4Error
from m4.histogram import Histogram
from m4.media import Frame, open_source, sample_rate, sample_uniform

RECONNECT_TRIES = 3  # reopens in a row before a dropped stream ends the run
RECONNECT_WAIT_S = 1.0
STABLE_S = 60.0  # a source that ran this long since it was opened has its tries back
CLOSE_WAIT_S = 2.0  # how long closing waits for the reader to finish its current frame


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def say(message: str) -> None:
    print(f"m4: {message}", file=sys.stderr, flush=True)


def questions(prompts: list[str]) -> Iterator[str]:
    """The --prompt questions; without any, lines typed on the terminal or piped in."""
    if prompts:
        yield from prompts
        return
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def answer(ask, question: str, stats: dict, as_json: bool, log: StreamLog | None = None) -> None:
    """Ask one question with `ask(question) -> text pieces`; stream it or emit one event."""
    pieces = ask(question)
    if as_json:
        text = "".join(pieces)
        emit("answer", question=question, text=text, ttft_ms=round(stats.get("ttft_ms", 0.0), 1),
             decode_tok_s=round(stats.get("decode_tok_s", 0.0), 1), new_tokens=stats.get("new_tokens", 0))
    else:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if log is not None:
        log.add(**{k: stats[k] for k in ("ttft_ms", "decode_tok_s") if k in stats})


def run_still(model, prompts: list[str], inputs: dict, as_json: bool, generation: dict) -> None:
    for q in questions(prompts):
        answer(lambda q: model.ask(q, stream=True, **inputs, **generation), q, model.stats, as_json)


def run_clip(model, spec: str, prompts: list[str], window: int, as_json: bool, generation: dict) -> None:
    frames = sample_uniform(spec, window)
    if as_json:
        for f in frames:
            emit("frame", index=f.index, t=round(f.t, 3))
    run_still(model, prompts, {"video": [f.image for f in frames]}, as_json, generation)


class Latest:
    """Reads a live source in a thread, keeping only the newest frame. A source that drops
    is reopened up to RECONNECT_TRIES times, then the stream ends."""

    def __init__(self, spec: str, source):
        self.spec, self.frame, self.done = spec, None, False
        self.received = self.dropped = 0
        self.start = time.monotonic()
        self.error: str | None = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(source,), daemon=True)
        self.thread.start()

    def _read(self, source) -> None:
        tries = 0
        while source is not None and not self.done:
            opened = time.monotonic()
            self._pump(source)
            tries = 1 if time.monotonic() - opened > STABLE_S else tries + 1
            source = self._reopen(tries)
        with self.cond:
            self.done = True
            self.cond.notify()

    def _pump(self, source) -> None:
        """Read until the source ends or fails, keeping only the newest frame."""
        try:
            for f in source.frames():
                # stamped by arrival: a reopened stream restarts its own clock
                f = Frame(f.image, time.monotonic() - self.start, self.received)
                with self.cond:
                    if self.frame is not None:
                        self.dropped += 1
                    self.frame, self.received = f, self.received + 1
                    self.cond.notify()
                if self.done:
                    return
            self.error = "stream ended"
        except M4Error as e:
            self.error = str(e)
        finally:
            source.close()

    def _reopen(self, tries: int):
        while not self.done and tries <= RECONNECT_TRIES:
            say(f"{self.spec}: {self.error}; reopening ({tries}/{RECONNECT_TRIES})")
            time.sleep(RECONNECT_WAIT_S)
            try:
                return open_source(self.spec)
            except M4Error as e:
                self.error = str(e)
                tries += 1
        return None

    def frames(self) -> Iterator[Frame]:
        while True:
            with self.cond:
                while self.frame is None and not self.done:
                    self.cond.wait()
                if self.frame is None:
                    return
                f, self.frame = self.frame, None
            yield f

    def close(self) -> None:
        # The reader closes its source itself once it sees `done`: PyAV crashes (a segfault) when
        # a container is closed under a decode running in another thread. A read stalled on the
        # network outlasts the wait; the thread is a daemon and the process exits without it.
        self.done = True
        self.thread.join(CLOSE_WAIT_S)


def typed_questions() -> queue.Queue:
    """Questions typed on the terminal while the video runs, read by a thread."""
    q: queue.Queue = queue.Queue()

    def read():
        for line in sys.stdin:
            if line.strip():
                q.put(line.strip())

    threading.Thread(target=read, daemon=True).start()
    return q


@dataclass
class StreamLog:
    taken: int = 0  # frames that reached the sampler
    frames: int = 0  # frames that entered the context
    stages: dict = field(default_factory=dict)  # stage -> Histogram of ms (or tok/s): flat memory on any stream

    def count(self, frames: Iterable[Frame]) -> Iterator[Frame]:
        for f in frames:
            self.taken += 1
            yield f

    def add(self, **values) -> None:
        for k, v in values.items():
            self.stages.setdefault(k, Histogram()).add(v)

    def summary(self, received: int, dropped: int) -> dict:
        return {"frames_seen": received, "frames_used": self.frames, "frames_dropped": dropped,
                "frames_skipped": self.taken - self.frames,
                **{f"{k}_p{p}": round(h.percentile(p), 2) for k, h in self.stages.items() for p in (50, 95)}}


def run_stream(model, spec: str, prompts: list[str], window: int, fps: float, every: float | None,
               max_frames: int | None, duration: float | None, exact: bool, as_json: bool,
               generation: dict, show_stats: bool) -> None:
    live = model.stream(window=window, exact=exact, max_new_tokens=generation.pop("max_new_tokens"))
    opened = open_source(spec)
    source = Latest(spec, opened) if opened.is_live else None
    log, last_ask, t = StreamLog(), 0.0, 0.0
    frames = sample_rate(log.count(source.frames() if source else opened.frames()), fps)
    typed = typed_questions() if not prompts and sys.stdin.isatty() else None
    ask = lambda q: live.ask(q, stream=True, **generation)  # noqa: E731
    try:
        for f in frames:
            live.add_frame(f.image)
            log.frames += 1
            log.add(vision_ms=live.stats["vision_ms"], ingest_ms=live.stats["ingest_ms"])
            t = f.t
            if as_json:
                emit("frame", index=f.index, t=round(f.t, 3), ingest_ms=round(live.stats["ingest_ms"], 2))
            if every and t - last_ask >= every:
                last_ask = t
                for q in prompts:
                    answer(ask, q, live.stats, as_json, log)
            while typed is not None and not typed.empty():
                answer(ask, typed.get(), live.stats, as_json, log)
            if (max_frames and log.frames >= max_frames) or (duration and t >= duration):
                break
        else:
            if source and source.error:
                say(f"{spec}: {source.error}; stopping")
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        (source or opened).close()
    if log.frames and (not every or t > last_ask):  # the end of the stream is asked about too
        for q in prompts:
            answer(ask, q, live.stats, as_json, log)
    if show_stats:
        summary = log.summary(source.received if source else log.taken, source.dropped if source else 0)
        if as_json:
            emit("stats", **summary)
        else:
            say("stats " + " ".join(f"{k}={v}" for k, v in summary.items()))

