"""Constrained answers: every answer matches its constraint (JSON that validates against its
schema, a regex matched whole, one of the choices) on torch and both ONNX graphs, for every
checkpoint family the tests build, alone and in batches whose rows carry different
constraints; where the model's own greedy answer already complies, the constraint changes
none of its tokens."""

import json

import pytest
from PIL import Image

import m4
from m4.errors import M4Error
from m4.constraint import allowed
from m4.runtime.answer import Batch, guide_for
from m4.runtime.context import Context
from m4.runtime.sampling import Sampling

from conftest import GRAPHS, VARIANTS, random_images
from constraints import ALL, BUDGET, valid
from test_cli import m4_in_process

QUESTION = "Where is it, and what is it doing?"
BACKENDS = ["torch", *GRAPHS]


@pytest.fixture(scope="module")
def loaded(checkpoints, models):
    """(variant, backend) -> the model: the checkpoint on torch, or its bundle on one graph."""
    cache = {}

    def get(variant, backend):
        if (variant, backend) not in cache:
            cache[variant, backend] = (m4.load(checkpoints[variant], backend="torch") if backend == "torch"
                                       else models[variant, backend])
        return cache[variant, backend]
    return get


def constrained(kind, spec) -> Sampling:
    return Sampling().constrained(**{kind: spec})


def batched(model, asked, budget=BUDGET):
    """Each (prompt, pictures, sampling) answered in one Batch: their token lists, in order."""
    batch, answers = Batch(), []
    for p, pics, s in asked:
        answers.append(batch.join(model.start(p, pics, budget, s)))
    got = {id(a): [] for a in answers}
    while len(batch):
        for a, token in batch.step():
            got[id(a)].append(token)
    return [got[id(a)] for a in answers]


def text(model, tokens) -> str:
    return "".join(model.tokenizer.detokenize(tokens))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_answer_matches_its_constraint_alone_and_batched(loaded, variant, backend):
    model = loaded(variant, backend)
    p, pics = model.prepare(QUESTION)
    rows = batched(model, [(p, pics, constrained(kind, spec)) for kind, spec in ALL])
    wrong = [(spec, text(model, t)) for (kind, spec), t in zip(ALL, rows) if not valid(text(model, t), kind, spec)]
    assert not wrong
    for (kind, spec), tokens in list(zip(ALL, rows))[7::25]:  # alone: the same tokens as in the batch
        assert list(model.start(p, pics, BUDGET, constrained(kind, spec)).alone()) == tokens, spec


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_constraint_changes_a_token_only_where_the_model_breaks_it(loaded, variant, backend):
    """Each token of a constrained answer is the model's own greedy token wherever the
    constraint allows that one, and else the best of those it allows: held against the
    logits of the prompt and the answer in one forward pass (teacher-forced), the mask
    replayed by a fresh walk of the constraint. (A random model's free answers are rarely
    text a constraint could admit whole: they hold special tokens and broken characters.)"""
    model = loaded(variant, backend)
    p, pics = model.prepare("What is in <image>?", images=random_images(1, seed=3))
    embeds = model.embed(p, pics)
    for kind, spec in (ALL[12], ALL[21], ("regex", r"[a-z ]{1,12}"), ("choices", ["up", "down", "left"])):
        s = constrained(kind, spec)
        tokens = list(model.start(p, pics, BUDGET, s).alone())
        ctx = Context(model.backend, len(p.ids) + len(tokens))
        fed = [embeds] + ([model.backend.embed_tokens(tokens[:-1])] if len(tokens) > 1 else [])
        logits = model.backend.forward(model.backend.concat(fed), 0, ctx.cache, last_only=False)[len(p.ids) - 1:]
        walk = guide_for(s, model.tokenizer, model.backend, model.stop_ids)
        for step, token in zip(logits, tokens):
            ok = allowed([walk])[0]
            own = int(step.argmax())
            assert token == own if ok[own] else step[token] >= step[ok].max() - 1e-4, (spec, tokens)
            walk.accept(token)
        assert valid(text(model, tokens), kind, spec)


def test_the_demo_model_s_compliant_answers_are_unchanged(held_out_synth):
    """The shipped model answers direction questions with a direction: held to the four, its
    tokens are the same."""
    model = m4.load("demo", backend="torch")
    records = json.loads((held_out_synth / "bench.json").read_text())
    asked = [r for r in records if r["metadata"]["dataset"] == "motion"][:3]
    directions = Sampling().constrained(choices=["up", "down", "left", "right"])
    for r in asked:
        p, pics = model.prepare(r["conversations"][0]["value"], images=[held_out_synth / f for f in r["image"]])
        free = list(model.start(p, pics, 8).alone())
        assert text(model, free) in ("up", "down", "left", "right")
        assert list(model.start(p, pics, 8, directions).alone()) == free


