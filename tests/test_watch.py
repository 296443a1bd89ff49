"""Watches (standing questions) against per-frame questions: on frames in which a red square
appears halfway, a watch tells exactly the changes that asking the same question with the
same constraint after every frame gives — in Python, through `m4 run --watch` and over HTTP;
and the constraint flags of `m4 run`."""

import json
import re
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

import m4
from m4.media import open_source, sample_rate, write_video

from conftest import VARIANTS
from test_cli import m4_in_process

TINY = "gqa-tied-last-full"
Q = "Is there a red square?"
YES_NO = {"choices": ["yes", "no"]}
# a watch of each kind of constraint, the answers kept short on the random checkpoints
WATCHES = [(Q, YES_NO, 1), ("What colour is it?", {"regex": "(red|green|blue)( square)?"}, 1),
           ("Where?", {"schema": {"type": "object", "properties": {"x": {"enum": ["left", "right"]}},
                                  "required": ["x"], "additionalProperties": False}}, 2),
           ("Which way?", {"max_new_tokens": 3}, 3)]


def red_square_frames(n=12, appears=6, size=48):
    """A bar moving right over grey, and from frame `appears` on a red square."""
    frames = []
    for i in range(n):
        f = np.full((size, size, 3), 70, np.uint8)
        f[size - 12:size - 6, 2 + i:12 + i] = (40, 200, 220)
        if i >= appears:
            f[8:24, 20:36] = (230, 20, 20)
        frames.append(f)
    return frames


def asked_changes(model, frames, watches, window=4):
    """What asking each watch's question after each frame it is due at gives: its changes."""
    live, last, changes = model.stream(window=window), {}, []
    for k, f in enumerate(frames):
        live.add_frame(f)
        for question, constraint, every in watches:
            if (k + 1) % every == 0:
                answer = live.ask(question, **constraint)
                if last.get(question) != answer:
                    last[question] = answer
                    changes.append((k, question, answer))
    return changes


