"""What an answer must match — a JSON schema, one of some choices, a regular expression — and
the grammar engine that holds an answer to it, token by token.

The engine is llguidance (the one vLLM, SGLang and llama.cpp use): it compiles a JSON schema
or a regex against the tokenizer's vocabulary and gives, before each token, the bitmask of
the tokens that keep the text on the grammar, fast enough to compute beside a decode step on
the host. It depends on nothing (no torch), so a bundle served with `[onnx,serve]` constrains
its answers too. A constraint compiles once per tokenizer and is cached; each answer walks a
copy of the compiled matcher.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

from m4.errors import M4Error
from m4.tokenizer import Tokenizer

# Between JSON tokens: nothing or one space (compact JSON, or with the usual ", " and ": "),
# never a run of whitespace: a model that leans to indentation cannot spend its tokens on it.
JSON_SPACE = r"\x20?"
MAX_CHOICES = 1024
COMPILED = 64  # compiled constraints kept per tokenizer, least recently used dropped


@dataclass(frozen=True)
class Constraint:
    """An answer's text must match `grammar` (llguidance's grammar, as JSON text); `what` names
    the constraint in errors."""

    grammar: str
    what: str

    @staticmethod
    def json_schema(schema: Any) -> Constraint:
        """A JSON schema (a dict, its JSON text, or a pydantic model class): the answer is one
        JSON value that validates against it."""
        if hasattr(schema, "model_json_schema"):  # a pydantic model, without importing pydantic
            schema = schema.model_json_schema()
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise M4Error(f"the JSON schema is not JSON: {e}") from None
        if not isinstance(schema, dict):
            raise M4Error(f"a JSON schema is an object, got {type(schema).__name__}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern": JSON_SPACE})
        except (ValueError, TypeError) as e:
            raise M4Error(f"the JSON schema cannot be read: {e}") from None
        return Constraint(grammar, "JSON schema")

    @staticmethod
    def choices(options: Sequence[str]) -> Constraint:
        """The answer is exactly one of `options`."""
        if isinstance(options, str) or not isinstance(options, Sequence) or not options:
            raise M4Error("choices must be a non-empty list of strings")
        if len(options) > MAX_CHOICES or not all(isinstance(o, str) and o for o in options):
            raise M4Error(f"choices must be at most {MAX_CHOICES} non-empty strings")
        # a Lark literal is a JSON string
        lark = "start: " + " | ".join(json.dumps(o) for o in dict.fromkeys(options))
        return Constraint(llguidance.LLMatcher.grammar_from_lark(lark), "choices")

    @staticmethod
    def regex(pattern: str) -> Constraint:
        """The whole answer matches `pattern` (as Python's re.fullmatch would; the syntax is
        Rust's regex crate: no look-around, no back-references)."""
        if not isinstance(pattern, str) or not pattern:
            raise M4Error("the regex must be a non-empty string")
        return Constraint(llguidance.LLMatcher.grammar_from_regex(pattern), "regex")

    @staticmethod
    def of(schema: Any = None, choices: Sequence[str] | None = None, regex: str | None = None) -> Constraint | None:
        """The one constraint given (None where none is); several at once is an error."""
        given = [k for k, v in (("schema", schema), ("choices", choices), ("regex", regex)) if v is not None]
        if len(given) > 1:
            raise M4Error(f"constrain an answer one way: got {' and '.join(given)}")
        if schema is not None:
            return Constraint.json_schema(schema)
        if choices is not None:
            return Constraint.choices(choices)
        return Constraint.regex(regex) if regex is not None else None


class Guide:
    """One answer held to its constraint: the tokens allowed next, the ones it took."""

    def __init__(self, matcher: llguidance.LLMatcher, grammars: Grammars):
        self.matcher, self.grammars = matcher, grammars

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise M4Error(f"token {token} breaks the answer's constraint: {self.matcher.get_error()}")

    @property
    def ended(self) -> bool:
        """The constraint admits nothing more: the answer is complete."""
        return bool(self.matcher.is_stopped())


class Grammars:
    """The grammar engine for one tokenizer and vocabulary: compiles constraints (cached) and
    computes the masks of a step's guided answers. `vocab`: the width of the model's logits
    (often more than the tokenizer's tokens, which the masks then exclude); `stops`: the
    tokens that end an answer, allowed where the constraint is complete."""

    def __init__(self, tokenizer: Tokenizer, vocab: int, stops: Iterable[int]):
        self.vocab = vocab
        self.tokenizer = llguidance.LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab, eos_token=sorted(stops))
        self.compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.executor = llguidance.LLExecutor()

    def guide(self, c: Constraint) -> Guide:
        """A fresh walk of the compiled constraint (compiled here the first time); a grammar
        the engine cannot build is an M4Error naming the constraint and why."""
        m = self.compiled.get(c.grammar)
        if m is None:
            m = llguidance.LLMatcher(self.tokenizer, c.grammar, log_level=0)
            if m.is_error():
                raise M4Error(f"unsupported {c.what}: {' '.join(m.get_error().split())}")  # an error is one line
            self.compiled[c.grammar] = m
            if len(self.compiled) > COMPILED:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(c.grammar)
        return Guide(m.deep_copy(), self)

    def allowed(self, guides: list[Guide]) -> np.ndarray:
        """(len(guides), vocab) bool: the tokens each may take next, computed together."""
        bits = allocate_token_bitmask(len(guides), self.vocab)
        fill_next_token_bitmask_par(self.executor, [(g.matcher, i) for i, g in enumerate(guides)], bits)
        return np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :self.vocab].astype(bool)


def allowed(guides: list[Guide]) -> np.ndarray:
    """(len(guides), vocab) bool: the tokens each guided answer of a step may take next, each
    engine's rows computed together."""
    out = np.empty((len(guides), guides[0].grammars.vocab), dtype=bool)
    rows: dict[int, list[int]] = {}
    for i, g in enumerate(guides):
        rows.setdefault(id(g.grammars), []).append(i)
    for r in rows.values():
        out[r] = guides[r[0]].grammars.allowed([guides[i] for i in r])
    return out


ENGINES: WeakKeyDictionary[Tokenizer, dict[tuple, Grammars]] = WeakKeyDictionary()


def grammars_for(tokenizer: Tokenizer, vocab: int, stops: Iterable[int]) -> Grammars:
    """The tokenizer's engine, made once (reading a large vocabulary takes a second) and kept
    while the tokenizer lives, so a model's answers and all its live contexts share its cache."""
    key = (vocab, tuple(sorted(stops)))
    engines = ENGINES.setdefault(tokenizer, {})
    if key not in engines:
        engines[key] = Grammars(tokenizer, vocab, key[1])
    return engines[key]
