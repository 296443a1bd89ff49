"""Answers being decoded: alone, or several contexts' answers together.

A decode step at batch 1 reads every weight once and does almost no arithmetic with them;
a step that carries the next token of N contexts reads them once for all N. `Batch` holds
the answers of any contexts on one or more backends and steps them together; contexts join
(after their question's prefill) and leave (when they end, or their client goes) between
steps. Each answer's tokens are the ones it gets alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from m4.runtime.context import Context
from m4.runtime.sampling import Sampling, sample

# what an answer writes into its stats; a stats dict shared by answers (a live context's)
# drops them when the next answer starts, so each answer reports only its own: one of a
# single token has no decode_tok_s (no decode step ran), one that stops at once no ttft_ms
ANSWER_STATS = ("ttft_ms", "decode_tok_s", "new_tokens")

class Answer:
    """A context's answer being decoded: the token it chose last and what is left of it.
    Decoded alone (`alone`) or with other contexts' answers, one batched step for all
    (`Batch` below): the tokens are the same either way. The answer is kept in the
    cache as a segment; `close` rolls the context back to `mark` where one was given (a
    question and its answer leave no trace)."""

    def __init__(self, ctx: Context, first: np.ndarray | int, max_new_tokens: int, stop_ids: set[int],
                 sampling: Sampling = Sampling(), stats: dict | None = None, started: float | None = None,
                 mark: int | None = None):
        self.ctx, self.left, self.stop_ids, self.sampling, self.mark = ctx, max_new_tokens, stop_ids, sampling, mark
        self.stats = {} if stats is None else stats  # ttft_ms (from `started`), decode_tok_s, new_tokens
        for k in ANSWER_STATS:
            self.stats.pop(k, None)
        self.started = time.perf_counter() if started is None else started
        self.rng = np.random.default_rng(sampling.seed)
        self.count, self.last, self.first_at = 0, None, 0.0
        self.pending: int | None = None  # chosen, not yet given out
        self.done = False
        self.take(first)

    def take(self, out: np.ndarray | int) -> None:
        """The next token from a step's logits (or greedy id); a stop token ends the answer."""
        token = out if isinstance(out, (int, np.integer)) else sample(out, self.sampling, self.rng)
        if self.left <= 0 or token in self.stop_ids:
            self.finish()
            return
        if self.count == 0:
            self.first_at = time.perf_counter()
            self.stats["ttft_ms"] = (self.first_at - self.started) * 1e3
        self.count += 1
        self.left -= 1
        self.pending = int(token)

    def give(self) -> int | None:
        """The token chosen last, once; the answer ends with it when no more may follow (the
        last token needs no forward pass)."""
        token, self.pending = self.pending, None
        if token is not None:
            self.last = token
            if self.left == 0:
                self.finish()
        return token

    @property
    def stepping(self) -> bool:
        """Whether its next token needs a decode step (its last one was given out)."""
        return not self.done and self.pending is None

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.stats["new_tokens"] = self.count
            if self.count > 1:
                self.stats["decode_tok_s"] = (self.count - 1) / (time.perf_counter() - self.first_at)

    def close(self) -> None:
        """End it here (a client left, or it ended) and roll back to the mark, if any."""
        self.finish()
        if self.mark is not None:
            self.ctx.rollback(self.mark)
            self.mark = None

    def alone(self) -> Iterator[int]:
        while (token := self.give()) is not None:
            yield token
            if self.stepping:
                decode_step([self])


def decode_step(answers: list[Answer]) -> None:
    """One decode step for answers whose last token was given out, on one backend: their
    last tokens enter their contexts and each takes its next. Several run as one batched
    step (the weights read once); one alone runs the context's own step (on CUDA, its graph)."""
    if len(answers) == 1:
        a = answers[0]
        a.take(a.ctx.append("answer", a.ctx.backend.embed_tokens([a.last]), greedy=a.sampling.greedy))
        return
    backend = answers[0].ctx.backend
    for a in answers:
        a.ctx.check_room(1)
    out = backend.decode(backend.embed_tokens([a.last for a in answers]), [a.ctx.length for a in answers],
                         [a.ctx.cache for a in answers], greedy=all(a.sampling.greedy for a in answers))
    for a, o in zip(answers, out):
        a.ctx.record("answer", [1])
        a.take(o)


class Batch:
    """Answers decoded together, one step for all. The driver (m4 run, the server's
    worker, a robotics loop) alternates `step` with other model work: a frame for a context
    that is not answering, a new question's prefill that then joins."""

    def __init__(self):
        self.answers: list[Answer] = []

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: Answer) -> bool:
        return answer in self.answers

    def join(self, answer: Answer) -> Answer:
        self.answers.append(answer)
        return answer

    def leave(self, answer: Answer) -> None:
        """Drop an answer before its end (its client left): closed, the context rolled back.
        One that already ended has left."""
        if answer in self:
            self.answers.remove(answer)
        answer.close()

    def step(self) -> list[tuple[Answer, int]]:
        """The next token of every answer: one that just joined gives the token its prefill
        chose; the others take one decode step, batched per backend. Ended answers leave
        (closed)."""
        groups: dict[int, list[Answer]] = {}
        for a in self.answers:
            if a.stepping:
                groups.setdefault(id(a.ctx.backend), []).append(a)
        for group in groups.values():
            decode_step(group)
        tokens = [(a, t) for a in self.answers if (t := a.give()) is not None]
        for a in [a for a in self.answers if a.done]:
            self.leave(a)
        return tokens
