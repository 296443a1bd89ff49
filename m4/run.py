"""`m4 run`: feed images or video to a model, ask the questions, stream or emit JSON events.

Video has two modes. A file (or the demo scene) asked about once, at its end, is sampled
uniformly to `window` frames over its whole length, the way LLaVA reads a clip. Streaming
(a camera or URL, or any source with `--every`) runs frames at `--fps` through a live
context with a sliding window, asking every `--every` seconds of source time and at the end.
A live source is read in its own thread that keeps only the newest frame: frames that
arrive while the model is busy are dropped and counted, never queued.

Several sources (`--video cam0 cam1 demo`) run through one model, each with its own live
context. Each round takes the newest frame of every source that has one and is not
answering, encoding them in one vision call; starts the questions then due; and runs one
decode step for every answer under way, batched (each answer is the one its source gets
alone). So a source's frames keep entering while others answer. Every event and answer
carries the source's label; with several sources a text answer is printed whole when it
ends.

Watches (`--watch`) are asked after every `--watch-every`-th frame of each source enters
(m4.runtime.watch): the round's due watches of all sources answer together, and a change
is told as a `change` event (or a line) the first time and whenever an answer differs.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from m4.errors import M4Error
from m4.histogram import Histogram
from m4.media import Frame, RateSampler, is_live, open_source, sample_rate, sample_uniform
from m4.media.latest import Latest, say
from m4.runtime.answer import Answer, Batch, guide_for
from m4.runtime.live import add_frames
from m4.runtime.sampling import Sampling
from m4.runtime.watch import Change


def read_schema(path: Path | None) -> dict | None:
    """--json-schema's file: a JSON schema (checked when it is compiled)."""
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise M4Error(f"cannot read the JSON schema {path}: {e.strerror}") from None
    except ValueError as e:
        raise M4Error(f"the JSON schema {path} is not JSON: {e}") from None


def split_choices(choices: str | None) -> list[str] | None:
    """--choices a,b,c -> [a, b, c] (each stripped; an empty one is refused where it is compiled)."""
    return None if choices is None else [c.strip() for c in choices.split(",")]


def check_constraint(model, sampling: Sampling) -> None:
    """The run's constraint compiled against the model's vocabulary before anything runs, so
    one the grammar engine cannot build stops the run at once."""
    guide_for(sampling, model.tokenizer, model.backend, model.stop_ids)


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


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


def source_labels(specs: list[str]) -> list[str]:
    """Each spec as given; a spec given again is labelled `spec#2`, `spec#3`, … after it."""
    labels: list[str] = []
    for spec in specs:
        label, n = spec, 1
        while label in labels:
            n += 1
            label = f"{spec}#{n}"
        labels.append(label)
    return labels


@dataclass
class SourceOutput:
    """Where one source's output goes: its JSON events carry its label, and its text answers
    and messages start with it when the run has several sources."""

    as_json: bool
    source: str | None = None
    prefix: str = ""

    def emit(self, event: str, **fields) -> None:
        emit(event, **({"source": self.source} if self.source else {}), **fields)

    def say(self, message: str) -> None:
        say(self.prefix + message)


def answer(pieces: Iterable[str], question: str, stats: dict, out: SourceOutput, log: StreamLog | None = None) -> None:
    """An answer's text pieces streamed, or one event with its `stats` once it has ended."""
    if out.as_json:
        text = "".join(pieces)
        out.emit("answer", question=question, text=text, ttft_ms=round(stats.get("ttft_ms", 0.0), 1),
                 decode_tok_s=round(stats.get("decode_tok_s", 0.0), 1), new_tokens=stats.get("new_tokens", 0))
    else:
        sys.stdout.write(out.prefix)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if log is not None:
        log.answered(stats)


def run_still(model, prompts: list[str], inputs: dict, out: SourceOutput, generation: dict) -> None:
    for q in questions(prompts):
        answer(model.ask(q, stream=True, **inputs, **generation), q, model.stats, out)


