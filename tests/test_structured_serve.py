"""Structured answers over HTTP, as clients ask for them: the official openai client's
`parse` with a pydantic model, `tools` with tool_choice required or named (OpenAI's
`tool_calls` back), vLLM's guided fields and `structured_outputs`, live sessions' questions.
Served from a bundle (the torch-free path). Every answer validates; each equals the same
constrained question asked in process; every refusal is a 400 naming its field, and the
server answers the next request."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pydantic = pytest.importorskip("pydantic")
openai = pytest.importorskip("openai")

import m4  # noqa: E402
from m4.bundle_format import ORT_DECODER  # noqa: E402

from constraints import ALL, BUDGET, SCHEMAS, valid, valid_json  # noqa: E402
from test_serve import TINY, client, good, serve  # noqa: E402

QUESTION = "Where is the robot going?"


class Move(pydantic.BaseModel):
    direction: str = pydantic.Field(pattern="^(up|down|left|right)$")
    steps: int = pydantic.Field(ge=0, le=9)


GRIP = {"type": "function", "function": {"name": "grip", "parameters": {
    "type": "object", "properties": {"force": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["force"], "additionalProperties": False}}}
MOVE = {"type": "function", "function": {"name": "move", "parameters": {**Move.model_json_schema(), "additionalProperties": False}}}


@pytest.fixture(scope="module")
def bundle(paths):
    return m4.load(paths[TINY, ORT_DECODER])


@pytest.fixture(scope="module")
def url(bundle):
    with serve(bundle, max_queue=64) as u:
        yield u


def chat(url, **body):
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": BUDGET, **body}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def test_the_openai_client_parses_a_pydantic_model(url, bundle):
    r = client(url).chat.completions.parse(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                           response_format=Move, max_tokens=BUDGET)
    move = r.choices[0].message.parsed
    assert isinstance(move, Move) and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == bundle.ask(QUESTION, max_new_tokens=BUDGET, schema=Move)


@pytest.mark.parametrize("stream", [False, True])
def test_tools_required_answer_with_a_call_whose_arguments_validate(url, stream):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (GRIP, MOVE)}
    c = client(url)
    args = dict(model="tiny", messages=[{"role": "user", "content": QUESTION}], tools=[GRIP, MOVE],
                tool_choice="required", max_tokens=BUDGET)
    if stream:
        chunks = list(c.chat.completions.create(stream=True, **args))
        (call,) = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finish == ["tool_calls"]
    else:
        r = c.chat.completions.create(**args)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        (call,) = r.choices[0].message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert valid_json(call.function.arguments, schemas[call.function.name])


def test_a_named_tool_is_called(url):
    r = client(url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], tools=[GRIP, MOVE], max_tokens=BUDGET,
        tool_choice={"type": "function", "function": {"name": "grip"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "grip" and valid_json(call.function.arguments, GRIP["function"]["parameters"])


@pytest.mark.parametrize("body, kind, spec", [
    ({"guided_choice": ["yes", "no"]}, "choices", ["yes", "no"]),
    ({"guided_regex": r"[0-9]{3}-[0-9]{4}"}, "regex", r"[0-9]{3}-[0-9]{4}"),
    ({"guided_json": SCHEMAS[11]}, "schema", SCHEMAS[11]),
    ({"structured_outputs": {"choice": ["left", "right"]}}, "choices", ["left", "right"]),
    ({"structured_outputs": {"regex": r"#[0-9a-f]{6}", "disable_any_whitespace": True}}, "regex", r"#[0-9a-f]{6}"),
    ({"structured_outputs": {"json": SCHEMAS[16]}}, "schema", SCHEMAS[16]),
    ({"response_format": {"type": "json_object"}}, "schema", {"type": "object"}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[22], "strict": True}}},
     "schema", SCHEMAS[22]),
])
def test_vllm_and_openai_fields_constrain_the_answer(url, bundle, body, kind, spec):
    text = chat(url, **body).json()["choices"][0]["message"]["content"]
    assert valid(text, kind, spec)
    assert text == bundle.ask(QUESTION, max_new_tokens=BUDGET, **{kind: spec})


def test_concurrent_requests_with_different_constraints_each_validate(url, bundle):
    """Every constraint of the tests' set, its requests in flight together: they share each
    decode step, each row under its own mask."""
    asked = ALL
    body = {"schema": "guided_json", "regex": "guided_regex"}
    with ThreadPoolExecutor(len(asked)) as pool:
        replies = list(pool.map(lambda ks: chat(url, **{body[ks[0]]: ks[1]}).json(), asked))
    texts = [r["choices"][0]["message"]["content"] for r in replies]
    assert all(valid(t, k, s) for t, (k, s) in zip(texts, asked))
    assert texts == [bundle.ask(QUESTION, max_new_tokens=BUDGET, **{k: s}) for k, s in asked]


def test_a_session_question_takes_a_constraint(url):
    sid = httpx.post(url + "/v1/sessions", json={"source": "demo", "window": 2, "fps": 50}).json()["id"]
    try:
        r = httpx.post(url + f"/v1/sessions/{sid}/ask", json={"question": "Which way?", "choices": ["up", "down"]},
                       timeout=120)
        assert r.status_code == 200 and r.json()["text"] in ("up", "down")
        bad = httpx.post(url + f"/v1/sessions/{sid}/ask", json={"question": "Which way?", "regex": "(?=x)"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "regex"
    finally:
        httpx.delete(url + f"/v1/sessions/{sid}")


@pytest.mark.parametrize("body, param", [
    ({"tools": [GRIP]}, "tool_choice"),  # auto, the default: the model would choose text or a call
    ({"tools": [GRIP], "tool_choice": "auto"}, "tool_choice"),
    ({"tools": [GRIP], "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "required"}, "tools[0]"),
    ({"tools": "grip"}, "tools"),
    ({"functions": [{"name": "grip"}]}, "functions"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "string", "format": "not-a-format"}}}}, "response_format.json_schema.schema"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "root ::= \"a\""}, "guided_grammar"),
    ({"structured_outputs": {"choice": ["a"], "regex": "b"}}, "structured_outputs"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice"),
])
def test_a_constraint_that_cannot_be_served_is_a_400_naming_its_field(url, body, param):
    r = chat(url, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and "\n" not in r.json()["error"]["message"]
    good(url)


def test_tool_choice_none_answers_text(url, bundle):
    r = chat(url, tools=[GRIP], tool_choice="none", max_tokens=6).json()["choices"][0]
    assert r["message"]["content"] == bundle.ask(QUESTION, max_new_tokens=6) and "tool_calls" not in r["message"]


def test_a_call_cut_short_is_text_with_finish_reason_length(url):
    r = chat(url, tools=[MOVE], tool_choice="required", max_tokens=3).json()["choices"][0]
    assert r["finish_reason"] == "length" and r["message"]["content"].startswith("{")
    assert json.dumps(r["message"]).count("tool_calls") == 0
