"""`m4 serve` over real HTTP: a uvicorn server from the package on a loopback port, driven by
the official openai client and by raw requests. Answers are held to m4.load(...).ask and
LiveContext.ask on the same inputs (greedy); every bad input is refused with a 4xx and
leaves the server answering the next request."""

import base64
import contextlib
import io
import json
import shutil
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

openai = pytest.importorskip("openai")

import m4  # noqa: E402
from m4.media import DemoScene, sample_uniform, write_video  # noqa: E402
from m4.prompt import build_chat  # noqa: E402
from m4.serve.app import make_server  # noqa: E402
from m4.serve.settings import Settings  # noqa: E402

from conftest import random_images, save_tiny_checkpoint  # noqa: E402
from test_run_video import serving as serving_clip  # noqa: E402

TINY = "gqa-tied-last-full"
N = 12  # answer length in these tests


@contextlib.contextmanager
def serve(model, name="tiny", **settings):
    """A server over `model` on a free loopback port, in a thread; yields its base URL."""
    with running(model, name, **settings) as (url, _):
        yield url


@contextlib.contextmanager
def running(model, name="tiny", **settings):
    """As `serve`, yielding its base URL and the m4 Server behind it (its scheduler)."""
    s = Settings(model=name, **{"max_fps": 1000.0, **settings})
    server = make_server(s, model, name)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield url, server.config.app.app.state.server  # uvicorn's app is the Guard around FastAPI's
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def png(a: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(a).save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes, kind="image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def image_part(a: np.ndarray) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png(a))}}


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def metric(url: str, name: str, headers=None) -> float:
    text = httpx.get(url + "/metrics", headers=headers).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def tiny(checkpoints):
    return m4.load(checkpoints[TINY])


@pytest.fixture(scope="module")
def ref(checkpoints):
    """A second copy for the expected answers: the server's runs on its own thread."""
    return m4.load(checkpoints[TINY])


@pytest.fixture(scope="module")
def url(tiny):
    with serve(tiny, max_body_mb=1, max_images=4, max_pixels=200 * 200, allow_urls=True, max_sessions=4) as u:
        yield u


def good(url):
    """A good request after a bad one: the server still answers."""
    r = client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi?"}], max_tokens=3)
    assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1


# -- chat -------------------------------------------------------------------------------------

INTERLEAVED = {1: ["Describe", None, "briefly."], 2: ["What changed between", None, "and", None, "?"],
               3: [None, "Which of", None, "and", None, "is odd?"]}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_openai_client_answers_as_ask(url, ref, n, stream):
    images = random_images(n, seed=n)
    pics = iter(images)
    layout = INTERLEAVED[n]
    content = [image_part(next(pics)) if p is None else {"type": "text", "text": p} for p in layout]
    text = "".join("<image>" if p is None else p for p in layout)
    expected = ref.ask(text, images=images, max_new_tokens=N)
    c = client(url)
    args = dict(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=N)
    if stream:
        chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
        answer = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert chunks[-1].usage.completion_tokens == len(list(ref.tokens(text, images=images, max_new_tokens=N)))
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    else:
        r = c.chat.completions.create(**args)
        answer = r.choices[0].message.content
        assert r.usage.prompt_tokens == len(ref.prompt(text, images=images).ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert answer == expected


def test_models_route(url):
    assert [m.id for m in client(url).models.list().data] == ["tiny"]


def test_several_turns_and_a_system_message(url, ref):
    """Earlier turns render as training renders multi-turn records: answer, stop token, next turn."""
    a, b = random_images(2, seed=7)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [image_part(a), {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A square."},
                {"role": "user", "content": [{"type": "text", "text": "And"}, image_part(b)]}]
    r = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=N)
    t = ref.template
    p = build_chat(t, ref.tokenizer, ref.arch.image_token_id, ref.arch.tokens_per_image,
                   [("<image>What is it?", 1, "A square."), ("And<image>", 1, None)], "Be brief.")
    assert p.text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>What is it?<|im_end|>\n"
                      "<|im_start|>assistant\nA square.<|im_end|>\n<|im_start|>user\nAnd<image><|im_end|>\n"
                      "<|im_start|>assistant\n")
    expected = "".join(ref.tokenizer.detokenize(ref.generate(p, [Image.fromarray(a), Image.fromarray(b)], N)))
    assert r.choices[0].message.content == expected


def test_stop_strings_seed_and_length(url, ref):
    img = random_images(1, seed=4)[0]
    full = ref.ask("<image>Go", images=[img], max_new_tokens=N)
    c = client(url)
    msg = [{"role": "user", "content": [image_part(img), {"type": "text", "text": "Go"}]}]
    r = c.chat.completions.create(model="tiny", messages=msg, max_tokens=N)
    assert r.choices[0].message.content == full
    stop = full[len(full) // 2:][:3]
    cut = c.chat.completions.create(model="tiny", messages=msg, max_tokens=N, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       c.chat.completions.create(model="tiny", messages=msg, max_tokens=N, stop=stop, stream=True))
    assert streamed == full[:full.index(stop)]
    one = c.chat.completions.create(model="tiny", messages=msg, max_tokens=1)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 1
    sampled = [c.chat.completions.create(model="tiny", messages=msg, max_tokens=N, temperature=1.0, top_p=0.9,
                                         seed=3).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1] == ref.ask("<image>Go", images=[img], max_new_tokens=N,
                                                sampling=m4.Sampling(1.0, 0.9, 3))


def test_video_url_part(url, ref, tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, DemoScene(seed=1, width=64, height=64, fps=10, duration=2).frames(), fps=10)
    frames = [f.image for f in sample_uniform(str(path), 8)]
    content = [{"type": "video_url", "video_url": {"url": data_url(path.read_bytes(), "video/mp4")}},
               {"type": "text", "text": "Which way?"}]
    r = client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                            max_tokens=N)
    assert r.choices[0].message.content == ref.ask("Which way?", video=frames, max_new_tokens=N)


def test_concurrent_requests_answer_as_alone(url, ref):
    """Eight clients at once, each with its own image: each gets the answer it gets alone."""
    images = random_images(8, seed=11)
    expected = [ref.ask("<image>What?", images=[a], max_new_tokens=N) for a in images]

    def one(a):
        msg = [{"role": "user", "content": [image_part(a), {"type": "text", "text": "What?"}]}]
        return client(url).chat.completions.create(model="tiny", messages=msg, max_tokens=N).choices[0].message.content
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, images)) == expected