def run_clip(model, spec: str, prompts: list[str], window: int, out: SourceOutput, generation: dict) -> None:
    frames = sample_uniform(spec, window)
    if out.as_json:
        for f in frames:
            out.emit("frame", index=f.index, t=round(f.t, 3))
    run_still(model, prompts, {"video": [f.image for f in frames]}, out, generation)


def check_sources(specs: list[str]) -> None:
    """Open and close each file (and demo) source, so that a bad one stops the run before the
    model loads; live sources are opened when they are read."""
    for spec in specs:
        if not is_live(spec):
            open_source(spec).close()


def run_clips(model, specs: list[str], prompts: list[str], window: int, as_json: bool, generation: dict) -> None:
    """Each source asked about at its end, in turn."""
    for spec, out in zip(specs, outs(specs, as_json)):
        run_clip(model, spec, prompts, window, out, generation)


def outs(specs: list[str], as_json: bool) -> list[SourceOutput]:
    several = len(specs) > 1
    return [SourceOutput(as_json, label, f"[{label}] " if several else "") for label in source_labels(specs)]


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

    def answered(self, stats: dict) -> None:
        self.add(**{k: stats[k] for k in ("ttft_ms", "decode_tok_s") if k in stats})

    def add(self, **values) -> None:
        for k, v in values.items():
            self.stages.setdefault(k, Histogram()).add(v)

    def summary(self, received: int, dropped: int) -> dict:
        return {"frames_seen": received, "frames_used": self.frames, "frames_dropped": dropped,
                "frames_skipped": self.taken - self.frames,
                **{f"{k}_p{p}": round(h.percentile(p), 2) for k, h in self.stages.items() for p in (50, 95)}}


@dataclass
class StreamConfig:
    prompts: list[str]
    window: int = 8
    fps: float = 2.0
    every: float | None = None  # seconds of source time between questions
    max_frames: int | None = None  # per source
    duration: float | None = None  # per source, seconds of its time
    exact: bool = True
    as_json: bool = False
    generation: dict = field(default_factory=dict)
    stats: bool = False
    watches: list[str] = field(default_factory=list)  # standing questions
    watch_every: int = 1  # frames


class Stage(Enum):
    """Where a source of a streaming run is: frames are taken while it is READING, its source is
    open while it is READING or ENDED, and why it stopped is told once, when it FINISHES."""

    READING = "reading"
    ENDED = "ended"  # its frames ran out or its stream failed: the reader's error is told
    LIMITED = "limited"  # it reached --max-frames or --duration, and was closed there: nothing to tell
    STOPPED = "stopped"  # closed before its end: the run was interrupted, or failed
    FINISHED = "finished"  # its end told, closed


# the stages each stage moves on to; a move to another is no move (closing what is closed)
MOVES = {
    Stage.READING: {Stage.ENDED, Stage.LIMITED, Stage.STOPPED},
    Stage.ENDED: {Stage.STOPPED, Stage.FINISHED},
    Stage.LIMITED: {Stage.FINISHED},
    Stage.STOPPED: {Stage.FINISHED},
    Stage.FINISHED: set(),
}
OPEN = {Stage.READING, Stage.ENDED}


