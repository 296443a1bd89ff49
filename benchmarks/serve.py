"""`m4 serve` under concurrent clients, with transformers `generate` one request at a time as
the baseline in the same run.

For each model (the shipped demo; the `0.5b` architecture with random weights, exported to
a bundle and served by ONNX Runtime) the server runs as `m4 serve` in its own process, and
1, 2, 4, 8 client threads each send their requests over HTTP, streamed:
  images    a chat completion with one image in front of the question
  sessions  a live session: push --frames frames into a window of --window, then ask
For each number of clients: requests/s, ttft (client-side: request sent to first text) p50
and p95, tokens/s per client (its tokens over its busy time) and in total (all tokens over
the wall time). The baseline answers the same requests with transformers (its processor and
`generate` over the whole prompt, images re-encoded each time), one after another. With
--memory-frames N, a push session on the first model takes N frames and the server's
resident memory is read at frame 100 and at the end.

    python benchmarks/serve.py [--models demo,0.5b] [--clients 1,2,4,8] [--requests 2]
                               [--new-tokens 16] [--window 8] [--frames 8] [--workdir DIR]
                               [--memory-frames 2000] [--json benchmarks/results/serve-cpu.json]

The 0.5b checkpoint and bundle are built once in --workdir (minutes, ~4 GB).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from m4.bench import HF, cached_bundle, demo_frames
from m4.histogram import Histogram
from m4.machine import machine
from m4.resolve import cache_dir, demo_checkpoint

QUESTION = "What is happening?"


def artifacts(name: str, workdir: Path) -> tuple[str, str]:
    """(what the server loads, the checkpoint transformers loads)."""
    if name == "demo":
        return "demo", str(demo_checkpoint())
    from m4.model.checkpoint import random_checkpoint

    ckpt = workdir / name / "checkpoint"
    if not (ckpt / "config.json").is_file():
        print(f"random {name} checkpoint -> {ckpt}", file=sys.stderr)
        random_checkpoint(name, ckpt)
    return str(cached_bundle(str(ckpt), workdir / name / "bundle")), str(ckpt)


class Server:
    """`m4 serve` in its own process on a free loopback port."""

    def __init__(self, model: str, sessions: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "m4", "serve", "--model", model, "--port", str(self.port),
                                      "--max-sessions", str(sessions), "--max-fps", "1000", "--max-queue", "256"],
                                     env={**os.environ, "M4_VERIFY": "0"})
        end = time.monotonic() + 600
        while time.monotonic() < end:
            try:
                if httpx.get(self.url + "/v1/models").status_code == 200:
                    self.name = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        raise RuntimeError("the server did not start")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def png(a: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(a).save(out, "PNG")
    return out.getvalue()


def sse(h: httpx.Client, path: str, body: dict):
    """(seconds to the first text, tokens, seconds in all) of one streamed answer."""
    t0, first, tokens = time.perf_counter(), None, 0
    with h.stream("POST", path, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            e = json.loads(line[6:])
            text = e.get("text") if "choices" not in e else (e["choices"][0]["delta"].get("content")
                                                               if e["choices"] else None)
            if text and first is None:
                first = time.perf_counter() - t0
            if e.get("usage"):
                tokens = e["usage"]["completion_tokens"]
            if e.get("done"):
                tokens = e["tokens"]
    total = time.perf_counter() - t0
    return (first if first is not None else total), tokens, total


def image_client(url: str, name: str, image: bytes, requests: int, new_tokens: int) -> list:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}}
    body = {"model": name, "max_tokens": new_tokens, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": "\n" + QUESTION}]}]}
    with httpx.Client(base_url=url, timeout=600) as h:
        return [sse(h, "/v1/chat/completions", body) for _ in range(requests)]


def session_client(url: str, frames: list[bytes], window: int, requests: int, new_tokens: int) -> list:
    with httpx.Client(base_url=url, timeout=600) as h:
        sid = h.post("/v1/sessions", json={"window": window}).raise_for_status().json()["id"]
        out = []
        for _ in range(requests):
            for f in frames:
                h.post(f"/v1/sessions/{sid}/frames", content=f).raise_for_status()
            out.append(sse(h, f"/v1/sessions/{sid}/ask", {"question": QUESTION, "max_tokens": new_tokens,
                                                         "stream": True}))
        h.delete(f"/v1/sessions/{sid}")
        return out


def summary(per_client: list[list], wall: float) -> dict:
    ttft, tokens = Histogram(), 0
    rates = []
    for answers in per_client:
        for first, n, _ in answers:
            ttft.add(first * 1e3)
        n = sum(a[1] for a in answers)
        tokens += n
        rates.append(n / sum(a[2] for a in answers))
    count = sum(len(a) for a in per_client)
    return {"requests": count, "wall_s": round(wall, 2), "requests_per_s": round(count / wall, 3),
            "ttft_ms": {"p50": round(ttft.percentile(50), 1), "p95": round(ttft.percentile(95), 1)},
            "tokens": tokens, "tok_s_per_client": round(float(np.mean(rates)), 2),
            "tok_s_total": round(tokens / wall, 2)}


def concurrent(fn, clients: int) -> dict:
    results: list = [None] * clients

    def run(i):
        results[i] = fn(i)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(results, time.perf_counter() - t0)


def baseline(ckpt: str, images: list, windows: list[list], new_tokens: int) -> dict:
    """transformers, one request after another: ttft is generate(1 token), rate from generate(N)."""
    hf = HF(ckpt, "cpu")
    out = {}
    for workload, inputs in (("images", [[x] for x in images]), ("sessions", windows)):
        hf.ask(inputs[0], 1)  # warm-up
        answers, t0 = [], time.perf_counter()
        for x in inputs:
            t = time.perf_counter()
            hf.ask(x, 1)
            first = time.perf_counter() - t
            hf.ask(x, new_tokens)
            answers.append((first, new_tokens, time.perf_counter() - t - first))
        out[workload] = summary([answers], time.perf_counter() - t0)
    return out


def memory(server: Server, frames: int) -> dict:
    frame = png(demo_frames(1)[0])
    with httpx.Client(base_url=server.url, timeout=600) as h:
        sid = h.post("/v1/sessions", json={"window": 8}).raise_for_status().json()["id"]
        for i in range(1, frames + 1):
            h.post(f"/v1/sessions/{sid}/frames", content=frame).raise_for_status()
            if i % 50 == 0:
                h.post(f"/v1/sessions/{sid}/ask", json={"question": QUESTION, "max_tokens": 8}).raise_for_status()
            if i == 100:
                at_100 = server.rss_mib()
        h.delete(f"/v1/sessions/{sid}")
    end = server.rss_mib()
    return {"frames": frames, "rss_mib_at_100": round(at_100, 1), "rss_mib_at_end": round(end, 1),
            "growth_pct": round((end - at_100) / at_100 * 100, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,0.5b")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=2, help="per client and workload")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8, help="frames a session client pushes before each question")
    ap.add_argument("--workdir", type=Path, default=cache_dir() / "bench-serve")
    ap.add_argument("--memory-frames", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    clients = [int(x) for x in a.clients.split(",")]
    record = {"machine": machine(), "config": {k: str(v) for k, v in vars(a).items()}, "models": {}}
    for name in a.models.split(","):
        served, ckpt = artifacts(name, a.workdir)
        server = Server(served, max(clients))
        try:
            frames = demo_frames(a.frames + max(clients) * a.requests)
            images = [png(f) for f in frames[:max(clients) * a.requests]]
            pushed = [png(f) for f in frames[:a.frames]]
            image_client(server.url, server.name, images[0], 1, a.new_tokens)  # warm-up
            runs = {"images": {}, "sessions": {}}
            for n in clients:
                print(f"{name}: {n} clients", file=sys.stderr)
                runs["images"][n] = concurrent(lambda i: image_client(
                    server.url, server.name, images[i * a.requests], a.requests, a.new_tokens), n)
                runs["sessions"][n] = concurrent(lambda i: session_client(
                    server.url, pushed, a.window, a.requests, a.new_tokens), n)
            mem = memory(server, a.memory_frames) if a.memory_frames and name == a.models.split(",")[0] else None
        finally:
            server.close()
        windows = [frames[:a.frames][-a.window:]] * max(1, a.requests)
        base = baseline(ckpt, frames[:a.requests * 2], windows, a.new_tokens)
        record["models"][name] = {"served": served, "m4_serve": runs, "transformers_one_at_a_time": base,
                                  **({"memory": mem} if mem else {})}
        print(json.dumps(record["models"][name], indent=1), file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
