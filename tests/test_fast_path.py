"""The CUDA fast path's pieces, checked on the CPU against the oracle: the static-shape
decode step (what a CUDA graph replays, here run eagerly), chunked prefill, and weight-only
INT8 decoder linears (measured, bounded error)."""

import numpy as np
import pytest
import torch

import m4
from m4.media import preprocess
from m4.model.int8 import Int8Linear
from m4.runtime import torch_backend
from m4.runtime.backend import CACHE_BUCKET
from m4.runtime.torch_backend import TorchBackend

from conftest import VARIANTS, random_images
from test_live import oracle_answer
from test_parity import QUESTIONS, oracle_tokens


def with_backend(path, **kw):
    model = m4.load(path, backend="torch")
    model.backend = TorchBackend(path, model.arch, "cpu", **kw)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_static_decode_equals_transformers(checkpoints, oracle, variant):
    model = with_backend(checkpoints[variant], decode="static")
    for n in (1, 2):
        images = random_images(n, seed=10 + n)
        p, pictures = model.prepare(QUESTIONS[n], images, None, None, False)
        ours = list(model.tokens(QUESTIONS[n], images=images, max_new_tokens=12))
        assert len(ours) == 12
        assert ours == oracle_tokens(oracle(checkpoints[variant]), model, p, pictures, 12)


