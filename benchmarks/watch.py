"""What a watch costs per frame it is asked at, beside the frame's own ingest; and watches
served over HTTP against the same watches in process.

In process, for each model: one live context (window --window) with 2 watches (a yes/no
question and a four-way one) takes --frames frames of the demo scene, with a red square drawn
over every other stretch of 25 frames, timed per frame: the ingest (encode and prefill),
then the watches' answers. Then --contexts contexts with 2 watches each take a frame
apiece, their watches answered in one batched step, against the same contexts' watches
asked one context after another: the 2 one-token watches, then a watch whose answer is a
JSON object of several tokens (whose decode steps the contexts share).

Over HTTP (--http-frames > 0, the first model): `m4 serve` in its own process, --contexts
push sessions with the 2 watches each, every session fed --http-frames frames by its own
client thread and listened to over server-sent events. Its events must equal what the same
watches give in process on the same frames (decoded from the same PNGs); the server's
resident memory is read at frame 100 and at the end.

    python benchmarks/watch.py [--models demo,0.5b] [--frames 40] [--contexts 4]
                               [--http-frames 500] [--json benchmarks/results/watch-demo.json]

0.5b is a random checkpoint of the preset's shapes, made once in --workdir.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

import m4
from m4.bench import p, rss_bytes
from m4.machine import machine
from m4.media import DemoScene
from m4.runtime.live import add_frames, enter_frames
from m4.runtime.watch import answer_watches

sys.path.insert(0, str(Path(__file__).parent))
from serve import Server, png  # noqa: E402  (m4 serve in its own process)

WATCHES = [("Is there a red square?", {"choices": ["yes", "no"]}),
           ("Which way does the cyan circle move?", {"choices": ["up", "down", "left", "right"]})]
# an answer of several tokens, whose decode steps the contexts share
LONG = [("Where is the red square?", {"schema": {
    "type": "object", "additionalProperties": False, "required": ["x", "y"],
    "properties": {"x": {"enum": ["left", "centre", "right"]}, "y": {"enum": ["top", "middle", "bottom"]}}}})]


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    """The demo scene with a red square over frames 25-49, 75-99, ...: answers that change."""
    scene = DemoScene(seed=seed, fps=10, duration=max(n, 1) / 10)
    out = []
    for i in range(n):
        f = scene.frame(i).copy()
        if (i // 25) % 2:
            f[16:64, 16:64] = (230, 20, 20)
        out.append(f)
    return out


def load(name: str, workdir: Path):
    if name == "demo":
        return m4.load("demo")
    from m4.model.checkpoint import random_checkpoint

    ckpt = workdir / name / "checkpoint"
    if not (ckpt / "config.json").is_file():
        random_checkpoint(name, ckpt)
    return m4.load(str(ckpt), backend="torch")


def per_frame(model, n: int, window: int) -> dict:
    """Per frame, the window full: its ingest, and its 2 watches' answers (p50 and p95, ms),
    measured on the same frames so that a busy machine weighs on both alike."""
    live = model.stream(window=window)
    for q, constraint in WATCHES:
        live.watch(q, **constraint)
    ingest, watch = [], []
    for f in frames(n):
        t0 = time.perf_counter()
        enter_frames([(live, f)])
        t1 = time.perf_counter()
        answer_watches([live])
        t2 = time.perf_counter()
        ingest.append((t1 - t0) * 1e3)
        watch.append((t2 - t1) * 1e3)
    ingest, watch = ingest[window:], watch[window:]
    return {"ingest_ms_p50": round(p(ingest, 50), 2), "ingest_ms_p95": round(p(ingest, 95), 2),
            "watches": len(WATCHES), "watches_ms_p50": round(p(watch, 50), 2),
            "watches_ms_p95": round(p(watch, 95), 2), "per_watch_ms_p50": round(p(watch, 50) / len(WATCHES), 2)}


def batched(model, contexts: int, n: int, window: int, watches: list) -> dict:
    """ms per round of `contexts` frames' watches: in one batched step, or context by context."""
    out = {}
    for how in ("together", "one_by_one"):
        lives = [model.stream(window=window) for _ in range(contexts)]
        for live in lives:
            for q, constraint in watches:
                live.watch(q, **constraint)
        streams = [frames(n, seed) for seed in range(contexts)]
        times = []
        for i in range(n):
            enter_frames([(live, s[i]) for live, s in zip(lives, streams)])
            t0 = time.perf_counter()
            if how == "together":
                answer_watches(lives)
            else:
                for live in lives:
                    answer_watches([live])
            times.append((time.perf_counter() - t0) * 1e3)
        out[f"{how}_ms_p50"] = round(p(times[window:], 50), 2)
    return out


