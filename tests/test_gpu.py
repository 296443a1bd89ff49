"""The CUDA fast path against transformers on the GPU; skipped where torch sees no CUDA.

fp32 greedy tokens equal transformers' exactly; fp16 greedy tokens equal transformers' fp16
for at least 90% of 20 prompts (fp16 rounding can flip close calls; the first divergence is
printed, run with -s); the graph replays exactly what the static step computes eagerly;
a frame's vision graph equals the eager tower; INT8 logits stay close to fp16."""

import numpy as np
import pytest
import torch
import transformers

import m4
from m4.model.int8 import Int8Linear
from m4.runtime.torch_backend import TorchBackend

from conftest import VARIANTS, random_images
from test_parity import QUESTIONS, oracle_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")

PROMPTS = ["Describe the scene.", "What changed between the images?", "Which object moves left?",
           "How many shapes are there?", "What colour is the square?"]


@pytest.fixture(scope="module")
def cuda_oracle():
    models = {}

    def get(path, dtype):
        if (path, dtype) not in models:
            models[path, dtype] = transformers.LlavaForConditionalGeneration.from_pretrained(
                path, dtype=dtype, attn_implementation="sdpa").to("cuda").eval()
        return models[path, dtype]

    return get


def cuda_model(path, dtype, **kw):
    model = m4.load(path, backend="torch")
    model.backend = TorchBackend(path, model.arch, "cuda", dtype, **kw)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_graphs_equal_transformers(checkpoints, cuda_oracle, variant):
    path = checkpoints[variant]
    model = cuda_model(path, "float32")
    assert model.backend.mode == "graph"
    for n, question in QUESTIONS.items():
        images = random_images(n, seed=n)
        p, pictures = model.prepare(question, images, None, None, False)
        ours = list(model.tokens(question, images=images, max_new_tokens=12))
        assert ours == oracle_tokens(cuda_oracle(path, torch.float32), model, p, pictures, 12), f"{n} images"


def test_fp16_agrees_with_transformers_fp16(checkpoints, cuda_oracle):
    results = []
    for i in range(20):
        variant = list(VARIANTS)[i % len(VARIANTS)]
        path, question, n = checkpoints[variant], PROMPTS[i % len(PROMPTS)], 1 + i % 3
        model = cuda_model(path, "float16")
        images = random_images(n, seed=100 + i)
        p, pictures = model.prepare(question, images, None, None, False)
        ours = list(model.tokens(question, images=images, max_new_tokens=12))
        ref = oracle_tokens(cuda_oracle(path, torch.float16), model, p, pictures, 12)
        results.append((i, variant, n, ours, ref))
    same = [r for r in results if r[3] == r[4]]
    diverged = [r for r in results if r[3] != r[4]]
    print(f"\nfp16 CUDA vs transformers fp16: {len(same)}/20 prompts give equal greedy tokens")
    if diverged:
        i, variant, n, ours, ref = diverged[0]
        at = next((k for k, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
        print(f"first divergence: prompt {i} ({variant}, {n} images) at token {at}: m4 {ours[at:at + 4]}, "
              f"transformers {ref[at:at + 4]}")
    assert len(same) >= 18


def test_graph_replays_the_static_step(checkpoints):
    path = checkpoints["gqa-tied-last-full"]
    graph, static = cuda_model(path, "float32"), cuda_model(path, "float32", decode="static")
    images = random_images(2, seed=3)
    answers = [list(m.tokens(QUESTIONS[2], images=images, max_new_tokens=16)) for m in (graph, static)]
    assert answers[0] == answers[1]
    live = graph.stream(window=2)
    for f in random_images(3, seed=4):
        live.add_frame(f)
    first = live.ask("What is happening?", max_new_tokens=8)
    graphs = graph.backend.graphs.graphs
    key = graph.backend.graphs.key([live.ctx.cache], 1)
    step = graphs[key]
    assert live.ask("What is happening?", max_new_tokens=8) == first
    assert graphs[key] is step  # one decode graph per cache
    # the second frame's tokens, a chunk length this cache had prefilled, went through a graph
    assert any(k[0] == key[0] and k[1] > 1 for k in graphs)


def test_frame_graph_equals_eager(checkpoints):
    model = cuda_model(checkpoints["mha-untied-penult-default"], "float32")
    b = model.backend
    pixels = np.stack([np.random.default_rng(i).random((3, 32, 32), dtype=np.float32) for i in range(3)])
    with torch.inference_mode():
        eager = b.model.encode_images(torch.from_numpy(pixels).cuda())
    for i in range(3):  # one frame at a time: the graph, replayed on new pixels
        torch.testing.assert_close(b.encode_images(pixels[i:i + 1])[0], eager[i], atol=1e-5, rtol=1e-5)
    assert b.frame_graph is not None
    torch.testing.assert_close(b.encode_images(pixels), eager)  # a batch: eager


def test_int8_on_cuda_close_to_fp16(checkpoints):
    torch.manual_seed(0)
    q = Int8Linear(torch.nn.Linear(256, 96).cuda().half())
    print(f"\ntorch._weight_int8pack_mm on CUDA fp16: {'yes' if q.fused else 'no (dequantise, then matmul)'}")
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    y = q(x)
    q.fused = False
    torch.testing.assert_close(y, q(x), atol=2e-2, rtol=2e-2)

    path = checkpoints["gqa-tied-last-full"]
    fp16, int8 = cuda_model(path, "float16"), cuda_model(path, "int8")
    p, pictures = fp16.prepare(QUESTIONS[2], random_images(2, seed=7), None, None, False)
    a, b = (m.backend.forward(m.embed(p, pictures), 0, m.backend.new_cache(len(p.ids)), last_only=False)
            for m in (fp16, int8))
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    agree = np.mean(a.argmax(-1) == b.argmax(-1))
    print(f"int8 vs fp16 prompt logits: cosine min {cos.min():.4f}, top-1 agreement {agree:.3f}")
    assert cos.min() > 0.99 and agree >= 0.85


def test_compiled_step_equals_transformers(checkpoints, cuda_oracle):
    path = checkpoints["mha-tied-last-default"]
    model = cuda_model(path, "float32")
    model.backend.compile()
    images = random_images(2, seed=5)
    p, pictures = model.prepare(QUESTIONS[2], images, None, None, False)
    ours = list(model.tokens(QUESTIONS[2], images=images, max_new_tokens=12))
    assert ours == oracle_tokens(cuda_oracle(path, torch.float32), model, p, pictures, 12)


@pytest.mark.parametrize("variant", ["gqa-tied-last-full", "llama3.1-clip-gqa-untied-last-full"])
def test_fp32_batched_graphs_equal_each_context_alone(checkpoints, variant):
    """Several contexts' decode steps replayed from one CUDA graph per set of contexts: each
    answer's tokens equal its tokens alone (tests/test_batch.py's scenario)."""
    from test_batch import check, scenario

    model = cuda_model(checkpoints[variant], "float32")
    got, alone, lives = scenario(model)
    check(got, alone, lives)
    assert any(len(ptrs) > 1 for ptrs, _ in model.backend.graphs.graphs)  # the batched steps were captured
