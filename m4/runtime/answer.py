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

from m4.constraint import Guide, allowed, grammars_for
from m4.runtime.backend import Backend, Logits
from m4.runtime.context import Context
from m4.runtime.sampling import Sampling, sample
from m4.tokenizer import Tokenizer

# what an answer writes into its stats; a stats dict shared by answers (a live context's)
# drops them when the next answer starts, so each answer reports only its own: one of a
# single token has no decode_tok_s (no decode step ran), one that stops at once no ttft_ms
ANSWER_STATS = ("ttft_ms", "decode_tok_s", "new_tokens")

class Answer:
    """A context's answer being decoded: the token it chose last and what is left of it.
    Decoded alone (`alone`) or with other contexts' answers, one batched step for all
    (`Batch` below): the tokens are the same either way. The answer is kept in the
    cache as a segment; `close` rolls the context back to `mark` where one was given (a
    question and its answer leave no trace). `first`: the prompt's last logits (1, vocab)
    (Context.append's), from which its first token is chosen. `guide`: its constraint's
    walk (`guide_for`), where its sampling has one."""

    def __init__(self, ctx: Context, first: Logits, max_new_tokens: int, stop_ids: set[int],
                 sampling: Sampling = Sampling(), stats: dict[str, float] | None = None,
                 started: float | None = None, mark: int | None = None, guide: Guide | None = None):
        self.ctx, self.remaining, self.stop_ids, self.sampling, self.mark = (ctx, max_new_tokens, stop_ids,
                                                                             sampling, mark)
        self.stats = {} if stats is None else stats  # ttft_ms (from `started`), decode_tok_s, new_tokens
        for k in ANSWER_STATS:
            self.stats.pop(k, None)
        self.started = time.perf_counter() if started is None else started
        self.rng = np.random.default_rng(sampling.seed)
        self.count, self.first_at = 0, 0.0
        self.last = 0  # the token given out last, which the next step feeds
        self.pending: int | None = None  # chosen, not yet given out
        self.done = False
        self.guide = guide
        self.finish_reason = "length"  # as OpenAI names it; "stop" where a stop token or the constraint ended it
        self.accept(choose(first, [self], ctx.backend)[0])

    def accept(self, token: int) -> None:
        """The token a step chose for it; a stop token, or no room left, ends the answer, and
        a constraint that admits no more ends it after this token (next_token)."""
        if token in self.stop_ids or self.remaining <= 0:
            self.finish("stop" if token in self.stop_ids else "length")
            return
        if self.guide is not None:
            self.guide.accept(token)
        if self.count == 0:
            self.first_at = time.perf_counter()
            self.stats["ttft_ms"] = (self.first_at - self.started) * 1e3
        self.count += 1
        self.remaining -= 1
        self.pending = token

    def next_token(self) -> int | None:
        """The token chosen last, once; the answer ends with it when no more may follow (the
        last token needs no forward pass)."""
        token, self.pending = self.pending, None
        if token is not None:
            self.last = token
            if self.guide is not None and self.guide.ended:
                self.finish("stop")
            elif self.remaining == 0:
                self.finish()
        return token

    @property
    def needs_step(self) -> bool:
        """Whether its next token needs a decode step (its last one was given out)."""
        return not self.done and self.pending is None

    def finish(self, reason: str = "length") -> None:
        if not self.done:
            self.done = True
            self.finish_reason = reason
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
        while (token := self.next_token()) is not None:
            yield token
            if self.needs_step:
                decode_step([self])


def guide_for(sampling: Sampling, tokenizer: Tokenizer, backend: Backend, stop_ids: set[int]) -> Guide | None:
    """The walk of the sampling's constraint over this model's vocabulary (None where it has
    none): compiled, or taken from the cache, before any prefill, so a constraint the engine
    cannot build fails first."""
    if sampling.constraint is None:
        return None
    return grammars_for(tokenizer, backend.arch.text.vocab, stop_ids).guide(sampling.constraint)


def choose(logits: Logits, answers: list[Answer], backend: Backend) -> list[int]:
    """Each answer's next token from its row of `logits` (B, vocab): the one place a token
    is chosen, the first (from the prompt's logits) and every decode step's. A constrained
    answer's row is masked first, where the logits are, to the tokens its constraint allows
    (each row its own). Greedy rows take the argmax there (a GPU's stay there: the host
    receives one id a row); the others are sampled on the host."""
    guided = [(i, a.guide) for i, a in enumerate(answers) if a.guide is not None]
    if guided:
        rows, guides = zip(*guided)
        logits = backend.mask(logits, list(rows), allowed(list(guides)))
    greedy = [i for i, a in enumerate(answers) if a.sampling.greedy]
    tokens: dict[int, int] = {}
    if greedy:
        rows = logits if len(greedy) == len(answers) else logits[greedy]
        tokens = dict(zip(greedy, (int(t) for t in rows.argmax(-1).tolist())))
    for i, a in enumerate(answers):
        if i not in tokens:
            tokens[i] = sample(backend.host(logits[i]), a.sampling, a.rng)
    return [tokens[i] for i in range(len(answers))]


def decode_step(answers: list[Answer]) -> None:
    """One decode step for answers whose last token was given out, on one backend: their
    last tokens enter their contexts and each takes its next, through the backend's one
    decode entry (one answer alone: its context's own step, on CUDA its graph; several: one
    batched step, the weights read once)."""
    backend = answers[0].ctx.backend
    for a in answers:
        a.ctx.check_room(1)
    logits = backend.decode(backend.embed_tokens([a.last for a in answers]), [a.ctx.length for a in answers],
                            [a.ctx.cache for a in answers])
    for a, token in zip(answers, choose(logits, answers, backend)):
        a.ctx.record("answer", [1])
        a.accept(token)


class Batch:
    """Answers decoded together, one step for all. The driver (m4 run, the server's
    worker, a robotics loop) alternates `step` with other model work: a frame for a context
    that is not answering, a new question's prefill that then joins."""

    def __init__(self) -> None:
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
            if a.needs_step:
                groups.setdefault(id(a.ctx.backend), []).append(a)
        for group in groups.values():
            decode_step(group)
        tokens = [(a, t) for a in self.answers if (t := a.next_token()) is not None]
        for a in [a for a in self.answers if a.done]:
            self.leave(a)
        return tokens
