"""The HTTP server: OpenAI-compatible chat, live sessions, the web page, /metrics.

Routes (docs/serve.md has their schemas):
  POST /v1/chat/completions        OpenAI's chat completion, streamed or not
  GET  /v1/models                  the one model served
  POST /v1/sessions                open a live session -> {"id"}
  GET  /v1/sessions                the open sessions
  GET  /v1/sessions/{id}           its stats;  DELETE closes it
  POST /v1/sessions/{id}/frames    one JPEG or PNG body into its window
  POST /v1/sessions/{id}/ask       {"question", "max_tokens", "stream", and one of "choices", "schema",
                                   "regex"} -> {"text", "frames", "ttft_ms"}
  GET  /v1/sessions/{id}/frame.jpg the newest frame in its window
  POST /v1/sessions/{id}/watches   {"question", "choices" | "schema" | "regex", "every"} -> {"id"}
  DELETE /v1/sessions/{id}/watches/{wid}   stops it
  GET  /v1/sessions/{id}/events    server-sent events: each watch's answer when it changes
  GET  /                           the web page;  GET /metrics  Prometheus text

Every route but the page needs the API key where one is set (/metrics too: Prometheus sends
it as a bearer token). Model work runs on the scheduler's one worker; handlers only parse,
check, fetch and wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import io
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException

from m4.constraint import Constraint, grammars_for
from m4.errors import M4Error
from m4.media import load_image
from m4.prompt import build_chat
from m4.runtime.answer import Answer
from m4.runtime.reuse import Reuse
from m4.serve.chat import ChatRequest, Media, Reply, number, parse
from m4.runtime.sampling import Sampling
from m4.serve.errors import ApiError
from m4.serve.inputs import Limits, decode, fetch_bytes, open_image, parse_json, video_frames
from m4.serve.metrics import Metrics
from m4.serve.scheduler import AsyncJob, Busy, Decode, Scheduler
from m4.serve.sessions import KEEPALIVE_S, SOURCES, Session, Sessions
from m4.serve.settings import Settings, check_bind
from m4.tokenizer import Tokenizer

STATIC = Path(__file__).parent / "static"
POLL_S = 0.2  # how often a waiting request checks that its client is still there
log = logging.getLogger("m4.serve")
T = TypeVar("T")
Picture = tuple[Image.Image, str]  # an image opened, not yet decoded, and its request field


class Gone(Exception):
    """The client disconnected while its answer was being made."""


@dataclass
class Work:
    """An answer for the worker: `run()`, on the worker, starts it for the batch; `limit` is the
    most tokens it may take, and it starts once `ready()` (None: at once)."""

    run: Callable[[], Decode]
    limit: int
    ready: Callable[[], bool] | None = None


class Server:
    def __init__(self, settings: Settings, model, name: str):
        self.settings, self.model, self.name = settings, model, name
        self.limits = Limits(int(settings.max_body_mb * 2**20), settings.max_pixels, settings.allow_urls,
                             settings.allow_private_urls, settings.video_frames)
        self.reuse = Reuse() if settings.no_cache else Reuse(settings.image_cache_mb, settings.prefix_cache_mb)
        self.metrics = Metrics(self.reuse)
        self.scheduler = Scheduler(settings.max_queue, on_start=lambda ms: self.metrics.observe(queue=ms),
                                   on_step=self.metrics.batch.observe)
        self.metrics.queue.set_function(lambda: self.scheduler.depth)
        self.sessions = Sessions(model, self.scheduler, self.metrics, settings.max_sessions, settings.session_ttl,
                                 settings.max_fps, settings.max_tokens, settings.allow_urls,
                                 settings.allow_private_urls, self.reuse)

    # -- waiting for the worker, watching the client -----------------------------------------

    async def watch(self, job: AsyncJob, request: Request, waiting: Awaitable[T]) -> T:
        """What `waiting` gives, checking meanwhile that the client is still there: if it leaves
        first, its job is cancelled (its row freed) and Gone raised."""
        task = asyncio.ensure_future(waiting)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    self.cancelled(job)
                    raise Gone
        finally:
            task.cancel()

    async def collect(self, job: AsyncJob, request: Request) -> list[Any]:
        """All of a job's items."""
        return await self.watch(job, request, items_of(job))

    async def first(self, job: AsyncJob, request: Request) -> Any:
        """A job's first item (None if it ended without one)."""
        return await self.watch(job, request, anext(job, None))

    def cancelled(self, job: AsyncJob) -> None:
        job.cancel()
        self.metrics.cancelled.inc()

    # -- chat ------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        req = parse(await json_body(request))
        self.check_model(req.model)
        if req.constraint is not None:
            await asyncio.to_thread(self.compile, req.constraint, req.constrained_by)
        work = await self.chat_work(req)
        job = self.scheduler.stream(work.run, work.ready)
        reply = Reply(self.name, req, work.limit)
        if not req.stream:
            body = reply.whole(await self.collect(job, request))
            self.metrics.observe_answer(reply.stats)
            return JSONResponse(body)
        head = await self.first(job, request)  # errors before the first token are an HTTP status
        return self.event_stream(self.chat_events(reply, head, job), job)

    def compile(self, c: Constraint, param: str | None) -> None:
        """The constraint compiled now (then cached), so that one the grammar engine cannot
        build is the request's 400 before any work; off the event loop: a large schema takes
        a while."""
        m = self.model
        try:
            grammars_for(m.tokenizer, m.arch.text.vocab, m.stop_ids).guide(c)
        except M4Error as e:
            raise ApiError(400, str(e), "invalid_request", param) from None

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise ApiError(404, f"the model {model!r} does not exist: this server serves {self.name!r} "
                           "(GET /v1/models)", "model_not_found", "model")

    async def chat_events(self, reply: Reply, head: Any, job: AsyncJob) -> AsyncIterator[str]:
        """A streamed answer's chunks: its role, its text as it comes, why it finished, its usage."""
        yield reply.chunk({"role": "assistant", "content": ""})
        if reply.tools is None:
            async for text in reply_text(reply, head, job):
                yield reply.chunk({"content": text})
            finish = reply.finish_reason()
        else:  # a tool call goes whole, its arguments once they parse
            message, finish = reply.message("".join([t async for t in reply_text(reply, head, job)]))
            yield reply.chunk({"tool_calls": [{"index": 0, **c} for c in message["tool_calls"]]} if message["content"]
                              is None else {"content": message["content"]})
        self.metrics.observe_answer(reply.stats)
        yield reply.chunk({}, finish)
        if reply.include_usage:
            yield reply.usage_chunk()

    def event_stream(self, events: AsyncIterator[str], job: AsyncJob) -> StreamingResponse:
        """Server-sent events of an answer, ending with [DONE]: an error after the first
        token (the status is sent by then) is an error event; a client that leaves before the
        end cancels the job."""
        async def wrapped() -> AsyncIterator[str]:
            complete = False
            try:
                async for event in events:
                    yield event
                complete = True
            except ApiError as e:
                self.metrics.errors.labels(e.kind).inc()
                complete = True
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:
                if not complete:
                    self.cancelled(job)
            yield "data: [DONE]\n\n"

        return StreamingResponse(wrapped(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def room(self, cap: int, asked: int | None) -> int:
        return min(asked or self.settings.max_tokens, cap)

    async def chat_work(self, req: ChatRequest) -> Work:
        """A chat's work: its question to a session's window, or its prompt with its media."""
        if req.session is None:
            return await self.prompt_work(req)
        session = self.sessions.get(req.session)
        return self.session_work(session, req.question, self.room(session.live.max_new_tokens, req.max_tokens),
                                 Sampling(req.temperature, req.top_p, req.seed, req.constraint))

    async def prompt_work(self, req: ChatRequest) -> Work:
        """A chat without a session: its prompt, and its images (decoded on the worker, when the
        model needs them)."""
        images, counts = await self.fetch_media(req)
        model = self.model
        try:
            p = build_chat(model.template, model.tokenizer, model.arch.image_token_id, model.arch.tokens_per_image,
                           [(t.text, n, t.answer) for t, n in zip(req.turns, counts)], req.system)
            limit = model.room(len(p.ids), req.max_tokens or self.settings.max_tokens)
        except M4Error as e:
            raise ApiError(400, str(e), "context_length_exceeded", "messages") from None

        def run() -> Decode:
            pictures = [decode(img, where) for img, where in images]
            answer = model.start(p, pictures, limit, Sampling(req.temperature, req.top_p, req.seed, req.constraint),
                                 reuse=self.reuse)
            return decoding(answer, model.tokenizer, lambda: {**answer.stats, "prompt_tokens": len(p.ids),
                                                              "finish_reason": answer.finish_reason})
        return Work(run, limit)

    async def fetch_media(self, req: ChatRequest) -> tuple[list[Picture], list[int]]:
        """The request's images, fetched and checked here (a video's as its frames), and how many
        each turn has."""
        if len([m for m in req.media if m.kind == "image"]) > self.settings.max_images:
            raise ApiError(400, f"too many images: {len(req.media)}, at most {self.settings.max_images} per request "
                           "(m4 serve --max-images)", "too_many_images")
        images: list[Picture] = []
        counts = []
        for turn in req.turns:
            n = len(images)
            for m in turn.media:
                images += await self.fetch(m)
            counts.append(len(images) - n)
        return images, counts

    async def fetch(self, m: Media) -> list[Picture]:
        """One image or video part's images, opened: not yet decoded."""
        data = await asyncio.to_thread(fetch_bytes, m.url, self.limits, m.where)
        if m.kind == "image":
            return [(open_image(data, self.limits, m.where), m.where)]
        frames = await asyncio.to_thread(video_frames, data, self.limits, m.where)
        return [(Image.fromarray(f), m.where) for f in frames]

    def session_work(self, session: Session, question: str, limit: int, sampling: Sampling = Sampling()) -> Work:
        live = session.live

        def run() -> Decode:
            if session.closed:
                raise ApiError(404, f"session {session.id} was closed", "session_not_found")
            cached = live.ctx.length  # the frames: only the question is prefilled
            answer = live.start(question, limit, sampling)
            return decoding(answer, live.tokenizer, functools.partial(session_stats, session, live.ctx.length, cached))
        # one question at a time per context: a second one waits for the answer before it
        return Work(run, limit, lambda: not live.answering)

    # -- sessions --------------------------------------------------------------------------

    async def create_session(self, request: Request) -> dict:
        body = await json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", "invalid_request")
        source = body.get("source")
        if source is not None and not isinstance(source, str):
            raise ApiError(400, f"source must be a string or null: {SOURCES}", "invalid_source", "source")
        window = number(body, "window", 8, 1, 256, integer=True)
        fps = number(body, "fps", 2.0, 0, 1e6)
        try:
            s = await self.sessions.create(source, window, fps)
        except M4Error as e:  # a window too large for the context, a source that does not open
            raise ApiError(400, str(e), "invalid_session") from None
        return s.describe(self.settings.session_ttl)

    async def push_frame(self, sid: str, request: Request) -> dict:
        s = self.sessions.get(sid)
        if s.reader is not None:
            raise ApiError(409, f"session {sid} reads its own source ({s.source}); frames are pushed only to "
                           "sessions opened with source null", "session_has_source")
        self.sessions.check_rate(s)
        data = await request.body()
        if not data:
            raise ApiError(400, "the body must be one JPEG or PNG image", "missing_field")
        img = await asyncio.to_thread(lambda: decode(open_image(data, self.limits, "frame"), "frame"))
        s.seen += 1
        items = [x async for x in self.scheduler.stream(lambda: self.sessions.ingest(s, img))]
        if items[0] is False:
            raise ApiError(409, f"session {sid} is answering a question: a frame enters between answers, and this "
                           "one was dropped", "session_answering")
        st = s.live.stats
        # answered once the watches due at the frame are: their changes come with it
        return {"frames": len(s.live.frames), "frames_seen": s.seen, "vision_ms": round(st["vision_ms"], 2),
                "ingest_ms": round(st["ingest_ms"], 2), "changes": [x for x in items if isinstance(x, dict)]}

    async def ask(self, sid: str, request: Request) -> Response:
        body = await json_body(request)
        question = question_of(body)
        s = self.sessions.get(sid)
        limit = self.room(s.live.max_new_tokens, number(body, "max_tokens", None, 1, 1 << 30, integer=True))
        sampling = Sampling(number(body, "temperature", 0.0, 0, 2), number(body, "top_p", 1.0, 1e-9, 1),
                            number(body, "seed", None, 0, (1 << 64) - 1, True), await self.asked_constraint(body))
        work = self.session_work(s, question, limit, sampling)
        job = self.scheduler.stream(work.run, work.ready)
        if not body.get("stream"):
            items = await self.collect(job, request)
            return JSONResponse(self.session_answer(items[-1], "".join(p for p, _ in items[:-1])))
        head = await self.first(job, request)
        return self.event_stream(self.ask_events(head, job), job)

    async def asked_constraint(self, body: dict) -> Constraint | None:
        """A session question's constraint: one of `choices`, `schema` or `regex` (as
        Model.ask takes them), compiled now; a 400 naming the field where it cannot be."""
        given = [k for k in ("schema", "choices", "regex") if body.get(k) is not None]
        try:
            c = Constraint.of(body.get("schema"), body.get("choices"), body.get("regex"))
        except M4Error as e:
            raise ApiError(400, str(e), "invalid_request", given[-1]) from None
        if c is not None:
            await asyncio.to_thread(self.compile, c, given[0])
        return c

    def session_answer(self, stats: dict, text: str) -> dict:
        self.metrics.observe_answer(stats)
        return {"text": text, "frames": stats.get("frames", 0), "tokens": stats.get("new_tokens", 0),
                **{k: round(stats[k], 2) for k in ("ttft_ms", "prefill_ms", "decode_tok_s") if k in stats}}

    async def ask_events(self, head: Any, job: AsyncJob) -> AsyncIterator[str]:
        """A session's streamed answer: each text piece, then the answer whole with its stats."""
        item, text = head, ""
        while isinstance(item, tuple):
            text += item[0]
            yield f"data: {json.dumps({'text': item[0]})}\n\n"
            item = await anext(job, None)
        yield f"data: {json.dumps({'done': True, **self.session_answer(item, text)})}\n\n"

    async def add_watch(self, sid: str, request: Request) -> dict:
        body = await json_body(request)
        question = question_of(body)
        s = self.sessions.get(sid)
        every = number(body, "every", 1, 1, 1 << 30, integer=True)
        limit = self.room(s.live.max_new_tokens, number(body, "max_tokens", None, 1, 1 << 30, integer=True))
        constraint = {k: body[k] for k in ("schema", "choices", "regex") if body.get(k) is not None}
        return await self.scheduler.call(lambda: self.sessions.watch(s, question, constraint, every, limit))

    async def delete_watch(self, sid: str, wid: str) -> dict:
        s = self.sessions.get(sid)
        await self.scheduler.call(lambda: self.sessions.unwatch(s, wid))
        return {"id": wid, "object": "watch", "deleted": True}

    async def events(self, sid: str) -> StreamingResponse:
        """The session's change events as they come, until it closes or the client leaves (a
        comment every KEEPALIVE_S finds out a client that left while nothing changed)."""
        s = self.sessions.get(sid)
        queue = s.events.listen()

        async def stream() -> AsyncIterator[str]:
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    if event is None:
                        return
                    yield f"data: {json.dumps(event)}\n\n"
            finally:
                s.events.leave(queue)
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def frame_jpeg(self, sid: str) -> Response:
        s = self.sessions.get(sid)
        if s.latest is None:
            raise ApiError(404, f"session {sid} has no frame yet", "no_frame")
        return Response(await asyncio.to_thread(jpeg, s.latest), media_type="image/jpeg",
                        headers={"Cache-Control": "no-store"})


def jpeg(image) -> bytes:
    out = io.BytesIO()
    load_image(image).save(out, "JPEG", quality=85)
    return out.getvalue()


def decoding(answer: Answer, tokenizer: Tokenizer, stats: Callable[[], dict]) -> Decode:
    """An answer for the worker's batch: its client gets (text piece, tokens so far) as its
    tokens complete text, then `stats()`."""
    feed, count = tokenizer.pieces(), 0

    def token(t: int) -> tuple[str, int] | None:
        nonlocal count
        count += 1
        piece = feed(t)
        return (piece, count) if piece else None
    return Decode(answer, token, stats)


def session_stats(session: Session, prompt: int, cached: int) -> dict:
    """A session's answer's stats at its end (its time to first token kept for the session's
    percentiles)."""
    live = session.live
    stats = dict(live.stats)
    if "ttft_ms" in stats:
        session.stages["ttft"].add(stats["ttft_ms"])
    return {**stats, "frames": len(live.frames), "prompt_tokens": prompt, "cached_tokens": cached}


async def items_of(job: AsyncJob) -> list[Any]:
    return [x async for x in job]


async def reply_text(reply: Reply, head: Any, job: AsyncJob) -> AsyncIterator[str]:
    """A chat's answer text from its first item on, cut at a stop string (which ends its job)."""
    item = head
    while item is not None:
        if text := reply.add(item):
            yield text
        if reply.stop.hit:
            job.cancel()
            break
        item = await anext(job, None)
    if rest := reply.stop.flush():
        yield rest


def question_of(body: object) -> str:
    """The question of a session's ask body."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", "invalid_request")
    question = body.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ApiError(400, "missing field: question", "missing_field", "question")
    return question


async def json_body(request: Request) -> Any:
    return parse_json(await request.body())


# -- the application ------------------------------------------------------------------------

def create_app(settings: Settings, model, name: str | None = None) -> Guard:
    """The ASGI app over a loaded model; `name` is what /v1/models calls it (default: --model)."""
    server = Server(settings, model, name or settings.model)

    async def expire_idle():
        while True:
            await asyncio.sleep(min(10.0, settings.session_ttl / 2))
            await server.sessions.expire()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        janitor = asyncio.create_task(expire_idle())
        yield
        janitor.cancel()
        await server.sessions.close_all()
        server.scheduler.close()

    app = FastAPI(title="m4", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        server.metrics.errors.labels(e.kind).inc()
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(Busy)
    async def busy(request: Request, e: Busy):
        return await api_error(request, ApiError(429, str(e), "server_busy"))

    @app.exception_handler(M4Error)
    async def m4_error(request: Request, e: M4Error):
        return await api_error(request, ApiError(400, str(e), "invalid_request"))

    @app.exception_handler(Gone)
    async def gone(request: Request, e: Gone):
        return Response(status_code=499)  # nobody reads it: the client has left

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return await api_error(request, ApiError(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        server.metrics.errors.labels("server_error").inc()
        return JSONResponse(ApiError(500, f"internal error ({type(e).__name__}); see the server's log").body(), 500)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0, "owned_by": "m4"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.chat(request)

    @app.post("/v1/sessions")
    async def create_session(request: Request):
        return await server.create_session(request)

    @app.get("/v1/sessions")
    async def list_sessions():
        await server.sessions.expire()
        return {"object": "list", "data": [s.describe(settings.session_ttl) for s in server.sessions.open.values()]}

    @app.get("/v1/sessions/{sid}")
    async def get_session(sid: str):
        return server.sessions.get(sid).describe(settings.session_ttl)

    @app.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str):
        await server.sessions.delete(sid)
        return {"id": sid, "object": "session", "deleted": True}

    @app.post("/v1/sessions/{sid}/frames")
    async def push_frame(sid: str, request: Request):
        return await server.push_frame(sid, request)

    @app.post("/v1/sessions/{sid}/ask")
    async def ask(sid: str, request: Request):
        return await server.ask(sid, request)

    @app.get("/v1/sessions/{sid}/frame.jpg")
    async def frame(sid: str):
        return await server.frame_jpeg(sid)

    @app.post("/v1/sessions/{sid}/watches")
    async def add_watch(sid: str, request: Request):
        return await server.add_watch(sid, request)

    @app.delete("/v1/sessions/{sid}/watches/{wid}")
    async def delete_watch(sid: str, wid: str):
        return await server.delete_watch(sid, wid)

    @app.get("/v1/sessions/{sid}/events")
    async def events(sid: str):
        return await server.events(sid)

    return Guard(app, server.metrics, settings.api_key, int(settings.max_body_mb * 2**20))


class Guard:
    """Outermost ASGI layer: the API key, then the body size limit, then counting requests.

    The body is read here, up to the limit, before any route sees it: a request over it is
    refused without being read whole (by its Content-Length where it gives one)."""

    OPEN = ("/", "/favicon.ico")  # the page; its script asks for the key and sends it

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body: int):
        self.app, self.metrics, self.api_key, self.max_body = app, metrics, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(route.path if route else "other", str(status.get("code", 499))).inc()

    async def _guarded(self, scope, receive, send):
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in self.OPEN:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                why = "wrong API key" if given else "missing API key: send Authorization: Bearer KEY"
                return await self._refuse(send, ApiError(401, why, "invalid_api_key"))
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await self._refuse(send, self._too_large())
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_body:
                return await self._refuse(send, self._too_large())
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the body is over the limit of {self.max_body / 2**20:g} MB (m4 serve --max-body-mb)",
                        "body_too_large")

    async def _refuse(self, send, e: ApiError):
        self.metrics.errors.labels(e.kind).inc()
        body = json.dumps(e.body()).encode()
        await send({"type": "http.response.start", "status": e.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def make_server(settings: Settings, model=None, name: str | None = None) -> uvicorn.Server:
    """A uvicorn server over `model` (loaded from settings.model when None); `.run()` serves."""
    from m4.api import load

    check_bind(settings.host, settings.api_key, settings.insecure)
    if model is None:
        caches = 0 if settings.no_cache else settings.image_cache_mb + settings.prefix_cache_mb
        model = load(settings.model, backend=settings.backend, device=settings.device, reserve_mb=caches)
    app = create_app(settings, model, name)
    return uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                         timeout_graceful_shutdown=5))


def serve(settings: Settings) -> None:
    """`m4 serve`: load the model, then serve until interrupted."""
    Image.MAX_IMAGE_PIXELS = settings.max_pixels  # PIL's own bomb check too, process-wide
    make_server(settings).run()