def test_onnx_bundle_served(bundles):
    path = bundles[TINY]
    images = random_images(2, seed=5)
    text = "Compare <image> with <image>."
    expected = m4.load(str(path)).ask(text, images=images, max_new_tokens=N)
    content = [{"type": "text", "text": "Compare "}, image_part(images[0]), {"type": "text", "text": " with "},
               image_part(images[1]), {"type": "text", "text": "."}]
    with serve(m4.load(str(path)), name="bundle") as u:
        c = client(u)
        assert [m.id for m in c.models.list().data] == ["bundle"]
        args = dict(model="bundle", messages=[{"role": "user", "content": content}], max_tokens=N)
        assert c.chat.completions.create(**args).choices[0].message.content == expected
        chunks = c.chat.completions.create(stream=True, **args)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected


# -- live sessions ----------------------------------------------------------------------------

def test_session_push_twelve_frames_into_eight_and_ask(url, ref):
    frames = random_images(12, seed=21)
    s = httpx.post(url + "/v1/sessions", json={"source": None, "window": 8}).json()
    sid = s["id"]
    try:
        live = ref.stream(window=8)
        for k, f in enumerate(frames, 1):
            r = httpx.post(f"{url}/v1/sessions/{sid}/frames", content=png(f), headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
            assert r.json()["frames"] == min(k, 8)
            live.add_frame(f)
        for q in ("What is happening?", "Which way?"):
            r = httpx.post(f"{url}/v1/sessions/{sid}/ask", json={"question": q, "max_tokens": N}, timeout=60).json()
            assert r["text"] == live.ask(q, max_new_tokens=N) and r["frames"] == 8 and r["ttft_ms"] > 0
        with httpx.stream("POST", f"{url}/v1/sessions/{sid}/ask", json={"question": "Now?", "max_tokens": N,
                                                                       "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert "".join(e.get("text", "") for e in events[:-1]) == events[-1]["text"] == live.ask("Now?", max_new_tokens=N)
        chat = client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Now?"}],
                                                   max_tokens=N, extra_body={"session": sid})
        assert chat.choices[0].message.content == live.ask("Now?", max_new_tokens=N)
        info = httpx.get(f"{url}/v1/sessions/{sid}").json()
        assert info["frames"] == 8 and info["frames_seen"] == 12 and info["percentiles"]["ingest"]["p95"] > 0
        jpg = httpx.get(f"{url}/v1/sessions/{sid}/frame.jpg")
        assert jpg.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(jpg.content)).size == (48, 40)
    finally:
        assert httpx.delete(f"{url}/v1/sessions/{sid}").json()["deleted"]
    assert httpx.get(f"{url}/v1/sessions/{sid}").status_code == 404


def wait_for(check, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_demo_session():
    demo = m4.load("demo")
    with serve(demo, name="demo") as u:
        sid = httpx.post(u + "/v1/sessions", json={"source": "demo", "fps": 4}).json()["id"]
        wait_for(lambda: httpx.get(f"{u}/v1/sessions/{sid}").json()["frames"] >= 3)
        r = httpx.post(f"{u}/v1/sessions/{sid}/ask", json={"question": "Which way does the shape move?",
                                                          "max_tokens": 8}, timeout=60).json()
        assert r["text"].strip() and r["frames"] >= 3
        assert Image.open(io.BytesIO(httpx.get(f"{u}/v1/sessions/{sid}/frame.jpg").content)).size == (256, 256)
        assert httpx.delete(f"{u}/v1/sessions/{sid}").status_code == 200


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, DemoScene(seed=2, width=64, height=64, fps=10, duration=4).frames(), fps=10)
    return path


def test_session_on_a_dropping_http_stream_reopens(tiny, clip, capfd):
    """A loopback stream ends after its 40 frames: it is reopened as m4 run reopens it, then
    the session reports the end and still answers over its window."""
    with serving_clip(clip) as stream, serve(tiny, allow_urls=True, allow_private_urls=True) as u:
        s = httpx.post(u + "/v1/sessions", json={"source": stream, "window": 4, "fps": 50}, timeout=30)
        sid = s.json()["id"]
        info = wait_for(lambda: (i := httpx.get(f"{u}/v1/sessions/{sid}").json())["error"] and i)
        assert info["error"] == "stream ended" and info["frames"] == 4
        r = httpx.post(f"{u}/v1/sessions/{sid}/ask", json={"question": "What now?", "max_tokens": 3}).json()
        assert r["frames"] == 4 and r["tokens"] >= 1
    err = capfd.readouterr().err
    assert "reopening (1/3)" in err and "reopening (3/3)" in err


# -- bad input: each refused with a 4xx, then a good request is answered ----------------------

def chat_raw(url, body, **kw):
    given = {"json": body} if isinstance(body, (dict, list)) else {"content": body}
    return httpx.post(url + "/v1/chat/completions", **given, timeout=60, **kw)


def refused(r, status, code=None):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert e["message"] and e["type"]
    if code:
        assert e["code"] == code, e


def msg(*parts):
    return {"model": "tiny", "messages": [{"role": "user", "content": list(parts)}], "max_tokens": 3}


def test_malformed_json(url):
    refused(chat_raw(url, b'{"model": "tiny", "messages": ['), 400, "invalid_json")
    good(url)


def test_json_nested_too_deep(url):
    """Arrays nested 100,000 deep (200 kB, under the size limit) overflow Python's parser."""
    deep = b"[" * 100_000 + b"]" * 100_000
    refused(chat_raw(url, b'{"model": "tiny", "messages": ' + deep + b"}"), 400, "invalid_json")
    good(url)


@pytest.mark.parametrize("body", [{"messages": [{"role": "user", "content": "Hi"}]}, {"model": "tiny"},
                                  {"model": "tiny", "messages": [{"role": "user"}]},
                                  {"model": "tiny", "messages": [{"content": "Hi"}]},
                                  {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                                  {"model": "tiny", "messages": [{"role": "assistant", "content": "Hi"}]}, [1, 2]])
def test_missing_fields(url, body):
    refused(chat_raw(url, body), 400)
    good(url)


def test_unknown_model(url):
    with pytest.raises(openai.NotFoundError) as e:
        client(url).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["code"] == "model_not_found"
    good(url)


def test_undecodable_image(url):
    refused(chat_raw(url, msg({"type": "image_url", "image_url": {"url": data_url(b"\x89PNG not really")}})),
            400, "invalid_image")
    truncated = png(random_images(1)[0])[:60]  # a valid header, then nothing: fails when decoded
    refused(chat_raw(url, msg({"type": "image_url", "image_url": {"url": data_url(truncated)}})), 400, "invalid_image")
    refused(chat_raw(url, msg({"type": "video_url", "video_url": {"url": data_url(b"not a video", "video/mp4")}})),
            400, "invalid_video")
    good(url)


def test_base64_that_is_not_base64(url):
    refused(chat_raw(url, msg({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not*base64!"}})),
            400, "invalid_base64")
    good(url)


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header says width x height: a decompression bomb if decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_image_over_the_pixel_limit(url):
    big = np.zeros((300, 300, 3), np.uint8)
    refused(chat_raw(url, msg(image_part(big))), 400, "image_too_large")
    bomb = png_claiming(100_000, 100_000)
    refused(chat_raw(url, msg({"type": "image_url", "image_url": {"url": data_url(bomb)}})), 400, "image_too_large")
    sid = httpx.post(url + "/v1/sessions", json={}).json()["id"]
    refused(httpx.post(f"{url}/v1/sessions/{sid}/frames", content=bomb), 400, "image_too_large")
    httpx.delete(f"{url}/v1/sessions/{sid}")
    good(url)


def test_body_over_the_size_limit(url):
    refused(chat_raw(url, b"x" * (2 << 20)), 413, "body_too_large")

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"x" * 65536
    refused(chat_raw(url, chunks()), 413, "body_too_large")
    good(url)


def test_too_many_images(url):
    parts = [image_part(a) for a in random_images(5)] + [{"type": "text", "text": "Which?"}]
    refused(chat_raw(url, msg(*parts)), 400, "too_many_images")
    good(url)


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """The tiny model with 512 positions: 32 images of 16 tokens fill it."""
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("short") / "ck", TINY, max_positions=512)
    with serve(m4.load(path), max_images=100, max_body_mb=4) as u:
        yield u


def test_too_many_images_for_the_context(short_context):
    parts = [image_part(a) for a in random_images(40, size=(8, 8))] + [{"type": "text", "text": "Which?"}]
    refused(chat_raw(short_context, msg(*parts)), 400, "context_length_exceeded")
    good(short_context)


def test_prompt_over_the_context(short_context):
    refused(chat_raw(short_context, msg({"type": "text", "text": "red square " * 400})), 400,
            "context_length_exceeded")
    good(short_context)


def test_api_key(tiny):
    with serve(tiny, api_key="sesame") as u:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            for path in ("/v1/models", "/metrics", "/v1/sessions"):
                refused(httpx.get(u + path, headers=headers), 401, "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            client(u, "wrong").models.list()
        assert httpx.get(u + "/").status_code == 200  # the page asks for the key itself
        good_key = {"Authorization": "Bearer sesame"}
        assert metric(u, 'm4_errors_total{kind="invalid_api_key"}', good_key) == 10
        r = client(u, "sesame").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                        max_tokens=3)
        assert r.choices[0].message.content is not None


def test_urls_to_private_addresses_and_local_files(url, clip):
    with serving_clip(clip) as loopback:
        target = loopback.rsplit("/", 1)[0] + "/x.png"
        for u in (target, "http://localhost/x.png", "http://10.0.0.1/x.png", "http://169.254.169.254/latest"):
            refused(chat_raw(url, msg({"type": "image_url", "image_url": {"url": u}})), 400, "url_not_allowed")
        for u in ("file:///etc/passwd", "/etc/passwd", "ftp://example.com/x.png"):
            refused(chat_raw(url, msg({"type": "image_url", "image_url": {"url": u}})), 400, "invalid_url")
        for source in (loopback, "/etc/passwd", str(clip)):
            r = httpx.post(url + "/v1/sessions", json={"source": source})
            refused(r, 400)
    good(url)


def test_urls_are_off_by_default(tiny):
    with serve(tiny) as u:
        refused(chat_raw(u, msg({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})),
                400, "url_not_allowed")
        refused(httpx.post(u + "/v1/sessions", json={"source": "rtsp://example.com/cam"}), 400, "url_not_allowed")
        good(u)


def test_session_errors(url):
    refused(httpx.post(url + "/v1/sessions/sess_nope/ask", json={"question": "Hi"}), 404, "session_not_found")
    refused(httpx.post(url + "/v1/sessions", json={"window": 0}), 400)
    refused(httpx.post(url + "/v1/sessions", json={"source": 7}), 400, "invalid_source")
    sid = httpx.post(url + "/v1/sessions", json={}).json()["id"]
    refused(httpx.post(f"{url}/v1/sessions/{sid}/ask", json={}), 400, "missing_field")
    refused(httpx.post(f"{url}/v1/sessions/{sid}/frames", content=b""), 400, "missing_field")
    refused(httpx.post(f"{url}/v1/sessions/{sid}/frames", content=b"GIF89a nope"), 400, "invalid_image")
    refused(chat_raw(url, {"model": "tiny", "session": sid, "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}), 400)
    httpx.delete(f"{url}/v1/sessions/{sid}")
    good(url)


def test_frame_rate_limit(tiny):
    with serve(tiny, max_fps=2.0) as u:
        sid = httpx.post(u + "/v1/sessions", json={"fps": 2}).json()["id"]
        frame = png(random_images(1)[0])
        codes = [httpx.post(f"{u}/v1/sessions/{sid}/frames", content=frame).status_code for _ in range(4)]
        assert codes[:2] == [200, 200] and 429 in codes[2:]
        time.sleep(1.1)
        assert httpx.post(f"{u}/v1/sessions/{sid}/frames", content=frame).status_code == 200
        refused(httpx.post(u + "/v1/sessions", json={"fps": 30}), 400, "invalid_fps")


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """A tiny model that never says its stop tokens (their output rows zeroed): answers run to max_tokens."""
    src = save_tiny_checkpoint(tmp_path_factory.mktemp("endless") / "ck", "gqa-untied-penult-full")
    model = m4.load(src)
    weights = load_file(src / "model.safetensors")
    key = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[key][sorted(model.stop_ids)] = 0
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    return m4.load(src)


def test_client_that_disconnects_mid_stream_frees_the_model(endless):
    with serve(endless) as u:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Go"}], "max_tokens": 20000, "stream": True}
        with httpx.stream("POST", u + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert sum(1 for line, _ in zip(lines, range(6)) if line.startswith("data:")) >= 3
        wait_for(lambda: metric(u, "m4_cancelled_total") == 1, timeout=10)
        t = time.monotonic()
        good(u)
        assert time.monotonic() - t < 10
        assert metric(u, 'm4_tokens_total{kind="completion"}') < 5000
        # the same for a session's streamed answer, and for a request that waits whole
        sid = httpx.post(u + "/v1/sessions", json={}).json()["id"]
        with httpx.stream("POST", f"{u}/v1/sessions/{sid}/ask", json={"question": "Go", "stream": True}) as r:
            next(r.iter_lines())
        with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and hangs up
            httpx.post(u + "/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
        wait_for(lambda: metric(u, "m4_cancelled_total") == 3, timeout=10)
        good(u)


# -- batched decoding: answers that decode at the same time share each step ---------------------

@pytest.fixture(scope="module")
def endless_ref(endless):
    """A second copy of `endless` for the expected answers."""
    return m4.load(endless.path)


class Hold:
    """The model's worker kept busy by a job of the test's own: nothing else runs (no decode
    step either) until `release`, and what is submitted meanwhile queues in arrival order."""

    def __init__(self, server):
        self.running, self.released = threading.Event(), threading.Event()
        server.scheduler.submit(self._wait, lambda item: None)

    def _wait(self):
        self.running.set()
        self.released.wait(60)

    def release(self):
        self.released.set()


def queued(server, n):
    """Wait until n jobs wait for the model (so that requests reach it in a known order)."""
    wait_for(lambda: server.scheduler.depth == n)


def ask_image(url, image, n, stream=False):
    args = dict(model="tiny", max_tokens=n,
                messages=[{"role": "user", "content": [image_part(image), {"type": "text", "text": "What?"}]}])
    if stream:
        chunks = client(url).chat.completions.create(stream=True, **args)
        return "".join(ch.choices[0].delta.content or "" for ch in chunks)
    return client(url).chat.completions.create(**args).choices[0].message.content


def steps_of_several(url):
    """Decode steps that carried more than one answer."""
    return metric(url, "m4_decode_batch_size_count") - metric(url, 'm4_decode_batch_size_bucket{le="1.0"}')


def test_concurrent_requests_decode_together(endless, endless_ref):
    """Four requests queued at once, two of them streamed, decode in one batch: each answer
    is the one it gets alone, and steps carried several answers."""
    images = random_images(4, seed=31)
    expected = [endless_ref.ask("<image>What?", images=[a], max_new_tokens=N) for a in images]
    with running(endless) as (u, server), ThreadPoolExecutor(4) as pool:
        hold = Hold(server)
        hold.running.wait()
        answers = [pool.submit(ask_image, u, a, N, i % 2 == 1) for i, a in enumerate(images)]
        queued(server, 4)
        hold.release()
        assert [f.result() for f in answers] == expected
        assert steps_of_several(u) > 0


def test_client_that_leaves_mid_batch_does_not_disturb_the_others(endless, endless_ref):
    """A streamed answer decoding beside three others loses its client between two steps:
    its row leaves, and the others' answers are the ones they get alone."""
    images = random_images(3, seed=41)
    long = 32
    expected = [endless_ref.ask("<image>What?", images=[a], max_new_tokens=long) for a in images]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Go"}], "max_tokens": 20000, "stream": True}
    leave = threading.Event()

    def leaver():
        with httpx.stream("POST", u + "/v1/chat/completions", json=body, timeout=60) as r:
            next(line for line in r.iter_lines() if line.startswith("data:"))
            leave.wait(60)  # then hangs up mid-answer

    with running(endless) as (u, server), ThreadPoolExecutor(4) as pool:
        first = Hold(server)
        first.running.wait()
        gone = pool.submit(leaver)
        queued(server, 1)
        others = []
        for k, a in enumerate(images, 2):
            others.append(pool.submit(ask_image, u, a, long, True))
            queued(server, k)
        second = Hold(server)  # runs once all four have joined the batch, a few steps in
        first.release()
        second.running.wait()
        leave.set()
        gone.result()
        wait_for(lambda: metric(u, "m4_cancelled_total") == 1)
        second.release()
        assert [f.result() for f in others] == expected
        assert steps_of_several(u) > 0


def test_session_questions_decode_beside_a_request(endless, endless_ref):
    """A session's question joins a request that is decoding and gets the answer it gets
    alone; a frame that reaches the model while the session answers is dropped (409); a
    second question to the session waits for the first answer's end."""
    frames, (image, late) = random_images(3, seed=51), random_images(2, seed=52)
    questions = ("What is happening?", "Which way?")
    live = endless_ref.stream(window=4)
    for f in frames:
        live.add_frame(f)
    expected = [live.ask(q, max_new_tokens=N) for q in questions]
    expected_chat = endless_ref.ask("<image>What?", images=[image], max_new_tokens=40)

    def ask(question):
        r = httpx.post(f"{u}/v1/sessions/{sid}/ask", json={"question": question, "max_tokens": N}, timeout=60)
        return r.json()["text"]

    with running(endless) as (u, server), ThreadPoolExecutor(4) as pool:
        sid = httpx.post(u + "/v1/sessions", json={"window": 4}).json()["id"]
        for f in frames:
            assert httpx.post(f"{u}/v1/sessions/{sid}/frames", content=png(f)).status_code == 200
        hold = Hold(server)
        hold.running.wait()
        chat = pool.submit(ask_image, u, image, 40)
        queued(server, 1)
        first = pool.submit(ask, questions[0])
        queued(server, 2)
        frame = pool.submit(httpx.post, f"{u}/v1/sessions/{sid}/frames", content=png(late), timeout=60)
        queued(server, 3)
        second = pool.submit(ask, questions[1])
        queued(server, 4)
        hold.release()
        assert chat.result() == expected_chat
        refused(frame.result(), 409, "session_answering")
        assert [first.result(), second.result()] == expected
        info = httpx.get(f"{u}/v1/sessions/{sid}").json()
        assert info["frames"] == 3 and info["frames_seen"] == 4 and info["frames_dropped"] == 1
        assert steps_of_several(u) > 0


def test_fifty_clients_against_four_sessions(tiny):
    """50 clients each open a session, push two frames, ask and close: at most 4 are open at
    once, the rest are refused with 429 and a reason; nothing fails; the server still answers."""
    frame = png(random_images(1)[0])
    with serve(tiny, max_sessions=4, max_queue=64) as u:
        def one(i):
            with httpx.Client(base_url=u, timeout=120) as h:
                r = h.post("/v1/sessions", json={"window": 2})
                if r.status_code != 200:
                    return r.status_code, r.json()["error"]["message"]
                sid = r.json()["id"]
                statuses = [h.post(f"/v1/sessions/{sid}/frames", content=frame).status_code for _ in range(2)]
                statuses.append(h.post(f"/v1/sessions/{sid}/ask", json={"question": "Hi?", "max_tokens": 4}).status_code)
                statuses.append(h.delete(f"/v1/sessions/{sid}").status_code)
                return max(statuses), ""
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(one, range(50)))
        codes = [c for c, _ in results]
        assert set(codes) <= {200, 429} and codes.count(200) >= 4, results
        assert all("session limit" in m for c, m in results if c == 429)
        assert metric(u, "m4_sessions") == 0
        assert metric(u, 'm4_errors_total{kind="server_error"}') == 0
        good(u)


# -- the command and the page -----------------------------------------------------------------

def test_cli_refuses_to_listen_beyond_loopback_without_a_key():
    from test_cli import m4 as run_m4

    r = run_m4("serve", "--host", "0.0.0.0")
    assert r.returncode == 2 and "refusing to listen on 0.0.0.0 without --api-key" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_serves_the_demo(tmp_path):
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "m4", "serve", "--port", str(port)], stderr=subprocess.PIPE,
                            text=True)
    try:
        u = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(u), timeout=120)
        r = client(u).chat.completions.create(model="demo", messages=[{"role": "user", "content": "What moves?"}],
                                              max_tokens=4)
        assert r.choices[0].message.content is not None
    finally:
        proc.terminate()
        proc.wait(30)


def _up(u):
    try:
        return httpx.get(u + "/v1/models").status_code == 200
    except httpx.TransportError:
        return False


def test_web_page_in_a_headless_browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium: apt-get install chromium (Debian's)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="no playwright: pip install playwright")
    demo = m4.load("demo")
    with serve(demo, name="demo") as u, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(u + "/")
            page.click("#start")
            page.wait_for_function("document.getElementById('sessions').value.startsWith('sess_')")
            page.wait_for_function("document.getElementById('frame').src.startsWith('blob:')", timeout=30000)
            page.click("#ask button")
            page.wait_for_function("document.getElementById('answer').textContent.trim().length > 0", timeout=30000)
            page.wait_for_function("document.getElementById('stats').textContent.includes('time to first token')")
            assert page.text_content("#status") == ""
        finally:
            browser.close()


# -- the reply, item by item -----------------------------------------------------------------

def test_reply_whole_and_streamed_agree_up_to_a_stop_string():
    """A stop string cuts the text and ends the answer as "stop"; without one, an answer that
    took its whole limit ends as "length"."""
    from m4.serve.chat import Reply, parse

    def request(**extra):
        return parse({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra})

    items = [("ab", 1), ("cd", 2), ("ef", 3), {"new_tokens": 3, "prompt_tokens": 5, "cached_tokens": 4}]
    cut = Reply("tiny", request(stop="d"), 8)
    body = cut.whole(list(items))
    assert body["choices"][0]["message"]["content"] == "abc" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 4}}
    streamed = Reply("tiny", request(stop="d"), 8)
    text = "".join(streamed.add(x) for x in items[:2]) + streamed.stop.flush()
    assert text == "abc" and streamed.stop.hit and streamed.finish_reason() == "stop"
    whole = Reply("tiny", request(), 3).whole(list(items))
    assert whole["choices"][0]["message"]["content"] == "abcdef" and whole["choices"][0]["finish_reason"] == "length"
    chunk = json.loads(streamed.chunk({"content": "x"}).removeprefix("data: "))
    assert chunk["id"] == streamed.id and chunk["choices"][0]["delta"] == {"content": "x"}
    assert json.loads(streamed.usage_chunk().removeprefix("data: "))["choices"] == []
