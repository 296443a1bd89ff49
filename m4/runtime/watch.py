"""Standing questions ("watches") of a live context: asked after every N-th frame enters,
told only when their answer changes.

A watch is asked as `LiveContext.ask` asks (the question prefilled after the frames, the
answer decoded under its constraint, both rolled back), so its answers are the ones a
per-frame `ask` gives. A live context's watches share its cache and are asked one after
another; the watches of several contexts are asked together, one batched decode step for
all of their answers (`answer_watches`). A robotics loop reads the changes where the frame
enters: `for change in live.add_frame(frame): ...`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from m4.runtime.answer import Answer, Batch
from m4.runtime.sampling import Sampling
from m4.tokenizer import Tokenizer


class Asks(Protocol):
    """What a watch is asked of: a live context (m4.runtime.live.LiveContext)."""

    tokenizer: Tokenizer

    @property
    def answering(self) -> bool: ...

    def due(self) -> list[Watch]: ...

    def start(self, question: str, max_new_tokens: int | None = None, sampling: Sampling = Sampling()) -> Answer: ...


class Watch:
    """A standing question: `question` under `sampling` (its constraint), asked after every
    `every`-th frame that enters from the time it is set; `answer` is its latest answer (None
    before the first)."""

    def __init__(self, question: str, sampling: Sampling, every: int, max_new_tokens: int | None):
        self.question, self.sampling, self.every, self.max_new_tokens = question, sampling, every, max_new_tokens
        self.answer: str | None = None
        self.seen = 0  # frames entered since it was set
        self.due_at: int | None = None  # the frame it is due to be asked after, until it is asked

    def saw(self, frame: int) -> None:
        """Frame number `frame` of its context entered."""
        self.seen += 1
        if self.seen % self.every == 0:
            self.due_at = frame

    def answered(self, text: str, frame: int, ms: float) -> Change | None:
        """Its answer after `frame`: a Change the first time and whenever it differs from the last."""
        if text == self.answer:
            return None
        self.answer = text
        return Change(self, text, frame, ms)


@dataclass(frozen=True)
class Change:
    """A watch's answer changed (or came first) after frame number `frame` of its context
    (counted from 0); `ms`: what asking it took, question prefill to last token."""

    watch: Watch
    answer: str
    frame: int
    ms: float

    @property
    def question(self) -> str:
        return self.watch.question

    def event(self, source: str | None = None, frame: int | None = None, **extra: Any) -> dict[str, Any]:
        """As `m4 run --json` and the server's events write it; `frame`: the frame's number
        where the caller counts otherwise (a source's own index)."""
        return {"event": "change", "source": source, "question": self.question, "answer": self.answer,
                "frame": self.frame if frame is None else frame, "ms": round(self.ms, 2), **extra}


class Asking:
    """A due watch being asked: its Answer (prefilled here) and the tokens it took."""

    def __init__(self, watch: Watch, live: Asks):
        assert watch.due_at is not None  # asked when due
        self.watch, self.frame, self.tokenizer = watch, watch.due_at, live.tokenizer
        watch.due_at = None
        self.started = time.perf_counter()
        self.answer = live.start(watch.question, watch.max_new_tokens, watch.sampling)
        self.tokens: list[int] = []

    def take(self, token: int) -> None:
        self.tokens.append(token)

    def end(self) -> Change | None:
        """Once its answer has ended: the watch's change, if it changed."""
        text = "".join(self.tokenizer.detokenize(self.tokens))
        return self.watch.answered(text, self.frame, (time.perf_counter() - self.started) * 1e3)


def answer_watches(lives: Sequence[Asks]) -> list[Change]:
    """The due watches of several live contexts asked, each context's one after another, all
    contexts' answers in one batched decode step a token; the changes, in the order their
    answers ended."""
    queues = [(live, live.due()) for live in lives]
    batch, asking, changes = Batch(), dict[Answer, Asking](), list[Change]()
    try:
        while True:
            for live, due in queues:
                if due and not live.answering:
                    a = Asking(due.pop(0), live)
                    asking[batch.join(a.answer)] = a
            if not len(batch):
                return changes
            for answer, token in batch.step():
                asking[answer].take(token)
            for answer in [a for a in asking if a.done]:
                if (change := asking.pop(answer).end()) is not None:
                    changes.append(change)
    finally:
        for answer in list(batch.answers):  # an error mid-way: every question rolled back
            batch.leave(answer)