def in_process(model, streams: list[list[np.ndarray]], window: int) -> list[list[tuple]]:
    """Each stream's changes (frame, question, answer) as the same watches give them in process."""
    lives = [model.stream(window=window) for _ in streams]
    for live in lives:
        for q, constraint in WATCHES:
            live.watch(q, **constraint)
    out = [[] for _ in streams]
    for i in range(len(streams[0])):
        for c in add_frames([(live, s[i]) for live, s in zip(lives, streams)]):
            k = next(j for j, live in enumerate(lives) if c.watch in live.watches)
            out[k].append((c.frame, c.question, c.answer))
    return out


def over_http(model_name: str, model, contexts: int, n: int, window: int) -> dict:
    pngs = [[png(f) for f in frames(n, seed)] for seed in range(contexts)]
    decoded = [[np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in s] for s in pngs]
    server = Server(model_name, contexts)
    rss: dict[str, float] = {}
    try:
        with httpx.Client(base_url=server.url, timeout=600) as h:
            sids = [h.post("/v1/sessions", json={"window": window}).raise_for_status().json()["id"]
                    for _ in range(contexts)]
            for sid in sids:
                for q, constraint in WATCHES:
                    h.post(f"/v1/sessions/{sid}/watches", json={"question": q, **constraint}).raise_for_status()
        events: list[list[dict]] = [[] for _ in sids]
        listeners = [threading.Thread(target=listen, args=(server.url, sid, got), daemon=True)
                     for sid, got in zip(sids, events)]
        for t in listeners:
            t.start()
        time.sleep(1.0)
        ms: list[float] = []

        def client(k: int) -> None:
            with httpx.Client(base_url=server.url, timeout=600) as h:
                for i, body in enumerate(pngs[k]):
                    t0 = time.perf_counter()
                    h.post(f"/v1/sessions/{sids[k]}/frames", content=body).raise_for_status()
                    ms.append((time.perf_counter() - t0) * 1e3)
                    if k == 0 and i + 1 == min(100, n):
                        rss["at_frame_100_mib"] = round(server.rss_mib(), 1)
        t0 = time.perf_counter()
        clients = [threading.Thread(target=client, args=(k,)) for k in range(contexts)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        wall = time.perf_counter() - t0
        rss["at_end_mib"] = round(server.rss_mib(), 1)
        time.sleep(1.0)
        with httpx.Client(base_url=server.url, timeout=60) as h:
            for sid in sids:
                h.delete(f"/v1/sessions/{sid}")
        for t in listeners:
            t.join(30)
    finally:
        server.close()
    expected = in_process(model, decoded, window)
    got = [[(e["frame"], e["question"], e["answer"]) for e in es] for es in events]
    return {"sessions": contexts, "watches_per_session": len(WATCHES), "frames_per_session": n,
            "events": sum(map(len, got)), "events_equal_in_process": got == expected,
            "push_ms_p50": round(p(ms, 50), 2), "push_ms_p95": round(p(ms, 95), 2),
            "frames_per_s": round(contexts * n / wall, 1), **rss,
            "rss_growth_pct": round(100 * (rss["at_end_mib"] / rss["at_frame_100_mib"] - 1), 2)}


def listen(url: str, sid: str, got: list[dict]) -> None:
    with httpx.stream("GET", f"{url}/v1/sessions/{sid}/events", timeout=None) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--http-frames", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/m4-watch-bench"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    result = {"machine": machine(), "window": a.window, "frames": a.frames, "models": {}}
    for i, name in enumerate(a.models.split(",")):
        model = load(name, a.workdir)
        rounds = max(a.frames // 2, a.window + 2)
        r = {"per_frame": per_frame(model, a.frames, a.window),
             "contexts": {"n": a.contexts, "one_token": batched(model, a.contexts, rounds, a.window, WATCHES),
                          "json": batched(model, a.contexts, rounds, a.window, LONG)},
             "rss_mib": round(rss_bytes() / 2**20, 1)}
        if i == 0 and a.http_frames:
            r["http"] = over_http(name, model, a.contexts, a.http_frames, a.window)
        result["models"][name] = r
        print(json.dumps({name: r}, indent=2), flush=True)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
