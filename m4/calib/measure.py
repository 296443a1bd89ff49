"""A quantised bundle against its float bundle on held-out inputs: the numbers of report.json.

vision: cosine (mean and worst, per embedding row) and max_abs_error of the embeddings.
decoder: fed the float vision's embeddings, so its own error shows alone. The float bundle
answers each prompt greedily; both bundles then read prompt + answer in one prefill
(teacher forcing), which gives logit_kl (KL(float || quantised) of the next-token
distributions, mean over answer positions), token_agreement (share of answer positions
where the quantised bundle's greedy choice is the float one's) and the logits' cosine and
max_abs_error, without one early difference deciding all the later tokens.
end_to_end: answers_equal, the share of held-out prompts both bundles answer identically.
Latency: float and quantised runs interleaved, median of REPEATS, on this machine.
"""

from __future__ import annotations

import time

import numpy as np

ANSWER_TOKENS = 16
VISION_BATCH = 4  # images per timed vision call
REPEATS = 5


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    a, r = ours.reshape(-1, ours.shape[-1]).astype(np.float64), ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    cos = (a * r).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(r, axis=-1), 1e-30)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "max_abs_error": float(np.abs(a - r).max()),
            "max_abs_ref": float(np.abs(r).max())}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def greedy(backend, embeds: np.ndarray, n: int) -> list[int]:
    """n greedy tokens after `embeds`, stop tokens included (agreement is per position)."""
    cache = backend.new_cache(len(embeds) + n)
    logits, out = backend.forward(embeds, 0, cache)[-1], []
    for i in range(n):
        out.append(int(logits.argmax()))
        if i + 1 < n:
            logits = backend.forward(backend.embed_tokens(out[-1:]), len(embeds) + i, cache)[-1]
    return out


def teacher_forced(backend, embeds: np.ndarray, answer: list[int]) -> np.ndarray:
    """Logits predicting each answer token, (len(answer), vocab), from one prefill."""
    seq = np.concatenate([embeds, backend.embed_tokens(answer[:-1])])
    logits = backend.forward(seq, 0, backend.new_cache(len(seq)), last_only=False)
    return logits[len(embeds) - 1:]


def measure_vision(ref, quant, pixels: np.ndarray, batch: int = VISION_BATCH) -> dict:
    ours = np.concatenate([quant.backend.encode_images(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    refs = np.concatenate([ref.backend.encode_images(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    x = pixels[:batch]
    f, q = timed(lambda: ref.backend.encode_images(x), lambda: quant.backend.encode_images(x))
    return {**compare(ours, refs), "images": len(pixels),
            "latency_ms": {"batch": len(x), "float": f * 1e3, "quantised": q * 1e3, "speedup": f / q}}


def measure_decoder(ref, quant, prompts: list[np.ndarray]) -> dict:
    kl, agree, ours, refs = [], [], [], []
    for e in prompts:
        answer = greedy(ref.backend, e, ANSWER_TOKENS)
        r, q = teacher_forced(ref.backend, e, answer), teacher_forced(quant.backend, e, answer)
        lr, lq = log_softmax(r), log_softmax(q)
        kl.append((np.exp(lr) * (lr - lq)).sum(-1))
        agree.append(q.argmax(-1) == np.array(answer))
        ours.append(q)
        refs.append(r)
    e = prompts[0]
    pf, pq = timed(lambda: prefill(ref.backend, e), lambda: prefill(quant.backend, e))
    df, dq = np.median([(decode_seconds(ref.backend, e), decode_seconds(quant.backend, e)) for _ in range(REPEATS)], 0)
    return {**compare(np.concatenate(ours), np.concatenate(refs)), "logit_kl": float(np.concatenate(kl).mean()),
            "token_agreement": float(np.concatenate(agree).mean()), "prompts": len(prompts),
            "answer_tokens": ANSWER_TOKENS,
            "latency_ms": {"prefill_tokens": len(e), "prefill_float": pf * 1e3, "prefill_quantised": pq * 1e3,
                           "prefill_speedup": pf / pq},
            "decode_tok_s": {"context": len(e), "float": ANSWER_TOKENS / df, "quantised": ANSWER_TOKENS / dq, "speedup": df / dq}}


def prefill(backend, embeds: np.ndarray) -> None:
    backend.forward(embeds, 0, backend.new_cache(len(embeds)))


def decode_seconds(backend, embeds: np.ndarray) -> float:
    """Seconds for ANSWER_TOKENS decode steps after the prompt (median step x steps)."""
    cache = backend.new_cache(len(embeds) + ANSWER_TOKENS)
    logits, steps = backend.forward(embeds, 0, cache)[-1], []
    for i in range(ANSWER_TOKENS):
        t = time.perf_counter()
        logits = backend.forward(backend.embed_tokens([int(logits.argmax())]), len(embeds) + i, cache)[-1]
        steps.append(time.perf_counter() - t)
    return float(np.median(steps)) * ANSWER_TOKENS


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


def answers_equal(ref, quant, samples: list) -> float:
    same = [list(ref.tokens(s.text, **s.ask_kwargs(), max_new_tokens=ANSWER_TOKENS))
            == list(quant.tokens(s.text, **s.ask_kwargs(), max_new_tokens=ANSWER_TOKENS)) for s in samples]
    return sum(same) / len(same)
