"""OpenAI's chat completion: its request read into what m4 answers, and m4's answer written
back in OpenAI's shape (Reply).

A user message's content is its parts in order: text as written, each `image_url` part as
an `<image>` placeholder where it stands (so the images are interleaved exactly there, and
`model.ask(that text, images=...)` is the same question), and a `video_url` part as its
sampled frames in front of the message's text (`model.ask(text, video=frames)`). Earlier
turns are rendered as m4's training renders multi-turn records (m4.prompt.build_chat); a
system message replaces the template's system text. With `"session": id` the question is
asked of a live session's window instead: then the request is one user message of text.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from m4.constraint import Constraint
from m4.prompt import IMAGE
from m4.serve.errors import ApiError
from m4.serve.structured import Tools, structured

ROLES = {"system", "developer", "user", "assistant"}
MAX_STOPS = 4


@dataclass
class Media:
    kind: str  # "image" or "video"
    url: str
    where: str  # the request field, for error messages


@dataclass
class Turn:
    text: str  # with one <image> per image part
    media: list[Media]
    answer: str | None  # None on the last turn: the one to answer


@dataclass
class ChatRequest:
    model: str
    turns: list[Turn]
    system: str | None
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    session: str | None
    media: list[Media] = field(default_factory=list)
    constraint: Constraint | None = None  # what the answer must match (m4.serve.structured)
    tools: Tools | None = None  # where the answer is a tool call
    constrained_by: str | None = None  # the field that asked for the constraint

    @property
    def question(self) -> str:
        return self.turns[-1].text


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, code or "invalid_request", param)


def number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kind) or not low <= v <= high:
        raise bad(f"{name} must be {'an integer' if integer else 'a number'} in [{low:g}, {high:g}], got {v!r}", name)
    return v


def parse(body) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("missing field: model", "model", "missing_field")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("missing field: messages (a non-empty list)", "messages", "missing_field")
    if body.get("n", 1) != 1:
        raise bad("n must be 1: m4 answers once per request", "n")
    if body.get("functions") is not None:
        raise bad("functions is OpenAI's older form: pass tools", "functions")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = number({"max_tokens": max_tokens}, "max_tokens", None, 1, 1 << 30, integer=True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) for s in stop)):
        raise bad(f"stop must be a string or a list of at most {MAX_STOPS} strings", "stop")
    options = body.get("stream_options") or {}
    session = body.get("session")
    if session is not None and not isinstance(session, str):
        raise bad("session must be a session id (POST /v1/sessions)", "session")
    system, turns = turns_of(messages)
    req = ChatRequest(model, turns, system, max_tokens, number(body, "temperature", 0.0, 0, 2),
                      number(body, "top_p", 1.0, 1e-9, 1), number(body, "seed", None, 0, (1 << 64) - 1, True),
                      [s for s in stop if s], bool(body.get("stream", False)),
                      isinstance(options, dict) and bool(options.get("include_usage")), session,
                      [m for t in turns for m in t.media], *structured(body))
    if session is not None and (len(turns) > 1 or req.media or system is not None):
        raise bad("a session answers one question over its frames: send one user message of text", "messages")
    return req


def turns_of(messages: list) -> tuple[str | None, list[Turn]]:
    """An optional system message, then user and assistant messages alternating, ending with a user's."""
    system, turns, expect = None, [], "user"
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(sorted(ROLES))}, got {role!r}", f"{where}.role")
        if role in ("system", "developer"):
            if i:
                raise bad(f"{where}: a system message goes first", where)
            system = text_only(m.get("content"), where)
            continue
        if role != expect:
            raise bad(f"{where}: expected a {expect} message (user and assistant alternate, a user's last)", where)
        if role == "user":
            text, media = user_content(m.get("content"), where)
            turns.append(Turn(text, media, None))
        else:
            turns[-1].answer = text_only(m.get("content"), where)
        expect = "assistant" if role == "user" else "user"
    if expect != "assistant":
        raise bad("the last message must be the user's", "messages")
    return system, turns