def watched_changes(model, frames, watches):
    live = model.stream(window=4)
    for question, constraint, every in watches:
        live.watch(question, every=every, **constraint)
    return [(c.frame, c.question, c.answer) for f in frames for c in live.add_frame(f)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_watches_tell_the_changes_of_per_frame_questions(checkpoints, variant):
    model = m4.load(checkpoints[variant], backend="torch")
    frames = red_square_frames()
    ours = watched_changes(model, frames, WATCHES)
    assert ours == asked_changes(model, frames, WATCHES)
    assert [q for _, q, _ in ours[:2]] == [Q, "What colour is it?"]  # each told the first time
    assert all(a in ("yes", "no") for _, q, a in ours if q == Q)


@pytest.mark.parametrize("graph", ["decoder_ort.onnx", "decoder.onnx"])
def test_watches_on_bundles(models, graph):
    model = models[(TINY, graph)]
    frames = red_square_frames()
    assert watched_changes(model, frames, WATCHES) == asked_changes(model, frames, WATCHES)


def test_watches_of_several_contexts_answer_in_one_step(checkpoints):
    model = m4.load(checkpoints[TINY], backend="torch")
    rows, decode = [], model.backend.decode

    def counting(embeds, lengths, caches):
        rows.append(len(caches))
        return decode(embeds, lengths, caches)
    model.backend.decode = counting
    watches = [("Name a colour.", {"regex": "[a-z]{4,8}"}, 1), (Q, YES_NO, 1)]
    streams = [red_square_frames(), red_square_frames(appears=3)[::-1]]
    lives = [model.stream(window=4) for _ in streams]
    for live in lives:
        for question, constraint, every in watches:
            live.watch(question, every=every, **constraint)
    ours = [[], []]
    for pair in zip(*streams):
        for c in m4.runtime.live.add_frames(list(zip(lives, pair))):
            ours[next(i for i, live in enumerate(lives) if c.watch in live.watches)].append((c.frame, c.question,
                                                                                            c.answer))
    assert max(rows) == 2  # both contexts' answers in each step
    del model.backend.decode
    assert ours == [asked_changes(model, s, watches) for s in streams]


def test_a_watch_checks_its_question_and_constraint_when_set(checkpoints):
    live = m4.load(checkpoints[TINY], backend="torch").stream(window=2)
    for bad in [dict(question="<image> here?"), dict(question=Q, regex="("), dict(question=Q, every=0),
                dict(question=Q, choices=["a"], regex="a")]:
        with pytest.raises(m4.M4Error):
            live.watch(**bad)
    w = live.watch(Q, **YES_NO)
    assert live.add_frame(red_square_frames(1)[0])[0].watch is w and w.answer in ("yes", "no")
    live.unwatch(w)
    assert live.add_frame(red_square_frames(1)[0]) == [] and live.watches == []


# -- m4 run ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("watch") / "red.mp4"
    write_video(path, red_square_frames(16, 8, 64), fps=10)
    return path


def changes_of(stdout):
    return [e for e in map(json.loads, stdout.splitlines()) if e["event"] == "change"]


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_run_watch_tells_what_asking_every_frame_tells(checkpoints, clip, which):
    """Two sources (the same clip twice): their watches answer together, each as it would alone."""
    model = checkpoints[TINY] if which == "tiny" else "demo"
    r = m4_in_process("run", "--model", model, "--video", clip, clip, "--fps", "10", "--watch", Q,
                      "--watch", "What colour is it?", "--choices", "yes,no,red", "--json")
    assert r.returncode == 0, r.stderr
    frames = [f.image for f in sample_rate(open_source(str(clip)).frames(), 10)]
    watches = [(Q, {"choices": ["yes", "no", "red"]}, 1), ("What colour is it?", {"choices": ["yes", "no", "red"]}, 1)]
    expected = asked_changes(m4.load(model), frames, watches, window=8)
    events = changes_of(r.stdout)
    for source in (str(clip), f"{clip}#2"):
        assert [(e["frame"], e["question"], e["answer"]) for e in events if e["source"] == source] == expected
    assert all(e["ms"] > 0 for e in events)


def test_run_watch_in_text_and_every_n_frames(checkpoints, clip):
    r = m4_in_process("run", "--model", checkpoints[TINY], "--video", clip, "--fps", "10", "--watch", Q,
                      "--choices", "yes,no", "--watch-every", "4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and all(line.startswith(("frame 3: ", "frame 7: ", "frame 11: ", "frame 15: ")) for line in lines)
    assert lines[0] in (f"frame 3: {Q} yes", f"frame 3: {Q} no")


def test_constraint_flags_on_prompts(checkpoints, clip, tmp_path):
    """Each flag holds the answers of a still image, a clip asked at its end and a stream."""
    ck = checkpoints[TINY]
    image = tmp_path / "frame.png"
    Image.fromarray(red_square_frames(1)[0]).save(image)
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"dir": {"enum": ["up", "down"]}},
                                  "required": ["dir"], "additionalProperties": False}))
    for flags, valid in [(["--choices", "up,down"], lambda a: a in ("up", "down")),
                         (["--regex", "[0-9]{2}"], lambda a: len(a) == 2 and a.isdigit()),
                         (["--json-schema", schema], lambda a: json.loads(a)["dir"] in ("up", "down"))]:
        for source in (["--images", image], ["--video", clip], ["--video", clip, "--every", "0.5", "--max-frames", "6"]):
            r = m4_in_process("run", "--model", ck, *source, "--prompt", "Which way?", *flags, "--json")
            assert r.returncode == 0, r.stderr
            answers = [e["text"] for e in map(json.loads, r.stdout.splitlines()) if e["event"] == "answer"]
            assert answers and all(map(valid, answers)), (flags, source, answers)