class Feed:
    """One source of a streaming run: its reader, sampler, live context, log, clock and stage."""

    def __init__(self, model, spec: str, opened, out: SourceOutput, c: StreamConfig, wake: threading.Event):
        generation = dict(c.generation)
        self.live = model.stream(window=c.window, exact=c.exact, max_new_tokens=generation.pop("max_new_tokens"))
        self.generation = generation  # sampling
        self.watches = [self.live.watch(q, every=c.watch_every, **generation) for q in c.watches]
        self.questions: list[str] = []  # due, not yet asked
        self.asking: Asking | None = None  # the question being answered
        self.opened, self.out, self.c = opened, out, c
        self.log, self.last_ask, self.t = StreamLog(), 0.0, 0.0
        self.stage = Stage.READING
        self.reader = Latest(spec, opened, out.source, wake) if opened.is_live else None
        self.rate = RateSampler(c.fps)
        self.pulled = None if self.reader else sample_rate(self.log.count(opened.frames()), c.fps)

    @property
    def ended(self) -> bool:
        """No frame is taken from it any more."""
        return self.stage is not Stage.READING

    @property
    def finished(self) -> bool:
        return self.stage is Stage.FINISHED

    def move(self, to: Stage) -> None:
        """The one place the stage changes: to a stage MOVES allows (else nothing), closing the
        source where the feed leaves OPEN."""
        if to not in MOVES[self.stage]:
            return
        if self.stage in OPEN and to not in OPEN:
            (self.reader or self.opened).close()
        self.stage = to

    def next(self) -> Frame | None:
        """The next frame to take, or None when there is none yet; at the end, ENDED."""
        if self.reader is None:  # a file or the demo: read on demand, nothing is dropped
            assert self.pulled is not None  # made where there is no reader
            f = next(self.pulled, None)
            if f is None:
                self.move(Stage.ENDED)
            return f
        done = self.reader.done  # before taking: a frame may come between the two
        f = self.reader.take()
        if f is None:
            if done:
                self.move(Stage.ENDED)
            return None
        self.log.taken += 1
        return f if self.rate.keep(f.t) else None

    def frame_entered(self, f: Frame) -> list[str]:
        """Log a frame that entered the context; the questions then due; stop at the run's limits."""
        c, stats = self.c, self.live.stats
        self.log.frames += 1
        self.log.add(vision_ms=stats["vision_ms"], ingest_ms=stats["ingest_ms"])
        self.t = f.t
        if c.as_json:
            self.out.emit("frame", index=f.index, t=round(f.t, 3), ingest_ms=round(stats["ingest_ms"], 2))
        due = []
        if c.every and self.t - self.last_ask >= c.every:
            self.last_ask = self.t
            due = list(c.prompts)
        if (c.max_frames and self.log.frames >= c.max_frames) or (c.duration and self.t >= c.duration):
            self.move(Stage.LIMITED)
        return due

    def changed(self, change: Change, f: Frame) -> None:
        """A watch's answer changed after frame `f` entered."""
        if self.c.as_json:
            print(json.dumps(change.event(self.out.source, f.index)), flush=True)
        else:
            print(f"{self.out.prefix}frame {f.index}: {change.question} {change.answer}", flush=True)

    def close(self) -> None:
        """Stop reading now: STOPPED, unless it stopped already."""
        self.move(Stage.STOPPED)

    def finish(self) -> list[str]:
        """Say why a stream stopped and close it; the questions about its end (unless just asked)."""
        if self.finished:
            return []
        if self.stage in (Stage.ENDED, Stage.STOPPED) and self.reader and self.reader.error:
            say(f"{self.out.source}: {self.reader.error}; stopping")
        self.move(Stage.FINISHED)
        return list(self.c.prompts) if self.log.frames and (not self.c.every or self.t > self.last_ask) else []

    def report(self) -> None:
        r = self.reader
        summary = self.log.summary(r.received if r else self.log.taken, r.dropped if r else 0)
        if self.c.as_json:
            self.out.emit("stats", **summary)
        else:
            self.out.say("stats " + " ".join(f"{k}={v}" for k, v in summary.items()))


def open_feeds(model, specs: list[str], c: StreamConfig, wake: threading.Event) -> list[Feed]:
    """Every source is opened before any is read, so a bad one stops the run before it starts."""
    opened: list = []
    try:
        for spec in specs:
            opened.append(open_source(spec))
        return [Feed(model, spec, src, out, c, wake) for spec, src, out in zip(specs, opened, outs(specs, c.as_json))]
    except BaseException:
        for src in opened:
            src.close()
        raise


@dataclass
class Asking:
    """A source's question being answered in the round's batch: its text so far."""

    question: str
    answer: Answer
    piece: Callable[[int], str]
    text: list[str] = field(default_factory=list)


