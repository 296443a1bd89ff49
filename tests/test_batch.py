"""Batched decoding: the answers of several contexts decoded together, one step for all, are
each the answer that context gets alone (and so transformers'): contexts of different
lengths, joining and leaving mid-answer, a window evicting while others decode; on torch and
on both ONNX graphs, for every checkpoint family the tests build."""

import pytest

import m4
from m4.bundle_format import ORT_DECODER
from m4.errors import M4Error
from m4.runtime.answer import Batch

from conftest import GRAPHS, VARIANTS, random_images
from test_parity import oracle_tokens

N = 10


def feed(live, frames):
    for f in frames:
        live.add_frame(f)
    return live


def scenario(model):
    """Four answers through one Batch, with joins, a leave and an eviction between steps:
    (name -> tokens given) batched, and (name -> tokens) each alone from the same state."""
    frames = random_images(9, seed=11)
    # c first: on a pooled backend its slot is below the others', in their steps while it waits
    c = feed(model.stream(window=2, max_new_tokens=N), frames[4:6])  # full: its next frame evicts
    a = feed(model.stream(window=2, max_new_tokens=N), frames[:3])  # evicted once already
    b = feed(model.stream(window=3, max_new_tokens=N), frames[3:4])  # the shortest
    twin = feed(model.stream(window=2, max_new_tokens=N), frames[4:7])  # c after that frame
    p, pics = model.prepare("What changed between <image> and <image>?", images=frames[7:9])
    alone = {"a": list(a.tokens("What is happening?")), "b": list(b.tokens("Which way does it move?", 6)),
             "c": list(twin.tokens("What colour is it?", sampling=m4.Sampling(0.8, seed=1))),
             "p": list(model.start(p, pics, N).alone())}

    batch, got = Batch(), {}

    def join(name, answer):
        got[name] = []
        names[id(answer)] = name
        return batch.join(answer)

    def step(times=1):
        for _ in range(times):
            for answer, token in batch.step():
                got[names[id(answer)]].append(token)

    names: dict[int, str] = {}
    join("a", a.start("What is happening?"))
    pa = join("p", model.start(p, pics, N))
    step(3)
    join("b", b.start("Which way does it move?", 6))  # joins mid-answer
    step(2)
    c.add_frame(frames[6])  # evicts while the others decode
    batch.leave(pa)  # its client left: the others go on
    join("c", c.start("What colour is it?", sampling=m4.Sampling(0.8, seed=1)))  # sampled beside greedy rows
    while len(batch):
        step()
    return got, alone, (a, b, c)


def check(got, alone, lives):
    assert got["p"] == alone["p"][:len(got["p"])] and 0 < len(got["p"]) < len(alone["p"])
    for name in "abc":
        assert got[name] == alone[name], name
    a, b, c = lives  # the batch left no trace in any of them
    assert list(a.tokens("What is happening?")) == alone["a"]
    assert list(b.tokens("Which way does it move?", 6)) == alone["b"]
    assert list(c.tokens("What colour is it?", sampling=m4.Sampling(0.8, seed=1))) == alone["c"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_batch_equals_each_context_alone(checkpoints, oracle, variant):
    model = m4.load(checkpoints[variant], backend="torch")
    calls = []
    hook = model.backend.model.text.register_forward_hook(lambda *x: calls.append(x[1][0].shape[0]))
    got, alone, lives = scenario(model)
    hook.remove()
    check(got, alone, lives)
    assert max(calls) >= 3  # rows of one forward: the decode steps were batched
    # and alone is transformers'
    frames = random_images(9, seed=11)
    p, pics = model.prepare("What changed between <image> and <image>?", images=frames[7:9])
    assert list(model.start(p, pics, N).alone()) == oracle_tokens(oracle(checkpoints[variant]), model, p, pics, N)


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_batch_equals_each_context_alone(paths, variant, graph):
    model = m4.load(paths[variant, graph])
    got, alone, lives = scenario(model)
    check(got, alone, lives)
    if graph == ORT_DECODER:  # the live contexts share a page: their rows ran as one batch
        (page,) = {id(live.ctx.cache.page): live.ctx.cache.page for live in lives}.values()
        assert max(page.steps) >= 3


def test_a_live_context_takes_no_frame_while_answering(checkpoints):
    model = m4.load(checkpoints["gqa-tied-last-full"], backend="torch")
    live = feed(model.stream(window=2), random_images(1))
    answer = live.start("What is happening?", 4)
    with pytest.raises(M4Error, match="answering"):
        live.add_frame(random_images(1)[0])
    with pytest.raises(M4Error, match="answering"):
        live.start("And now?")
    answer.close()
    live.add_frame(random_images(1)[0])
    assert live.stats["frames_seen"] == 2


def test_pooled_caches_free_their_slots(paths):
    """A context that goes gives its slot back: contexts made one after another reuse it."""
    model = m4.load(paths["gqa-tied-last-full", ORT_DECODER])
    slots = []
    for _ in range(3):
        live = model.stream(window=2)
        slots.append(live.ctx.cache.slot)
        del live
    assert slots == [0, 0, 0]


def test_ask_together_answers_as_each_context_alone(checkpoints):
    model = m4.load(checkpoints["llama-clip-mha-tied-penult-default"], backend="torch")
    frames = random_images(5, seed=4)
    lives = [feed(model.stream(window=2, max_new_tokens=8), frames[i:i + 1 + i]) for i in range(3)]
    questions = ["What is happening?", "Which way?", "What colour?"]
    alone = [live.ask(q) for live, q in zip(lives, questions)]
    rows = []
    hook = model.backend.model.text.register_forward_hook(lambda *x: rows.append(x[1][0].shape[0]))
    assert m4.ask_together(list(zip(lives, questions))) == alone
    hook.remove()
    assert max(rows) == 3 and all(not live.answering for live in lives)


def test_ask_together_refuses_one_context_twice_and_leaves_no_trace(checkpoints):
    model = m4.load(checkpoints["gqa-tied-last-full"], backend="torch")
    live = feed(model.stream(window=2, max_new_tokens=6), random_images(2))
    alone = live.ask("What is happening?")
    with pytest.raises(M4Error, match="answering"):
        m4.ask_together([(live, "What is happening?"), (live, "Which way?")])
    assert not live.answering and live.ask("What is happening?") == alone