def test_static_caches_are_reused(checkpoints):
    """A released cache (with its graph, on CUDA) serves the next context of its size."""
    b = with_backend(checkpoints["gqa-tied-last-full"], decode="static").backend
    first = b.new_cache(10)
    ptr = first.k.data_ptr()
    assert first.max_len == CACHE_BUCKET
    del first
    again = b.new_cache(CACHE_BUCKET)
    assert again.k.data_ptr() == ptr
    assert b.new_cache(10).k.data_ptr() != ptr  # `again` still holds it
    bigger = b.new_cache(CACHE_BUCKET + 1)
    assert bigger.max_len == 2 * CACHE_BUCKET
    for n in (3, 4, 5):  # each let go at once: the pool keeps the latest few
        b.new_cache(n * CACHE_BUCKET)
    assert [c.max_len // CACHE_BUCKET for c in b.spare] == [4, 5][-torch_backend.SPARE_CACHES:]


@pytest.mark.parametrize("variant", ["gqa-untied-penult-full", "mha-tied-last-default"])
def test_static_decode_in_a_live_window(checkpoints, oracle, variant):
    """Rolled-back questions and evicted frames leave stale entries past the context's end:
    the static step reads the whole buffer, and its mask must hide them. From the second
    frame on, frames (and the window refilled after an eviction) are chunks of a length
    seen before: they go through the static step too."""
    path = checkpoints[variant]
    model = with_backend(path, decode="static")
    chunks = []
    step = model.backend.step
    model.backend.step = lambda x, pos, cache: chunks.append(x.shape[1]) or step(x, pos, cache)
    live = model.stream(window=3)
    frames = random_images(5, seed=4)
    for k, frame in enumerate(frames, start=1):
        live.add_frame(frame)
        if k in (2, 4, 5):
            assert list(live.tokens("What is happening?", max_new_tokens=8)) == \
                oracle_answer(oracle, path, model, frames[max(0, k - 3):k], 8), f"after {k} frames"
    frame, window = len(live.slots[1].ids), sum(len(s.ids) for s in live.slots)
    assert {frame, window} <= set(chunks)  # a later frame's tokens, the refilled window's (and the question's)


def test_chunked_prefill_equals_one_pass(checkpoints, monkeypatch):
    model = m4.load(checkpoints["mha-untied-penult-default"], backend="torch")
    p, pictures = model.prepare(QUESTIONS[2], random_images(2, seed=1), None, None, False)
    b, embeds = model.backend, model.embed(p, pictures)
    whole = b.forward(embeds, 0, b.new_cache(len(p.ids)), last_only=False)
    monkeypatch.setattr(torch_backend, "TORCH_PREFILL_CHUNK", 7)
    chunked = b.forward(embeds, 0, b.new_cache(len(p.ids)), last_only=False)
    # fp32 sums in another order: 1.2e-5 apart on logits of ~3 (AMD EPYC); a wrong mask or
    # position in a chunk moves them by more than 1e-2
    np.testing.assert_allclose(chunked, whole, atol=1e-4, rtol=0)


def test_int8_kernels_agree():
    """The fused int8 matrix-vector kernel (decode) and dequantise-then-matmul (prefill)
    compute the same product, close to the float layer's."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    q = Int8Linear(linear)
    if not q.fused:
        pytest.skip("torch._weight_int8pack_mm does not run on this CPU build")
    x = torch.randn(1, 1, 256)
    fused = q(x)
    q.fused = False
    torch.testing.assert_close(fused, q(x), atol=1e-4, rtol=1e-4)
    ref = linear(x)
    assert (fused - ref).abs().max() < 0.02 * ref.abs().max()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_error_against_transformers(checkpoints, oracle, variant):
    """Prompt logits (dequantised prefill) and teacher-forced decode logits (the fused kernel)
    of the int8 decoder against the oracle's float logits: cosine and top-1 agreement.
    Measured on these checkpoints: cosine >= 0.996, top-1 0.91-0.96 overall, 0.87-0.93 in decode."""
    path = checkpoints[variant]
    model = with_backend(path, dtype="int8")
    hf = oracle(path)
    p, pictures = model.prepare(QUESTIONS[2], random_images(2, seed=7), None, None, False)
    answer = oracle_tokens(hf, model, p, pictures, 16)
    ids = p.ids + answer
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]),
                 pixel_values=torch.from_numpy(preprocess(pictures, model.processing))).logits[0].numpy()
    b = model.backend
    cache = b.new_cache(len(ids))
    prompt = b.forward(model.embed(p, pictures), 0, cache, last_only=False)
    steps = np.stack([b.forward(b.embed_tokens([t]), len(p.ids) + i, cache)[-1] for i, t in enumerate(answer[:-1])])
    ours = np.concatenate([prompt, steps])
    ref = ref[:len(ours)]
    assert cosine(ours, ref).min() > 0.99
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.85
    assert np.mean(steps.argmax(-1) == ref[len(p.ids):].argmax(-1)) >= 0.75


@pytest.mark.parametrize("preset", ["tiny", "0.5b", "7b"])
def test_memory_needs_match_the_model_layout(preset):
    """m4.info.memory_needs (docs/deploy.md's memory table) against the bytes of the model itself,
    built on the meta device in fp16 and then with int8 decoder linears (whose per-channel
    scales, norms and biases the formula leaves out)."""
    from m4.info import memory_needs
    from m4.model.config import PRESETS
    from m4.model.int8 import quantise_decoder
    from m4.model.llava import LLaVA

    arch = PRESETS[preset]
    with torch.device("meta"):
        model = LLaVA(arch).half()
    if arch.text.tied:
        model.text.lm_head.weight = model.text.embed_tokens.weight

    def weight_bytes():
        tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        rope = {id(model.text.cos), id(model.text.sin)}
        return sum(t.numel() * t.element_size() for k, t in tensors.items() if k not in rope)

    need = memory_needs(arch)
    assert weight_bytes() == need["fp16"]["weights"]
    decode = (model.text.layers, model.text.norm, model.text.lm_head)  # what one decode step reads
    assert sum(t.numel() * t.element_size() for m in decode for t in m.parameters()) == need["fp16"]["decode_bytes"]
    quantise_decoder(model.text)
    assert need["int8"]["weights"] <= weight_bytes() <= 1.02 * need["int8"]["weights"]


@pytest.mark.parametrize("variant", ["gqa-tied-last-full", "llama3.1-clip-gqa-untied-last-full"])
def test_static_batched_decode_equals_each_context_alone(checkpoints, variant):
    """The batched step a CUDA graph replays (each whole cache under its mask), run eagerly:
    the same scenario as the eager batch (tests/test_batch.py), the same tokens as alone."""
    from test_batch import check, scenario

    model = with_backend(checkpoints[variant], decode="static")
    got, alone, lives = scenario(model)
    check(got, alone, lives)