def parts_of(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise bad(f"{where}.content must be a string or a non-empty list of parts", f"{where}.content", "missing_field")
    for k, p in enumerate(content):
        if not isinstance(p, dict) or not isinstance(p.get("type"), str):
            raise bad(f"{where}.content[{k}] must be an object with a type", f"{where}.content")
    return content


def text_only(content, where: str) -> str:
    out = []
    for k, p in enumerate(parts_of(content, where)):
        if p["type"] != "text" or not isinstance(p.get("text"), str):
            raise bad(f"{where}.content[{k}]: only text parts here", f"{where}.content")
        out.append(p["text"])
    return "".join(out)


def user_content(content, where: str) -> tuple[str, list[Media]]:
    text, media = [], []
    for k, p in enumerate(parts_of(content, where)):
        at = f"{where}.content[{k}]"
        kind = p["type"]
        if kind == "text":
            if not isinstance(p.get("text"), str):
                raise bad(f"{at}.text must be a string", at, "missing_field")
            if IMAGE in p["text"]:
                raise bad(f"{at}: write images as image_url parts, not {IMAGE} in the text", at)
            text.append(p["text"])
        elif kind in ("image_url", "video_url"):
            ref = p.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise bad(f"{at}.{kind}.url is missing", at, "missing_field")
            media.append(Media(kind.removesuffix("_url"), url, at))
            text.append(IMAGE if kind == "image_url" else "")
        else:
            raise bad(f"{at}: unsupported part type {kind!r} (text, image_url, video_url)", at)
    if any(m.kind == "video" for m in media) and len(media) > 1:
        raise bad(f"{where}: a message with a video_url holds no other image or video", where)
    return "".join(text), media


class StopText:
    """Cuts streamed text at the first stop string, holding back what may be its start."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, piece: str) -> str:
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held, self.hit = "", True
            return text[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Reply:
    """One chat completion's answer in OpenAI's shape, whole or as server-sent chunks, from the
    items of its job: (text piece, tokens so far) as the answer goes, then the answer's stats."""

    def __init__(self, model: str, req: ChatRequest, limit: int):
        self.id, self.created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        self.model, self.limit, self.include_usage, self.tools = model, limit, req.include_usage, req.tools
        self.stop = StopText(req.stop)
        self.count = 0  # tokens so far
        self.stats: dict[str, Any] = {}  # the answer's, once it has ended

    def add(self, item: tuple[str, int] | dict[str, Any]) -> str:
        """The text an item adds: up to a stop string, what may begin one held back."""
        if isinstance(item, dict):
            self.stats = item
            return ""
        piece, self.count = item
        return self.stop.feed(piece)

    def used(self) -> int:
        """Tokens of the answer: all it generated, or those up to its stop string."""
        return self.count if self.stop.hit else self.stats.get("new_tokens", self.count)

    def usage(self) -> dict[str, Any]:
        prompt, n = self.stats.get("prompt_tokens", 0), self.used()
        return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n,
                "prompt_tokens_details": {"cached_tokens": self.stats.get("cached_tokens", 0)}}

    def finish_reason(self) -> str:
        if self.stop.hit:
            return "stop"
        return self.stats.get("finish_reason") or ("stop" if self.used() < self.limit else "length")

    def message(self, text: str) -> tuple[dict[str, Any], str]:
        """The answer's message and finish reason: its text, or where the request asked for a
        tool call, the call (its text where the tokens ran out before the call was whole)."""
        finish = self.finish_reason()
        call = self.tools.call(text) if self.tools is not None and finish == "stop" else None
        if call is None:
            return {"role": "assistant", "content": text}, finish
        return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"

    def whole(self, items: list[Any]) -> dict[str, Any]:
        """The response to a request not streamed, from all of its job's items."""
        if items and isinstance(items[-1], dict):
            self.stats = items.pop()
        text = ""
        for item in items:
            text += self.add(item)
            if self.stop.hit:
                break
        text += self.stop.flush()
        message, finish = self.message(text)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": self.usage()}

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> str:
        return self._event([{"index": 0, "delta": delta, "finish_reason": finish}])

    def usage_chunk(self) -> str:
        return self._event([], self.usage())

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"