def test_a_live_context_and_ask_together_answer_within_their_constraints(loaded):
    model = loaded("llama-clip-mha-tied-penult-default", "torch")
    frames = random_images(3, seed=5)
    lives = [model.stream(window=2, max_new_tokens=BUDGET) for _ in range(3)]
    for i, live in enumerate(lives):
        live.add_frame(frames[i])
    asked = [("schema", ALL[11][1]), ("regex", r"(left|right) [0-9]{1,2}"), ("choices", ["yes", "no"])]
    alone = [live.ask("What is happening?", **{k: v}) for live, (k, v) in zip(lives, asked)]
    assert all(valid(a, k, v) for a, (k, v) in zip(alone, asked))
    together = m4.ask_together([(live, "What is happening?", constrained(k, v).constraint)
                                for live, (k, v) in zip(lives, asked)], BUDGET)
    assert together == alone and not any(live.answering for live in lives)


def test_an_answer_that_runs_out_of_tokens_is_a_valid_beginning(loaded):
    model = loaded("gqa-tied-last-full", "torch")
    p, pics = model.prepare(QUESTION)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    answer = model.start(p, pics, 3, Sampling().constrained(schema=schema))
    tokens = list(answer.alone())
    assert len(tokens) == 3 and answer.finish_reason == "length"
    assert text(model, tokens).startswith("{")
    ended = model.start(p, pics, BUDGET, Sampling().constrained(choices=["yes", "no"]))
    assert text(model, list(ended.alone())) in ("yes", "no") and ended.finish_reason == "stop"


@pytest.mark.parametrize("kwargs, match", [
    ({"schema": {"type": "string", "format": "not-a-format"}}, "unsupported JSON schema"),
    ({"schema": "{not json"}, "not JSON"),
    ({"schema": [1, 2]}, "a JSON schema is an object"),
    ({"regex": "(abc"}, "unsupported regex"),
    ({"regex": r"(?=a)b"}, "unsupported regex"),
    ({"choices": []}, "non-empty list"),
    ({"choices": "yes,no"}, "non-empty list"),
    ({"choices": ["yes"], "regex": "y"}, "one way"),
])
def test_a_constraint_that_cannot_be_built_is_one_clear_error(loaded, kwargs, match):
    model = loaded("gqa-tied-last-full", "torch")
    with pytest.raises(M4Error, match=match) as e:
        model.ask(QUESTION, max_new_tokens=4, **kwargs)
    assert "\n" not in str(e.value).strip()


def test_a_pydantic_model_is_a_schema(loaded):
    pydantic = pytest.importorskip("pydantic")

    class Move(pydantic.BaseModel):
        direction: str = pydantic.Field(pattern="^(up|down)$")
        steps: int = pydantic.Field(ge=0, le=9)

    model = loaded("mha-tied-last-default", "torch")
    Move.model_validate_json(model.ask(QUESTION, max_new_tokens=BUDGET, schema=Move))


def test_every_constraint_through_m4_run(checkpoints, loaded, tmp_path):
    """Each of the constraints as `m4 run`'s flag, on a still image: the answer valid, and the
    one Model.ask gives."""
    ck = checkpoints["mha-untied-penult-default"]
    image = tmp_path / "a.png"
    Image.fromarray(random_images(1, seed=8)[0]).save(image)
    model = loaded("mha-untied-penult-default", "torch")
    for i, (kind, spec) in enumerate(ALL):
        if kind == "schema":
            (tmp_path / f"{i}.json").write_text(json.dumps(spec))
        flag = ["--json-schema", tmp_path / f"{i}.json"] if kind == "schema" else ["--regex", spec]
        r = m4_in_process("run", "--model", ck, "--images", image, "--prompt", QUESTION, "--max-new-tokens",
                          BUDGET, "--json", *flag)
        assert r.returncode == 0, r.stderr
        (answer,) = [e["text"] for e in map(json.loads, r.stdout.splitlines()) if e["event"] == "answer"]
        assert valid(answer, kind, spec), (spec, answer)
        assert answer == model.ask(QUESTION, images=[image], max_new_tokens=BUDGET, **{kind: spec})


def test_every_constraint_through_live_contexts_answering_together(loaded):
    """Each of the constraints on a live context of its own, all answered in one batch."""
    model = loaded("llama-siglip-gqa-untied-penult-default", "torch")
    frames = random_images(2, seed=9)
    lives = [model.stream(window=1, max_new_tokens=BUDGET) for _ in ALL]
    for i, live in enumerate(lives):
        live.add_frame(frames[i % 2])
    answers = m4.ask_together([(live, QUESTION, constrained(k, s).constraint) for live, (k, s) in zip(lives, ALL)],
                              BUDGET)
    assert all(valid(a, k, s) for a, (k, s) in zip(answers, ALL))
    assert answers[::9] == [live.ask(QUESTION, **{k: s}) for live, (k, s) in list(zip(lives, ALL))[::9]]
