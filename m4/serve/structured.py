"""Structured answers over the chat API: the request's way of constraining its answer read
into one m4.constraint.Constraint, and an answer that calls a tool written back as OpenAI's
`tool_calls`.

Ways in, at most one per request: OpenAI's `response_format` (`json_object`, or
`json_schema` with its `schema`), `tools` with `tool_choice` "required" or a named function
(the answer is the arguments of a call), and vLLM's extra fields (`guided_choice`,
`guided_regex`, `guided_json`, and the newer `structured_outputs` object with `choice`,
`regex`, `json` or `json_object`). `tool_choice` "auto" would let the model choose between
text and a call, which needs the model's own tool-call format: it is refused, as is a
grammar in a syntax m4 does not read.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from m4.constraint import Constraint
from m4.errors import M4Error
from m4.serve.errors import ApiError

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
WAYS = ("choice", "regex", "json", "json_object", "grammar", "structural_tag")  # structured_outputs' (its other keys are options)


@dataclass(frozen=True)
class Tools:
    """The answer is a tool call: of the one function `named`, its arguments only; else an
    object {"name": ..., "arguments": {...}} for any of the tools."""

    names: tuple[str, ...]
    named: str | None

    def call(self, text: str) -> dict[str, Any] | None:
        """The answer's text as OpenAI's tool call; None where it is not one (its tokens ran
        out before the JSON ended)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        name, args = (self.named, value) if self.named else (value["name"], value["arguments"])
        return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)}}


Asked = tuple[Constraint | None, Tools | None, str | None]  # the constraint, the tools, the field it came from


def bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, "invalid_request", param)


def structured(body: dict[str, Any]) -> Asked:
    """The request's constraint on its answer (None: free text), where the answer is a tool
    call its tools, and the field that asked. A field malformed, several ways at once, or a
    schema the grammar engine cannot read: a 400 naming the field."""
    ways = [(param, f) for param, f in (("response_format", response_format), ("tools", tools),
                                        ("guided_choice", guided), ("guided_regex", guided),
                                        ("guided_json", guided), ("guided_grammar", guided),
                                        ("structured_outputs", structured_outputs))
            if body.get(param) is not None]
    found = [(param, f(body, param)) for param, f in ways]
    found = [(param, got) for param, got in found if got[0] is not None]
    if len(found) > 1:
        raise bad(f"constrain the answer one way: got {' and '.join(p for p, _ in found)}", found[1][0])
    return found[0][1] if found else (None, None, None)


def constraint(param: str, make, *args: Any) -> Constraint:
    """Constraint.<make>(*args), its error a 400 naming `param`."""
    try:
        return make(*args)
    except M4Error as e:
        raise bad(f"{param}: {e}", param) from None


def response_format(body: dict[str, Any], param: str) -> Asked:
    rf = body[param]
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None, None, None
    if kind == "json_object":
        return constraint(param, Constraint.json_schema, {"type": "object"}), None, param
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad(f"{param}.json_schema.schema must be a JSON schema object", f"{param}.json_schema.schema")
        param += ".json_schema.schema"
        return constraint(param, Constraint.json_schema, schema), None, param
    raise bad(f"{param}.type must be text, json_object or json_schema, got {kind!r}", f"{param}.type")


def guided(body: dict[str, Any], param: str) -> Asked:
    return way(param, param.removeprefix("guided_"), body[param]), None, param


def structured_outputs(body: dict[str, Any], param: str) -> Asked:
    so = body[param]
    if not isinstance(so, dict):
        raise bad(f"{param} must be an object", param)
    given = {k: v for k, v in so.items() if k in WAYS and v is not None and v is not False}
    if len(given) != 1:
        raise bad(f"{param} holds one of choice, regex, json or json_object", param)
    (key, value), = given.items()
    param += "." + key
    if key == "json_object":
        return constraint(param, Constraint.json_schema, {"type": "object"}), None, param
    return way(param, key, value), None, param


def way(param: str, key: str, value: Any) -> Constraint:
    """vLLM's `choice`, `regex` or `json` (a schema, or its JSON text)."""
    if key == "choice":
        return constraint(param, Constraint.choices, value)
    if key == "regex":
        return constraint(param, Constraint.regex, value)
    if key == "json":
        return constraint(param, Constraint.json_schema, value)
    raise bad(f"{param}: m4 constrains answers by choice, regex or json (a JSON schema)", param)


def tools(body: dict[str, Any], param: str) -> Asked:
    """`tools` and `tool_choice` -> the schema of a call's JSON (None where tool_choice is
    "none": the answer is text)."""
    listed = body[param]
    if not isinstance(listed, list) or not listed:
        raise bad(f"{param} must be a non-empty list of functions", param)
    params: dict[str, Any] = {}
    for i, t in enumerate(listed):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        f = f if isinstance(f, dict) else {}
        name = f.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name) or name in params:
            raise bad(f"{param}[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}} "
                      "with a unique name of letters, digits, _ and - (at most 64)", f"{param}[{i}]")
        schema = f.get("parameters", {"type": "object"})
        if not isinstance(schema, dict):
            raise bad(f"{param}[{i}].function.parameters must be a JSON schema object", f"{param}[{i}]")
        params[name] = schema
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return None, None, None
    if isinstance(choice, dict):
        f = choice.get("function") if choice.get("type") == "function" else None
        named = f.get("name") if isinstance(f, dict) else None
        if named not in params:
            raise bad(f"tool_choice names no function of tools: {named!r}", "tool_choice")
        return constraint(f"tools ({named})", Constraint.json_schema, params[named]), Tools((named,), named), param
    if choice != "required":
        raise bad(f"tool_choice {choice!r} is not supported: m4 answers with a call where it is \"required\" or "
                  "names a function, and with text where it is \"none\"", "tool_choice")
    calls = [{"type": "object", "properties": {"name": {"const": n}, "arguments": s},
              "required": ["name", "arguments"], "additionalProperties": False} for n, s in params.items()]
    return constraint(param, Constraint.json_schema, {"anyOf": calls}), Tools(tuple(params), None), param