@pytest.mark.parametrize("flags, message", [
    (["--choices", ","], "choices must be"),
    (["--json-schema", "/no/such/schema.json"], "cannot read the JSON schema"),
    (["--json-schema", "NOTJSON"], "is not JSON"),
    (["--json-schema", "BADSCHEMA"], "unsupported JSON schema"),
    (["--regex", "("], "unsupported regex"),
    (["--choices", "a,b", "--regex", "a"], "constrain an answer one way"),
    (["--watch-every", "0", "--watch", Q], "--watch-every"),
])
def test_bad_constraint_flags_are_one_line(checkpoints, clip, tmp_path, flags, message):
    (tmp_path / "NOTJSON").write_text("{")
    (tmp_path / "BADSCHEMA").write_text('{"type": "object", "properties": {"a": {"type": "foo"}}}')
    flags = [str(tmp_path / f) if f in ("NOTJSON", "BADSCHEMA") else f for f in flags]
    r = m4_in_process("run", "--model", checkpoints[TINY], "--video", clip, "--prompt", "hi", *flags)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("m4: error: ")


def test_watch_needs_a_video(checkpoints, clip):
    r = m4_in_process("run", "--model", checkpoints[TINY], "--images", clip, "--watch", Q)
    assert r.returncode == 2 and r.stderr.strip() == "m4: error: --watch asks about a video: give it one with --video"


# -- over HTTP ---------------------------------------------------------------------------------

def listen(url, got, ready):
    with httpx.stream("GET", url, timeout=120) as r:
        ready.set()
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))


def test_session_watches_over_http_tell_what_the_live_context_tells(checkpoints):
    from test_serve import png, running

    model = m4.load(checkpoints[TINY], backend="torch")
    streams = [red_square_frames(10, 5), red_square_frames(10, 2)]
    watches = [(Q, YES_NO, 1), ("What colour is it?", {"regex": "(red|green|blue)( square)?"}, 2)]
    with running(model) as (u, server):
        sids = [httpx.post(u + "/v1/sessions", json={"source": None, "window": 4}).json()["id"] for _ in streams]
        wids = {}
        for sid in sids:
            for question, constraint, every in watches:
                r = httpx.post(u + f"/v1/sessions/{sid}/watches", json={"question": question, "every": every,
                                                                        **constraint})
                assert r.status_code == 200, r.text
                wids[r.json()["id"]] = question
        got = {sid: [] for sid in sids}
        listeners = []
        for sid in sids:
            ready = threading.Event()
            listeners.append(threading.Thread(target=listen, args=(u + f"/v1/sessions/{sid}/events", got[sid], ready),
                                              daemon=True))
            listeners[-1].start()
            ready.wait(30)
        pushed = {sid: [] for sid in sids}

        def push(sid, frames):
            for f in frames:
                r = httpx.post(u + f"/v1/sessions/{sid}/frames", content=png(f), timeout=120)
                assert r.status_code == 200, r.text
                pushed[sid] += r.json()["changes"]
        pushers = [threading.Thread(target=push, args=a) for a in zip(sids, streams)]
        for t in pushers:
            t.start()
        for t in pushers:
            t.join(120)
        wait_for(lambda: all(len(got[sid]) == len(pushed[sid]) for sid in sids))
        for sid, frames in zip(sids, streams):
            assert got[sid] == pushed[sid]
            assert all(wids[e["watch"]] == e["question"] and e["source"] is None for e in got[sid])
            assert [(e["frame"], e["question"], e["answer"]) for e in got[sid]] == watched_changes(model, frames,
                                                                                                  watches)
        described = httpx.get(u + f"/v1/sessions/{sids[0]}").json()["watches"]
        assert [w["question"] for w in described] == [q for q, _, _ in watches]
        assert described[0]["answer"] == [e["answer"] for e in got[sids[0]] if e["question"] == Q][-1]
        for sid in sids:  # closing a session ends its event streams
            assert httpx.delete(u + f"/v1/sessions/{sid}").status_code == 200
        for t in listeners:
            t.join(30)
            assert not t.is_alive()


def test_watches_of_a_session_reading_its_own_source(checkpoints):
    """A session on the demo scene: its frames keep entering between its watches' answers,
    and the first answer comes as an event."""
    from test_serve import running

    with running(m4.load(checkpoints[TINY], backend="torch")) as (u, server):
        sid = httpx.post(u + "/v1/sessions", json={"source": "demo", "window": 2, "fps": 5}).json()["id"]
        httpx.post(u + f"/v1/sessions/{sid}/watches", json={"question": Q, **YES_NO}).raise_for_status()
        got, ready = [], threading.Event()
        threading.Thread(target=listen, args=(u + f"/v1/sessions/{sid}/events", got, ready), daemon=True).start()
        s = server.sessions.open[sid]
        wait_for(lambda: s.live.stats["frames_seen"] >= 4 and got)
        assert got[0]["source"] == "demo" and got[0]["answer"] in ("yes", "no") and s.error is None
        httpx.delete(u + f"/v1/sessions/{sid}")


