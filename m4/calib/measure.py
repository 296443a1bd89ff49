"""A quantised bundle against its float bundle on held-out inputs: the numbers of report.json.

vision: cosine (mean and worst, per embedding row) and max_abs_error of the embeddings.
decoder: fed the float vision's embeddings, so its own error shows alone. The quantised
bundle reads each held-out prompt in one prefill (teacher forcing: the prompt's own tokens,
images included), in chunks of at most PREFILL_CHUNK positions with the logits of every
position; the float reference (reference.py, the float bundle's decoder a layer at a time)
gives its hidden states at the same positions, whose logits are made a chunk at a time
beside the quantised ones. That gives logit_kl (KL(float || quantised) of the next-token
distributions, mean over the positions), token_agreement (share of positions where the
quantised bundle's greedy choice is the float one's) and the logits' cosine and
max_abs_error, without one early difference deciding all the later tokens.
end_to_end: answers_equal, the share of held-out prompts both bundles answer identically:
the quantised bundle answers (its own vision and decoder), and the reference, reading the
prompt and that answer at once, chooses each of its tokens (and the stop after it) greedily.
Latency: float and quantised runs interleaved, median of REPEATS, on this machine; this
alone loads the float bundle whole, and only where both fit in memory side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from m4.bundle_format import PREFILL_CHUNK

ANSWER_TOKENS = 16  # decode steps timed, and the length of the end-to-end answers
VISION_BATCH = 4  # images per timed vision call
REPEATS = 5
ROWS = 64  # logit rows compared at once, in float64 (at a 152k vocabulary, 78 MB)


def per_row(ours: np.ndarray, ref: np.ndarray) -> dict[str, np.ndarray]:
    a, r = ours.reshape(-1, ours.shape[-1]).astype(np.float64), ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    cos = (a * r).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(r, axis=-1), 1e-30)
    return {"cosine": cos, "abs_error": np.abs(a - r).max(-1), "abs_ref": np.abs(r).max(-1)}


def summary(rows: dict[str, np.ndarray]) -> dict:
    return {"cosine": float(rows["cosine"].mean()), "cosine_min": float(rows["cosine"].min()),
            "max_abs_error": float(rows["abs_error"].max()), "max_abs_ref": float(rows["abs_ref"].max())}


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    return summary(per_row(ours, ref))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def measure_vision(ref, quant, pixels: np.ndarray, batch: int = VISION_BATCH) -> dict:
    ours = np.concatenate([quant.backend.encode_images(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    refs = np.concatenate([ref.backend.encode_images(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    x = pixels[:batch]
    f, q = timed(lambda: ref.backend.encode_images(x), lambda: quant.backend.encode_images(x))
    return {**compare(ours, refs), "images": len(pixels),
            "latency_ms": {"batch": len(x), "float": f * 1e3, "quantised": q * 1e3, "speedup": f / q}}


def quantised_logits(backend, embeds: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 logits) of every position of one prompt, one prefill, a chunk of at
    most PREFILL_CHUNK positions at a time (a prompt's logits whole would be its length
    times the vocabulary)."""
    cache = backend.new_cache(len(embeds))
    for s in range(0, len(embeds), PREFILL_CHUNK):
        yield s, backend.forward(embeds[s:s + PREFILL_CHUNK], s, cache, last_only=False)


def row_measures(r: np.ndarray, q: np.ndarray) -> dict[str, np.ndarray]:
    """Per position: the logits' cosine and errors, the KL of the next-token distributions,
    and whether both choose the same token."""
    lr, lq = log_softmax(r), log_softmax(q)
    return {**per_row(q, r), "kl": (np.exp(lr) * (lr - lq)).sum(-1), "agree": r.argmax(-1) == q.argmax(-1)}


