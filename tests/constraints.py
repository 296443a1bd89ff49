"""The constraints the tests hold answers to: JSON schemas of the kinds robotics stacks send
(objects, enums, nested objects and arrays, bounded numbers, required and optional fields,
string patterns) and regexes. Each admits only answers of bounded length, so an answer of a
random model (its text is noise) ends within the tests' token budget."""

import json
import re

import jsonschema

WORD = {"type": "string", "maxLength": 6}
SMALL = {"type": "integer", "minimum": 0, "maximum": 99}


def obj(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


SCHEMAS = [
    {"enum": ["up", "down", "left", "right"]},
    {"type": "boolean"},
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"type": "integer", "minimum": 100, "maximum": 250},
    {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},
    {"type": "string", "maxLength": 4},
    {"type": "string", "pattern": "^[a-z]{1,5}$"},
    {"type": "string", "enum": ["red", "green", "blue"]},
    {"const": "stop"},
    {"type": "null"},
    obj({"dir": {"enum": ["up", "down"]}}),
    obj({"dir": {"enum": ["up", "down"]}, "n": SMALL}),
    obj({"ok": {"type": "boolean"}, "why": WORD}),
    obj({"x": SMALL, "y": SMALL, "z": SMALL}),
    obj({"label": WORD, "score": {"type": "integer", "minimum": 0, "maximum": 10}}, required=["label"]),
    obj({"a": SMALL, "b": SMALL, "c": WORD}, required=[]),
    obj({"target": obj({"x": SMALL, "y": SMALL})}),
    obj({"pose": obj({"pos": obj({"x": SMALL, "y": SMALL}), "yaw": SMALL})}),
    obj({"items": {"type": "array", "items": WORD, "maxItems": 3}}),
    obj({"ids": {"type": "array", "items": SMALL, "minItems": 1, "maxItems": 4}}),
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 2},
    {"type": "array", "items": obj({"k": WORD, "v": SMALL}), "maxItems": 2},
    obj({"color": {"enum": ["red", "green", "blue"]}, "count": SMALL, "seen": {"type": "boolean"}}),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}}),
    obj({"when": {"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$"}, "what": WORD}),
    obj({"kind": {"const": "move"}, "dx": {"type": "integer", "minimum": -9, "maximum": 9}}),
    {"anyOf": [obj({"stop": {"type": "boolean"}}), obj({"go": SMALL})]},
    {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["none"]}]},
    obj({"grid": {"type": "array", "items": {"type": "array", "items": {"enum": [0, 1]}, "maxItems": 2},
                  "maxItems": 2}}),
    obj({"name": WORD, "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
         "meta": obj({"v": SMALL}, required=[])}, required=["name"]),
    {"$defs": {"pt": obj({"x": SMALL, "y": SMALL})}, "type": "object",
     "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
     "required": ["from", "to"], "additionalProperties": False},
    obj({"level": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.5}, "unit": {"const": "m"}}),
]

REGEXES = [
    r"(yes|no)",
    r"[a-z]{2,5}",
    r"[0-9]{3}-[0-9]{4}",
    r"[A-Z][a-z]{0,6}",
    r"(left|right) [0-9]{1,2}",
    r"#[0-9a-f]{6}",
    r"(up|down|left|right)(, (up|down|left|right)){0,2}",
    r"[0-9]{1,3}\.[0-9]{1,2}",
    r"x=-?[0-9]{1,2}, y=-?[0-9]{1,2}",
    r"(red|green|blue) (circle|square)",
    r"\(image [1-4]\)",
]

BUDGET = 96  # tokens: more than any answer these admit takes, in a tiny tokenizer's pieces


def valid_json(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def valid(text: str, kind: str, spec) -> bool:
    if kind == "schema":
        return valid_json(text, spec)
    if kind == "regex":
        return re.fullmatch(spec, text) is not None
    return text in spec


ALL = [("schema", s) for s in SCHEMAS] + [("regex", r) for r in REGEXES]