def wait_for(condition, timeout=30.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_watch_errors_and_a_listener_that_leaves(checkpoints):
    from test_serve import png, running

    model = m4.load(checkpoints[TINY], backend="torch")
    with running(model) as (u, server):
        sid = httpx.post(u + "/v1/sessions", json={"source": None, "window": 2}).json()["id"]
        route = u + f"/v1/sessions/{sid}/watches"
        for body, status, code, param in [
            ({"choices": ["yes"]}, 400, "missing_field", "question"),
            ({"question": Q, "regex": "("}, 400, "invalid_watch", None),
            ({"question": Q, "choices": ["a"], "regex": "a"}, 400, "invalid_watch", None),
            ({"question": Q, "choices": "yes"}, 400, "invalid_watch", None),
            ({"question": Q, "every": 0}, 400, None, "every"),
        ]:
            r = httpx.post(route, json=body)
            assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
            assert r.json()["error"]["param"] == param and (code is None or r.json()["error"]["code"] == code)
        assert httpx.post(u + "/v1/sessions/sess_none/watches", json={"question": Q}).status_code == 404
        r = httpx.delete(route + "/watch_none")
        assert r.status_code == 404 and r.json()["error"]["code"] == "watch_not_found"
        wid = httpx.post(route, json={"question": Q, **YES_NO}).json()["id"]
        s = server.sessions.open[sid]
        with httpx.stream("GET", u + f"/v1/sessions/{sid}/events", timeout=30):
            wait_for(lambda: len(s.events.listeners) == 1)
        wait_for(lambda: not s.events.listeners)  # it left: nothing is kept for it
        frame = png(red_square_frames(1)[0])
        assert len(httpx.post(u + f"/v1/sessions/{sid}/frames", content=frame).json()["changes"]) == 1
        assert httpx.delete(route + "/" + wid).json() == {"id": wid, "object": "watch", "deleted": True}
        assert httpx.post(u + f"/v1/sessions/{sid}/frames", content=frame).json()["changes"] == []
        assert httpx.get(u + f"/v1/sessions/{sid}").json()["watches"] == []


# -- the web page ------------------------------------------------------------------------------

def test_web_page_watches_the_browsers_camera(tmp_path):
    """In headless chromium with a fake camera: 'use my camera' opens a session fed by the
    page, a watch is added from the page, and its changes are listed as they come."""
    import shutil

    from test_serve import running

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium: apt-get install chromium (Debian's)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="no playwright: pip install playwright")
    demo = m4.load("demo")
    with running(demo, name="demo") as (u, server), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(u + "/")
            page.click("#camera")
            page.wait_for_function("document.getElementById('sessions').value.startsWith('sess_')", timeout=30000)
            page.click("#watch button")
            page.wait_for_function("document.querySelectorAll('#events li').length >= 1", timeout=60000)
            page.wait_for_function("document.getElementById('frame').src.startsWith('blob:')", timeout=30000)
            (session,) = server.sessions.open.values()
            assert session.source is None and session.seen >= 1  # frames pushed by the page
            wait_for(lambda: page.text_content("#watches .a") in ("yes", "no"))
            assert page.text_content("#watches .q") == Q
            first = page.text_content("#events li:last-child")  # the watch's first answer
            assert re.fullmatch(rf"frame \d+: {re.escape(Q)} → (yes|no) \(\d+ ms\)", first), first
            wait_for(lambda: session.seen >= 4)
            page.screenshot(path=str(tmp_path / "watch.png"))
            assert page.text_content("#status") == ""
            page.click("#stop")
            wait_for(lambda: not server.sessions.open)
        finally:
            browser.close()