def measure_decoder(reference, hidden: list[torch.Tensor], quant, prompts: list[np.ndarray]) -> dict:
    """`hidden`: the reference's hidden states of each prompt (its first len(prompt) rows)."""
    pieces: dict[str, list[np.ndarray]] = {}
    for e, h in zip(prompts, hidden):
        for s, q in quantised_logits(quant.backend, e):
            r = reference.logits(h[s:s + len(q)]).numpy()
            for i in range(0, len(r), ROWS):
                for k, v in row_measures(r[i:i + ROWS], q[i:i + ROWS]).items():
                    pieces.setdefault(k, []).append(v)
    rows = {k: np.concatenate(v) for k, v in pieces.items()}
    return {**summary(rows), "logit_kl": float(rows["kl"].mean()), "token_agreement": float(rows["agree"].mean()),
            "prompts": len(prompts), "positions": len(rows["kl"])}


def answers_equal(reference, hidden: list[torch.Tensor], prompts: list[np.ndarray], answers: list[list[int]],
                  stop_ids: set[int]) -> float:
    """The share of answers the float bundle gives too. `hidden`: the reference's hidden states
    of each prompt followed by its answer; greedy decoding would give the same answer where,
    at each of its positions, the reference's best token is the answer's next one, and after
    an answer that stopped early, a stop token."""
    same = []
    for e, h, a in zip(prompts, hidden, answers):
        chosen = reference.logits(h[len(e) - 1:]).argmax(-1).tolist()
        same.append(chosen[:len(a)] == a and (len(a) == ANSWER_TOKENS or chosen[len(a)] in stop_ids))
    return sum(same) / len(same)


def latency(ref, quant, embeds: np.ndarray) -> dict:
    """Prefill and decode of both bundles' decoders, timed alternately."""
    x = embeds[:PREFILL_CHUNK]  # a prefill runs a chunk at a time
    pf, pq = timed(lambda: prefill(ref.backend, x), lambda: prefill(quant.backend, x))
    decode = decoding(ref.backend, x), decoding(quant.backend, x)
    df, dq = np.median([[d() for d in decode] for _ in range(REPEATS)], 0)
    return {"latency_ms": {"prefill_tokens": len(x), "prefill_float": pf * 1e3, "prefill_quantised": pq * 1e3,
                           "prefill_speedup": pf / pq},
            "decode_tok_s": {"context": len(x), "float": ANSWER_TOKENS / df, "quantised": ANSWER_TOKENS / dq,
                             "speedup": df / dq}}


def prefill(backend, embeds: np.ndarray) -> None:
    backend.forward(embeds, 0, backend.new_cache(len(embeds)))


def decoding(backend, embeds: np.ndarray) -> Callable[[], float]:
    """After one prefill of `embeds`: ANSWER_TOKENS greedy decode steps at the positions after
    them, run again (over the same positions) at each call -> their seconds, as the median
    step times the steps (the first step after the other bundle's run meets its idle threads)."""
    cache = backend.new_cache(len(embeds) + ANSWER_TOKENS)
    first = int(backend.prefill(embeds, 0, cache).argmax())

    def steps() -> float:
        token, took = first, []
        for i in range(ANSWER_TOKENS):
            t = time.perf_counter()
            logits = backend.decode(backend.embed_tokens([token]), [len(embeds) + i], [cache])
            token = int(logits.argmax())  # greedy, as an answer takes it (runtime.answer.choose)
            took.append(time.perf_counter() - t)
        return float(np.median(took)) * ANSWER_TOKENS
    return steps


def timed(f, q) -> tuple[float, float]:
    """Median seconds of f and of q, run alternately after one warm-up each."""
    f(), q()
    tf: list[float] = []
    tq: list[float] = []
    for _ in range(REPEATS):
        for fn, ts in ((f, tf), (q, tq)):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return float(np.median(tf)), float(np.median(tq))


def answer(quant, samples: list) -> list[list[int]]:
    """The quantised bundle's greedy answer to each sample, its stop token left out."""
    return [list(quant.tokens(s.text, **s.ask_kwargs(), max_new_tokens=ANSWER_TOKENS)) for s in samples]
