"""Requests that do not start from zero (m4.runtime.reuse): through the encoder cache and the
prefix cache, every answer is the cold answer token for token, alone and batched, on every
family the tests build, on torch and on both ONNX graphs; an image is encoded once; the
caches stay within their bounds."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

import m4
from m4.errors import M4Error
from m4.prompt import build_chat
from m4.runtime.answer import Batch
from m4.runtime.context import Context
from m4.runtime.reuse import Reuse, shared

from conftest import GRAPHS, VARIANTS, random_images

N = 8
SYSTEM = "You are the eyes of a careful robot."
QUESTIONS = ["What is in <image>?", "And what changed in <image>?", "Which one is brighter, <image>?",
             "Count the shapes in <image>."]
ANSWERS = ["A red square.", "It moved left.", "The second one.", "Three."]


def conversation(k: int, changed: bool = False) -> list:
    """The first k turns, the last one to answer; `changed`: the second question reworded."""
    turns = [(q, 1, a) for q, a in zip(QUESTIONS[:k], ANSWERS[:k - 1] + [None])]
    if changed:
        turns[1] = ("What moved in <image>?", 1, turns[1][2])
    return turns


def requests(model) -> dict:
    """name -> (prompt, pictures): four turns adding an image each, one sharing only the
    system prompt, one whose earlier turn changed."""
    images = random_images(6, seed=5, size=(40, 36))

    def prompt(turns, pictures):
        a = model.arch
        return build_chat(model.template, model.tokenizer, a.image_token_id, a.tokens_per_image, turns, SYSTEM), pictures

    out = {f"turn {k}": prompt(conversation(k), images[:k]) for k in range(1, 5)}
    out["system only"] = prompt([("Describe <image> briefly.", 1, None)], images[4:5])
    out["changed turn"] = prompt(conversation(4, changed=True), images[:4])
    return out


def cold(model, asked: dict) -> dict:
    return {name: list(model.start(p, pics, N, reuse=Reuse()).alone()) for name, (p, pics) in asked.items()}


def check_alone_and_batched(model):
    asked = requests(model)
    want = cold(model, asked)
    reuse = Reuse(image_mb=4, prefix_mb=16)
    cached = {}
    for name, (p, pics) in asked.items():
        answer = model.start(p, pics, N, reuse=reuse)
        cached[name] = answer.stats["cached_tokens"]
        assert list(answer.alone()) == want[name], name
    assert cached["turn 1"] == 0 and all(cached[f"turn {k}"] > cached[f"turn {k - 1}"] for k in (2, 3, 4))
    # the system prompt only (with the user turn's opening), and up to the changed question
    assert 0 < cached["system only"] < cached["turn 2"] < cached["changed turn"] < cached["turn 3"]
    # each turn encodes its new image; the changed turn the three after its change
    assert reuse.images.misses == 5 and reuse.images.hits == 3

    batched, batch, names = Reuse(image_mb=4, prefix_mb=16), Batch(), {}
    for name, (p, pics) in asked.items():  # each one's prefill fills the caches for those after it
        names[id(batch.join(model.start(p, pics, N, reuse=batched)))] = name
    got = {name: [] for name in asked}
    while len(batch):
        for a, token in batch.step():
            got[names[id(a)]].append(token)
    assert got == want


def check_inside_an_image(model):
    """A prefix cache that holds only the beginning of the first prompt, cut inside its image:
    the next request loads that and prefills the rest from the middle of the image."""
    asked = requests(model)
    p, pics = asked["turn 2"]
    b = model.backend
    position = b.nbytes(b.save_prefix(Context(b, 4).cache, 1))
    image_at = next(i for i, t in enumerate(p.ids) if t == model.arch.image_token_id)
    cut = image_at + model.arch.tokens_per_image // 2
    reuse = Reuse(image_mb=4, prefix_mb=(cut + 0.5) * position / 2**20)
    list(model.start(*asked["turn 1"], N, reuse=reuse).alone())
    answer = model.start(p, pics, N, reuse=reuse)
    assert answer.stats["cached_tokens"] == cut
    assert list(answer.alone()) == cold(model, {"t": (p, pics)})["t"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_reuse_answers_as_cold(checkpoints, variant):
    model = m4.load(checkpoints[variant], backend="torch")
    check_alone_and_batched(model)
    check_inside_an_image(model)


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_reuse_answers_as_cold(models, variant, graph):
    model = models[variant, graph]
    check_alone_and_batched(model)
    check_inside_an_image(model)


def test_static_torch_steps_reuse_as_cold(checkpoints):
    """Static decode steps (what CUDA graphs replay) over pooled caches: a loaded prefix is
    written into a reused buffer, stale positions past it masked."""
    from m4.runtime.torch_backend import TorchBackend

    model = m4.load(checkpoints["gqa-tied-last-full"], backend="torch")
    model.backend = TorchBackend(model.path, model.arch, decode="static")
    check_alone_and_batched(model)


def test_load_cache_mb_reuses_across_asks(checkpoints):
    model = m4.load(checkpoints["gqa-tied-last-full"], backend="torch", cache_mb=3)
    image = random_images(1, seed=9)
    first = model.ask("What is in <image>?", images=image, max_new_tokens=N)
    encoded = model.reuse.images.misses
    assert [model.ask(q, images=image, max_new_tokens=N) for q in ("What is in <image>?", "Where is <image>?")]
    assert model.reuse.images.misses == encoded == 1  # one vision run for three questions
    assert model.stats["cached_tokens"] > 0 and model.ask("What is in <image>?", images=image, max_new_tokens=N) == first
    with pytest.raises(M4Error, match="0 \\(off\\) or more MB"):
        Reuse(prefix_mb=-1)


def test_a_frame_asked_eight_questions_is_encoded_once(checkpoints):
    model = m4.load(checkpoints["gqa-tied-last-full"], backend="torch")
    reuse, frame = Reuse(image_mb=1), random_images(1, seed=3)
    calls = []
    real = model.backend.encode_images
    model.backend.encode_images = lambda px: calls.append(len(px)) or real(px)
    for k in range(8):
        p, pics = model.prepare(f"Question {k}: what is at <image>?", images=frame)
        list(model.start(p, pics, 4, reuse=reuse).alone())
    assert calls == [1] and reuse.images.hits == 7


def test_bounded_many_distinct_requests(checkpoints):
    """Many distinct requests through small caches: the bytes held never pass the bounds,
    the least recently used go (evictions counted), the most recent stay."""
    model = m4.load(checkpoints["gqa-tied-last-full"], backend="torch")
    reuse = Reuse(image_mb=0.02, prefix_mb=0.2)
    images = random_images(40, seed=21)
    for k, image in enumerate(images):
        p, pics = model.prepare(f"Request {k}: what is in <image>?", images=[image])
        list(model.start(p, pics, 2, reuse=reuse).alone())
        for c in (reuse.images, reuse.prefixes):
            assert c.bytes == sum(size for _, size in c.entries.values()) <= c.limit
    stats = reuse.stats()
    assert stats["image"]["misses"] == 40 and stats["image"]["evictions"] == 40 - len(reuse.images.entries) > 0
    assert stats["prefix"]["evictions"] > 0 and stats["prefix"]["hits"] == 39  # the system prompt, each time


def test_shared_prefix():
    assert shared((1, 2, 3), (1, 2, 4)) == 2 and shared((), (1,)) == 0 and shared((1, (b"a", 0)), (1, (b"a", 0))) == 2
    assert shared(tuple(range(1000)), tuple(range(999)) + (-1,)) == 999


def test_live_frames_through_the_encoder_cache(checkpoints):
    model = m4.load(checkpoints["gqa-tied-last-full"], backend="torch", cache_mb=1)
    frames = random_images(2, seed=4)
    a, b = model.stream(window=2, max_new_tokens=N), model.stream(window=2, max_new_tokens=N, reuse=Reuse())
    for f in frames + frames[:1]:
        a.add_frame(f)
        b.add_frame(f)
    assert model.reuse.images.misses == 2 and model.reuse.images.hits == 1
    assert a.ask("What changed?") == b.ask("What changed?")


# -- the server ----------------------------------------------------------------------------------

def chat(u: str, conv: int, turns: int, stream: bool = False) -> tuple[str, dict]:
    """Turn `turns` of conversation `conv` (an image a turn, earlier answers given) -> the
    answer and its usage."""
    import httpx
    from test_serve import image_part

    images = random_images(4, seed=100 + conv, size=(40, 36))
    messages = [{"role": "system", "content": SYSTEM}]
    for k in range(turns):
        before, after = QUESTIONS[k].split("<image>")
        messages.append({"role": "user", "content": [{"type": "text", "text": before}, image_part(images[k]),
                                                     {"type": "text", "text": after}]})
        if k < turns - 1:
            messages.append({"role": "assistant", "content": ANSWERS[k]})
    body = {"model": "tiny", "messages": messages, "max_tokens": N, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    r = httpx.post(u + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["choices"][0]["message"]["content"], r.json()["usage"]
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]), events[-1]["usage"]


def test_server_reuses_and_says_so(checkpoints):
    """A conversation resent whole each turn: cached_tokens in every usage (streamed too),
    the answers a cold server's, the caches' counts in /metrics; --no-cache turns both off."""
    from test_serve import metric, serve

    model = m4.load(checkpoints["gqa-tied-last-full"])
    with serve(model, no_cache=True) as u:
        want = {k: chat(u, 0, k) for k in range(1, 5)}
        assert all(usage["prompt_tokens_details"]["cached_tokens"] == 0 for _, usage in want.values())
        assert metric(u, 'm4_cache_limit_bytes{cache="prefix"}') == 0
    with serve(model) as u:
        for k in range(1, 5):
            text, usage = chat(u, 0, k, stream=k % 2 == 0)
            assert text == want[k][0] and usage["prompt_tokens"] == want[k][1]["prompt_tokens"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            assert (cached == 0) if k == 1 else (0 < cached < usage["prompt_tokens"])
        assert metric(u, 'm4_cache_hits_total{cache="prefix"}') == 3
        assert metric(u, 'm4_cache_misses_total{cache="image"}') == 4  # each turn's new image, once
        assert metric(u, 'm4_cache_bytes{cache="prefix"}') > 0
        assert metric(u, 'm4_cache_limit_bytes{cache="image"}') == 128 * 2**20


def test_fifty_concurrent_clients_with_repeated_and_new_conversations(checkpoints):
    """50 clients at once, 10 conversations at turns 1 to 4 (some sent twice): every answer
    is the cold server's, and the cached tokens /metrics counts are those the clients got."""
    from test_serve import metric, serve

    model = m4.load(checkpoints["gqa-tied-last-full"])
    asked = [(i % 10, 1 + i // 10 % 4) for i in range(50)]
    with serve(model, no_cache=True) as u:
        want = {a: chat(u, *a)[0] for a in set(asked)}
    with serve(model, max_queue=64) as u:
        with ThreadPoolExecutor(50) as pool:
            got = list(pool.map(lambda a: chat(u, *a), asked))
        assert [text for text, _ in got] == [want[a] for a in asked]
        cached = sum(usage["prompt_tokens_details"]["cached_tokens"] for _, usage in got)
        assert cached > 0 and metric(u, 'm4_tokens_total{kind="cached"}') == cached
        assert metric(u, 'm4_cache_hits_total{cache="prefix"}') + metric(u, 'm4_cache_misses_total{cache="prefix"}') == 50
        assert metric(u, 'm4_errors_total') == 0
