"""`m4 run --video` as a user runs it: the demo scene, a file, and a live network stream."""

import contextlib
import functools
import http.server
import json
import threading
import time

import pytest

from m4.media import DemoScene, write_video

from test_cli import m4, m4_in_process


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, DemoScene(seed=2, width=64, height=64, fps=10, duration=4).frames(), fps=10)
    return path


def test_demo_stream_asks_every_two_seconds(tmp_path):
    r = m4_in_process("run", "--video", "demo", "--window", "8", "--every", "2", "--prompt", "What is moving?",
                      "--max-new-tokens", "4", "--json", "--stats", cache=tmp_path)
    assert r.returncode == 0, r.stderr
    e = events(r.stdout)
    frames = [x for x in e if x["event"] == "frame"]
    answers = [x for x in e if x["event"] == "answer"]
    assert len(frames) == 20  # 10 s of demo at the default 2 fps
    assert len(answers) == 5  # at 2, 4, 6 and 8 s, and at the end (9.5 s)
    assert e[-1]["event"] == "stats" and e[-1]["frames_used"] == 20 and e[-1]["ingest_ms_p95"] > 0


def test_file_stream_and_stop_after_frames(checkpoints, clip):
    r = m4_in_process("run", "--model", checkpoints["gqa-tied-last-full"], "--video", clip, "--fps", "5",
                      "--window", "4", "--every", "1", "--max-frames", "12", "--prompt", "Which way?",
                      "--max-new-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    e = events(r.stdout)
    assert [x["t"] for x in e if x["event"] == "frame"] == [round(0.2 * i, 3) for i in range(12)]
    assert sum(x["event"] == "answer" for x in e) == 3  # at 1.0 and 2.0 s, and the end at 2.2 s


@contextlib.contextmanager
def serving(clip, delay=0.0):
    """The clip over HTTP; with `delay`, sent in 256-byte pieces that many seconds apart, as a
    slow link would: then a run on it lasts seconds however busy the machine is."""
    class Handler(http.server.SimpleHTTPRequestHandler):
        def copyfile(self, source, outputfile):
            while piece := source.read(256):
                outputfile.write(piece)
                time.sleep(delay)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(clip.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{clip.name}"
    server.shutdown()


@pytest.fixture
def served_clip(clip):
    with serving(clip) as url:
        yield url


@pytest.fixture
def slow_clip(clip):
    # a fast stream can end (four plays, then "stopping") before the signal lands
    with serving(clip, delay=0.05) as url:
        yield url


def test_live_url_is_reopened_then_ends_cleanly(checkpoints, served_clip):
    """A network stream is read by the capture thread; when it ends it is reopened a
    bounded number of times, then the run ends and the question is still answered."""
    r = m4_in_process("run", "--model", checkpoints["gqa-tied-last-full"], "--video", served_clip, "--fps", "50",
                      "--prompt", "What now?", "--max-new-tokens", "3", "--json", "--stats")
    assert r.returncode == 0, r.stderr
    assert "reopening (1/3)" in r.stderr and "reopening (3/3)" in r.stderr and "stopping" in r.stderr
    e = events(r.stdout)
    stats = e[-1]
    assert e[-2]["event"] == "answer"
    # four plays of 40 frames: those the model was too busy for were dropped, not queued
    assert stats["frames_seen"] == 160
    assert stats["frames_used"] + stats["frames_dropped"] + stats["frames_skipped"] == 160
    assert stats["frames_used"] >= 4


def test_ctrl_c_ends_a_live_run_cleanly(checkpoints, slow_clip):
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "m4", "run", "--model", str(checkpoints["gqa-tied-last-full"]),
                             "--video", slow_clip, "--fps", "5", "--prompt", "Now?", "--max-new-tokens", "2",
                             "--json", "--stats"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as from a terminal: a shell starts background jobs with SIGINT
                            # ignored, and the child would inherit that from a backgrounded pytest
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert json.loads(proc.stdout.readline())["event"] == "frame"
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "interrupted" in err and "Traceback" not in err
    assert events(out)[-1]["event"] == "stats"


def test_closing_a_live_reader_mid_decode_is_clean(tmp_path):
    """Ctrl-C closes the live reader while its thread decodes: closing the PyAV container
    under that decode crashed the process (a segfault) or raised in the thread."""
    import subprocess
    import sys

    code = f"""
import random, threading, time
import numpy as np
from m4.media import open_source, write_video
from m4.run import Latest
path = {str(tmp_path / "big.mp4")!r}
rng = np.random.default_rng(0)
write_video(path, [rng.integers(0, 255, (480, 640, 3), np.uint8) for _ in range(60)], fps=25)
errors = []
threading.excepthook = lambda a: errors.append(repr(a.exc_value))
random.seed(0)
for _ in range(30):
    live = Latest(path, open_source(path))
    time.sleep(random.uniform(0, 0.05))
    live.close()
    assert not live.thread.is_alive()
assert not errors, errors
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


# --- several sources through one model ------------------------------------------------------


def by_source(e: list[dict], event: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for x in e:
        if x["event"] == event:
            out.setdefault(x["source"], []).append(x)
    return out


def test_two_demo_sources_are_labelled_and_answer_as_one_does(tmp_path):
    args = ["--every", "2", "--json", "--max-frames", "20", "--prompt", "What is moving?", "--max-new-tokens", "4",
            "--stats"]
    one = m4_in_process("run", "--video", "demo", *args, cache=tmp_path)
    two = m4_in_process("run", "--video", "demo", "demo", *args, cache=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    single, both = events(one.stdout), events(two.stdout)
    frames, answers = by_source(both, "frame"), by_source(both, "answer")
    assert set(frames) == set(answers) == {"demo", "demo#2"}  # a repeated spec is made unique
    alone = [(x["index"], x["t"]) for x in by_source(single, "frame")["demo"]]
    for label in ("demo", "demo#2"):
        # the same frames, and the same (greedy) answers as the source alone
        assert [(x["index"], x["t"]) for x in frames[label]] == alone
        assert [x["text"] for x in answers[label]] == [x["text"] for x in by_source(single, "answer")["demo"]]
    assert len(frames["demo"]) == 20 and len(answers["demo"]) == 5
    # the model goes round the sources: their frames alternate
    assert [x["source"] for x in both if x["event"] == "frame"][:4] == ["demo", "demo#2"] * 2
    assert {x["source"]: x["frames_used"] for x in both if x["event"] == "stats"} == {"demo": 20, "demo#2": 20}


def test_a_dropped_source_is_reopened_while_the_others_run(checkpoints, served_clip):
    r = m4_in_process("run", "--model", checkpoints["gqa-tied-last-full"], "--video", served_clip, "demo",
                      "--fps", "50", "--prompt", "What now?", "--max-new-tokens", "3", "--json", "--stats")
    assert r.returncode == 0, r.stderr
    assert f"{served_clip}: stream ended; reopening (1/3)" in r.stderr and "reopening (3/3)" in r.stderr
    assert f"{served_clip}: stream ended; stopping" in r.stderr and "demo:" not in r.stderr
    e = events(r.stdout)
    frames, answers = by_source(e, "frame"), by_source(e, "answer")
    assert len(frames["demo"]) == 100  # the whole demo scene (10 s at 10 fps) while the stream dropped
    assert max(x["index"] for x in frames[served_clip]) >= 40  # frames of a later play: it was reopened
    assert len(answers["demo"]) == len(answers[served_clip]) == 1  # each asked at its own end
    stats = {x["source"]: x for x in e if x["event"] == "stats"}
    assert stats[served_clip]["frames_seen"] == 160 and stats["demo"]["frames_used"] == 100
    s = stats[served_clip]
    assert s["frames_used"] + s["frames_dropped"] + s["frames_skipped"] == 160


def test_several_files_asked_at_their_ends_in_text(checkpoints, clip):
    args = ["--model", checkpoints["gqa-tied-last-full"], "--window", "4", "--prompt", "Which way?",
            "--max-new-tokens", "4"]
    one = m4_in_process("run", "--video", clip, *args)
    two = m4_in_process("run", "--video", clip, clip, *args)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    text = one.stdout.rstrip("\n")
    assert two.stdout.splitlines() == [f"[{clip}] {text}", f"[{clip}#2] {text}"]


@pytest.mark.parametrize("streaming", [False, True])
def test_one_missing_file_among_sources_stops_before_anything_runs(checkpoints, clip, tmp_path, streaming):
    missing = tmp_path / "nope.mp4"
    r = m4("run", "--model", checkpoints["gqa-tied-last-full"], "--video", "demo", clip, missing, "--prompt", "q",
           *(["--every", "1"] if streaming else []), "--json")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"m4: error: video not found: {missing}"]
