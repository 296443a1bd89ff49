"""The live context against the oracle: after any history of frames, an answer equals
transformers' greedy answer on the full prompt over the frames in the window."""

import pytest
import torch

import m4

from conftest import VARIANTS, random_images
from test_parity import oracle_tokens

Q = "What is happening?"


def oracle_answer(oracle, path, model, frames, n):
    p, pictures = model.prepare(Q, None, frames, None, False)
    return oracle_tokens(oracle(path), model, p, pictures, n)


@pytest.mark.parametrize("variant", VARIANTS)
def test_live_answers_equal_transformers(checkpoints, oracle, variant):
    path = checkpoints[variant]
    model = m4.load(path, backend="torch")
    live = model.stream(window=4)
    frames = random_images(7, seed=3)
    for k, frame in enumerate(frames, start=1):
        live.add_frame(frame)
        if k in (1, 3, 4, 5, 7):  # before, at and after the window fills
            window = frames[max(0, k - 4):k]
            ours = list(live.tokens(Q, max_new_tokens=10))
            assert ours == oracle_answer(oracle, path, model, window, 10), f"after {k} frames"
            assert list(live.tokens(Q, max_new_tokens=10)) == ours  # the rollback left no trace
            assert live.ask(Q, max_new_tokens=10) == model.ask(Q, video=window, max_new_tokens=10)
    assert live.stats["frames_seen"] == 7 and live.stats["cache_tokens"] == live.ctx.length


def test_eight_frame_window_and_stats(checkpoints, oracle):
    path = checkpoints["gqa-tied-last-full"]
    model = m4.load(path)
    live = model.stream(window=8)
    frames = random_images(10, seed=5)
    for f in frames:
        live.add_frame(f)
    assert list(live.tokens(Q, max_new_tokens=8)) == oracle_answer(oracle, path, model, frames[2:], 8)
    for key in ("vision_ms", "ingest_ms", "prefill_ms", "prefill_tok_s", "ttft_ms", "decode_tok_s", "cache_tokens"):
        assert live.stats[key] > 0, key


def test_each_answer_reports_its_own_stats(checkpoints):
    """The live context's stats are updated, not replaced, per answer: a one-token answer
    after a longer one has no decode rate (it ran no decode step), not the longer one's."""
    live = m4.load(checkpoints["gqa-tied-last-full"]).stream(window=2)
    live.add_frame(random_images(1, seed=4)[0])
    assert len(list(live.tokens(Q, max_new_tokens=8))) == live.stats["new_tokens"] > 1
    assert live.stats["decode_tok_s"] > 0
    assert len(list(live.tokens(Q, max_new_tokens=1))) == live.stats["new_tokens"] == 1
    assert "decode_tok_s" not in live.stats and live.stats["ttft_ms"] > 0


def test_live_contexts_share_one_model(checkpoints):
    model = m4.load(checkpoints["mha-tied-last-default"])
    a, b = model.stream(window=3), model.stream(window=3)
    fa, fb = random_images(3, seed=1), random_images(3, seed=2)
    for x, y in zip(fa, fb):
        a.add_frame(x)
        b.add_frame(y)
    assert a.ask(Q, max_new_tokens=8) == model.ask(Q, video=fa, max_new_tokens=8)
    assert b.ask(Q, max_new_tokens=8) == model.ask(Q, video=fb, max_new_tokens=8)


def test_cache_is_not_reallocated(checkpoints):
    """Memory is fixed at creation: the cache tensors are the same objects after 3 windows."""
    live = m4.load(checkpoints["gqa-tied-last-full"]).stream(window=2)
    k, v = live.ctx.cache.k, live.ctx.cache.v
    for f in random_images(6):
        live.add_frame(f)
        live.ask(Q, max_new_tokens=3)
    assert live.ctx.cache.k is k and live.ctx.cache.v is v
    assert live.stats["cache_tokens"] <= live.stats["cache_size"]


def test_approximate_eviction_rerotates_keys_exactly(checkpoints):
    """Shift mode equals exact mode until the first eviction. After it, layer-0 keys (which
    depend only on each token and its position) equal the exact refill's: the re-rotation
    is right; deeper layers still remember the evicted frame, which is the approximation."""
    model = m4.load(checkpoints["gqa-tied-last-full"])
    exact, approx = model.stream(window=3), model.stream(window=3, exact=False)
    for k, f in enumerate(random_images(5, seed=9), start=1):
        exact.add_frame(f)
        approx.add_frame(f)
        if k <= 3:
            assert list(exact.tokens(Q, max_new_tokens=8)) == list(approx.tokens(Q, max_new_tokens=8))
    n = exact.ctx.length  # the exact context holds the last frame's closing text back for the question
    assert approx.ctx.length == n + len(model.tokenizer.encode(exact.tails[-1]))
    torch.testing.assert_close(approx.ctx.cache.k[0, :, :, :n], exact.ctx.cache.k[0, :, :, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(approx.ctx.cache.v[0, :, :, :n], exact.ctx.cache.v[0, :, :, :n], atol=1e-5, rtol=0)
    assert not torch.allclose(approx.ctx.cache.k[1, :, :, :n], exact.ctx.cache.k[1, :, :, :n], atol=1e-3)
