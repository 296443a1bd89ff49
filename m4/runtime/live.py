"""A live video context: frames enter once, questions leave no trace.

The cache holds [prefix][frame 0]...[frame n-1], and a question and its answer only while
they are asked. Under exact eviction, text between two images is tokenized whole, as the
same prompt in one piece is ("</Image>)(image 2: <Image>" may tokenize differently in two
pieces): frame i's segment is the text since the previous image and its image, and the
last frame's closing text goes in front of the question. When the window is full the
oldest frame goes. Exact eviction (the default) refills the kept frames from their cached
embeddings (no frame is encoded twice), so an answer equals the oracle's on the same
window; approximate eviction moves the kept frames down in the cache instead, cheaper per
frame and measured for agreement. Memory is fixed at creation: a stream of any length runs
in the same cache.

Several live contexts share a model: `add_frames` encodes frames that arrived for several
of them in one vision call, and `start` gives a question's Answer, which decodes alone or in
a Batch with other contexts' (m4.runtime.answer). A context's standing questions (`watch`,
m4.runtime.watch) are asked after the frames they are due at enter; `add_frame` and
`add_frames` return the changes of their answers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from m4.errors import M4Error
from m4.media import ImageProcessing, preprocess
from m4.media.image import ImageLike
from m4.prompt import IMAGE, Part, Prompt, Template, image_parts, tokenize
from m4.runtime.answer import Answer, guide_for
from m4.runtime.backend import Backend, Embeddings, embed_parts, shifting
from m4.runtime.context import Context
from m4.runtime.reuse import Reuse
from m4.runtime.sampling import Sampling
from m4.runtime.watch import Change, Watch, answer_watches
from m4.tokenizer import Tokenizer

QUESTION_TOKENS = 256  # room for a question's text in the cache


class LiveContext:
    """Over a backend, with the tokenizer and chat template of its model (`Model.stream` makes
    one from a loaded model)."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, template: Template, window: int = 8,
                 exact: bool = True, max_new_tokens: int = 128, processing: ImageProcessing | None = None,
                 reuse: Reuse | None = None):
        if window < 1:
            raise M4Error("the window must hold at least one frame")
        if not exact:
            shifting(backend)  # says in one line where it cannot
        self.backend, self.tokenizer, self.template, self.arch = backend, tokenizer, template, backend.arch
        self.window, self.exact, self.max_new_tokens = window, exact, max_new_tokens
        self.processing = processing or ImageProcessing.for_tower(self.arch.vision.kind, self.arch.vision.image_size)
        self.reuse = reuse or Reuse()  # its encoder cache: a frame seen before is not encoded again
        self.stop_ids = template.stop_ids(tokenizer)
        self.prefix = self._tokenize([template.header])
        # the tokens of a frame's place in the window (its image slot and the text around it)
        leads, tails = zip(*(slot_texts(image_parts(template, i, front=True)) for i in range(window)))
        if exact:  # text between two images whole; the last frame's closing text waits for the question
            between = [(tails[i - 1] if i else "") + leads[i] for i in range(window)]
            self.slots = [self._tokenize([text, i] if text else [i]) for i, text in enumerate(between)]
            self.tails = tails
        else:  # each slot whole: dropping the oldest leaves the next one's text as it was
            self.slots = [self._tokenize(image_parts(template, i, front=True)) for i in range(window)]
            self.tails = ("",) * window
        frames = sum(len(s.ids) for s in self.slots)
        size = len(self.prefix.ids) + frames + QUESTION_TOKENS + max_new_tokens
        if size > self.arch.text.max_positions:
            raise M4Error(f"a live window of {window} frames needs {size} positions ({frames} for the frames, "
                          f"{QUESTION_TOKENS} for a question, {max_new_tokens} for an answer) and this model's "
                          f"context holds {self.arch.text.max_positions}: use a smaller window")
        self.ctx = Context(backend, size)
        self.ctx.append("prefix", embed_parts(backend, self.prefix.parts, None))
        self.frames: list[Embeddings] = []  # embeddings of the frames in the window, oldest first
        self.watches: list[Watch] = []
        self.stats: dict[str, float] = {"frames_seen": 0, "cache_tokens": self.ctx.length, "cache_size": size}

    def _tokenize(self, parts: list[Part]) -> Prompt:
        assert self.arch.image_token_id is not None  # a loaded model's config names it
        return tokenize(parts, self.tokenizer, self.arch.image_token_id, self.arch.tokens_per_image)

    def _embed_slots(self, first: int, count: int) -> Embeddings:
        """Embeddings of window slots [first, first + count) holding their frames."""
        parts = [p for i in range(first, first + count) for p in self.slots[i].parts]
        return embed_parts(self.backend, parts, dict(enumerate(self.frames)))

    def add_frame(self, frame: ImageLike) -> list[Change]:
        """An HxWx3 uint8 RGB frame (or path / PIL image): encode once, prefill its tokens; then
        the watches due at it are asked, and the changes of their answers returned."""
        return add_frames([(self, frame)])

    def enter(self, embeds: Embeddings, started: float, preprocess_ms: float, vision_ms: float) -> None:
        """An encoded frame into the window (add_frames encodes it), the oldest going when it
        is full: one write into the context, of the new frame's slot, or under exact eviction
        of every slot after the prefix, refilled from the cached embeddings."""
        t1 = time.perf_counter()
        self.frames.append(embeds)
        full = len(self.frames) > self.window
        if full:
            self.frames.pop(0)
        if full and self.exact:
            self.ctx.append("frame", self._embed_slots(0, self.window), [len(s.ids) for s in self.slots], after=1)
        else:
            if full:
                self.ctx.shift_out(1)
            self.ctx.append("frame", self._embed_slots(len(self.frames) - 1, 1))
        t2 = time.perf_counter()
        for w in self.watches:
            w.saw(int(self.stats["frames_seen"]))
        self.stats.update(frames_seen=self.stats["frames_seen"] + 1, preprocess_ms=preprocess_ms,
                          vision_ms=vision_ms, frame_prefill_ms=(t2 - t1) * 1e3, ingest_ms=(t2 - started) * 1e3,
                          cache_tokens=self.ctx.length)

    def tokens(self, question: str, max_new_tokens: int | None = None,
               sampling: Sampling = Sampling()) -> Iterator[int]:
        """The answer's token ids over the frames in the window; then the question and the
        answer are rolled back, so the next question sees only the frames."""
        answer = self.start(question, max_new_tokens, sampling)
        try:
            yield from answer.alone()
        finally:
            answer.close()

    def start(self, question: str, max_new_tokens: int | None = None, sampling: Sampling = Sampling()) -> Answer:
        """The question prefilled after the frames and its first token chosen: an Answer to
        decode alone or in a Batch with other contexts' (m4.runtime.answer). Closing it rolls
        the question and the answer back; no frame enters while it is open."""
        if self.answering:
            raise M4Error("this live context is answering a question: finish or close that answer first")
        n = min(max_new_tokens or self.max_new_tokens, self.max_new_tokens)
        q = self._question(question)
        guide = guide_for(sampling, self.tokenizer, self.backend, self.stop_ids)
        mark = self.ctx.mark()
        t0 = time.perf_counter()
        logits = self.ctx.append("question", embed_parts(self.backend, q.parts, None))
        t1 = time.perf_counter()
        self.stats.update(prefill_ms=(t1 - t0) * 1e3, prefill_tok_s=len(q.ids) / (t1 - t0))
        return Answer(self.ctx, logits, n, self.stop_ids, sampling, self.stats, t0, mark, guide)

    def _question(self, question: str) -> Prompt:
        """The question's tokens after the frames in the window (the last one's closing text first)."""
        if IMAGE in question:
            raise M4Error("a live question refers to the frames in the window: remove its <image> placeholders")
        tail = self.tails[len(self.frames) - 1] if self.frames else ""
        q = self._tokenize([tail + question, self.template.footer])
        if len(q.ids) > QUESTION_TOKENS:
            raise M4Error(f"question too long for the live context: {len(q.ids)} tokens, at most {QUESTION_TOKENS}")
        return q

    def watch(self, question: str, schema: Any = None, choices: list[str] | None = None, regex: str | None = None,
              every: int = 1, max_new_tokens: int | None = None, sampling: Sampling = Sampling()) -> Watch:
        """A standing question, asked after every `every`-th frame from now on (constrained as
        `ask` constrains: a watch of a few choices costs its prefill and a token or two).
        `add_frame` returns a Change the first time it is answered and whenever its answer
        differs from the one before; `watch.answer` is its latest. Checked here: a bad
        question or constraint fails now, not at a frame."""
        if not isinstance(every, int) or every < 1:
            raise M4Error(f"a watch is asked every N frames, N a whole number of at least 1: got {every!r}")
        self._question(question)
        sampling = sampling.constrained(schema, choices, regex)
        guide_for(sampling, self.tokenizer, self.backend, self.stop_ids)  # compiled now, and cached
        w = Watch(question, sampling, every, max_new_tokens)
        self.watches.append(w)
        return w

    def unwatch(self, watch: Watch) -> None:
        """The watch is asked no more."""
        self.watches.remove(watch)

    def due(self) -> list[Watch]:
        """The watches due to be asked after the frames that entered (add_frames asks them)."""
        return [w for w in self.watches if w.due_at is not None]

    @property
    def answering(self) -> bool:
        """Whether a question and its answer are in the cache (an Answer not yet closed)."""
        return any(s.kind == "question" for s in self.ctx.segments)

    def ask(self, question: str, max_new_tokens: int | None = None, sampling: Sampling = Sampling(),
            stream: bool = False, schema: Any = None, choices: list[str] | None = None,
            regex: str | None = None) -> str | Iterator[str]:
        """The answer over the frames in the window (constrained as Model.ask constrains)."""
        pieces = self.tokenizer.detokenize(self.tokens(question, max_new_tokens,
                                                       sampling.constrained(schema, choices, regex)))
        return pieces if stream else "".join(pieces)