class StreamLoop:
    """The streaming run over its sources: frames in, questions asked, one batched decode
    step a round for every answer under way. A live source's frames that come meanwhile
    are dropped by its reader, never queued."""

    def __init__(self, feeds: list[Feed], typed: queue.Queue | None, wake: threading.Event):
        self.feeds, self.typed, self.wake = feeds, typed, wake
        self.batch = Batch()
        self.streaming = len(feeds) == 1 and not feeds[0].c.as_json  # one source's text streams as it comes

    def run(self) -> None:
        while any(not f.finished or f.questions or f.asking for f in self.feeds):
            self.wake.clear()  # before looking: a frame that comes after it wakes the wait below
            taken = self.take_frames()
            for feed in self.feeds:
                if feed.ended and not feed.finished:
                    feed.questions += feed.finish()
                if feed.questions and not feed.asking:
                    self.ask(feed, feed.questions.pop(0))
            if len(self.batch):
                self.step()
            elif not taken and any(not f.ended for f in self.feeds):
                self.wake.wait(0.5)

    def take_frames(self) -> bool:
        """The newest frame of every source that has one and has no question open (the
        questions due at one frame are all asked about the same window), encoded together;
        the questions then due (and any typed meanwhile) queued."""
        taken = [(feed, f) for feed in self.feeds if not (feed.ended or feed.asking or feed.questions)
                 and (f := feed.next()) is not None]
        changes = add_frames([(feed.live, f.image) for feed, f in taken])
        for feed, f in taken:
            feed.questions += feed.frame_entered(f)
        for change in changes:
            feed, f = next((feed, f) for feed, f in taken if change.watch in feed.watches)
            feed.changed(change, f)
        while taken and self.typed is not None and not self.typed.empty():  # asked of every source with frames
            q = self.typed.get()
            for feed in self.feeds:
                if feed.log.frames and not feed.ended:
                    feed.questions.append(q)
        return bool(taken)

    def ask(self, feed: Feed, question: str) -> None:
        answer = self.batch.join(feed.live.start(question, **feed.generation))
        feed.asking = Asking(question, answer, feed.live.tokenizer.pieces())
        if self.streaming:
            sys.stdout.write(feed.out.prefix)

    def step(self) -> None:
        by_answer = {id(f.asking.answer): (f, f.asking) for f in self.feeds if f.asking}
        for answer, token in self.batch.step():
            asking = by_answer[id(answer)][1]
            piece = asking.piece(token)
            asking.text.append(piece)
            if self.streaming and piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
        for feed, asking in by_answer.values():
            if asking.answer not in self.batch:  # it ended
                self.answered(feed)

    def answered(self, feed: Feed) -> None:
        asking, feed.asking = feed.asking, None
        assert asking is not None  # called for a feed whose answer ended
        if self.streaming:
            sys.stdout.write("\n")
            feed.log.answered(asking.answer.stats)
        else:
            answer(["".join(asking.text)], asking.question, asking.answer.stats, feed.out, feed.log)

    def interrupt(self) -> None:
        """Ctrl-C: answers under way dropped (their questions rolled back), every source
        ended; `run` then asks about each source's end."""
        for feed in self.feeds:
            if feed.asking:
                self.batch.leave(feed.asking.answer)
                feed.asking = None
            feed.questions.clear()
            feed.close()


def run_stream(model, specs: list[str], c: StreamConfig) -> None:
    wake = threading.Event()
    feeds = open_feeds(model, specs, c, wake)
    loop = StreamLoop(feeds, typed_questions() if not c.prompts and sys.stdin.isatty() else None, wake)
    try:
        loop.run()
    except KeyboardInterrupt:
        say("interrupted")
        loop.interrupt()
        loop.run()  # the end of each stream is asked about too
    finally:
        for feed in feeds:
            feed.close()
    if c.stats:
        for feed in feeds:
            feed.report()