def slot_texts(parts: list[Part]) -> tuple[str, str]:
    """An image slot's parts (text, the image's index, text) -> the text before and after it."""
    i = next(k for k, p in enumerate(parts) if isinstance(p, int))
    return "".join(str(p) for p in parts[:i]), "".join(str(p) for p in parts[i + 1:])


def add_frames(arrivals: list[tuple[LiveContext, ImageLike]]) -> list[Change]:
    """Frames that arrived for several live contexts, entered (`enter_frames`); then the
    watches due are asked, all contexts' together (m4.runtime.watch.answer_watches): the
    changes of their answers."""
    enter_frames(arrivals)
    return answer_watches([live for live, _ in arrivals])


def enter_frames(arrivals: list[tuple[LiveContext, ImageLike]]) -> None:
    """Frames that arrived for several live contexts: those of one backend encoded in one
    vision call (one pass over the tower's weights; through the first context's encoder
    cache), then each prefilled into its context. Their watches become due, not yet asked."""
    t0 = time.perf_counter()
    for live, _ in arrivals:
        if live.answering:  # before any work: nothing enters if one cannot
            raise M4Error("a live context is answering a question: a frame enters after that answer ends")
    by_backend: dict[int, list[tuple[LiveContext, ImageLike]]] = {}
    for live, frame in arrivals:
        by_backend.setdefault(id(live.backend), []).append((live, frame))
    for group in by_backend.values():
        pixels = np.concatenate([preprocess([frame], live.processing) for live, frame in group])
        tp = time.perf_counter()
        first = group[0][0]
        embeds = first.reuse.encode(first.backend, pixels)
        t1 = time.perf_counter()
        for i, (live, _) in enumerate(group):
            live.enter(embeds[i], t0, (tp - t0) * 1e3, (t1 - tp) * 1e3)
