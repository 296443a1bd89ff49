"""`m4 serve`'s reuse caches (m4.runtime.reuse: the image encoder cache and the prefix
cache) measured against a real server process, over HTTP:

  bounded  --requests distinct chat completions (distinct text, distinct random images: as
           many per request as make the images' embeddings twice --image-cache-mb, and the
           prompts' keys and values many times --prefix-cache-mb) from 4 client threads:
           responses by status (no 5xx allowed), the server's resident memory (VmRSS) after
           a warm-up of 20 requests and at the end, its peak (VmHWM), and from /metrics each
           cache's bytes held (also sampled during the run), bound and evictions. Passes
           when the final RSS <= (warm-up RSS + both bounds) * 1.10 and bytes never pass
           the bounds.
  load     --clients concurrent clients, each a conversation of 3 turns sent in order, each
           turn resending the earlier ones (their answers as received) plus a new user
           message: images shared by groups of clients and new ones, first turns repeated
           across a group. Every request is first answered one by one on a fresh server
           with --no-cache (the reference); then a fresh server with the caches takes all
           clients at once. Checks: each answer's text equals its one-by-one answer; the
           clients' sum of usage.prompt_tokens_details.cached_tokens equals the server's
           m4_tokens_total{kind="cached"} delta; hit rates of both caches from /metrics.

    python benchmarks/serve_reuse.py [--model demo] [--requests 1000] [--clients 50]
                                     [--image-cache-mb 128] [--prefix-cache-mb 256]
                                     [--json benchmarks/results/serve-reuse-demo.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from m4.machine import machine

MAX_IMAGES = 32  # images in one bounded request at most (few --requests then may not fill the caches)
WARMUP = 20  # requests before the warm-up RSS is read
BOUNDED_CLIENTS = 4
GROUPS = 10  # clients of one group (client % GROUPS) share images and first turns
SYSTEM = "You are a careful assistant who looks at pictures."
METRIC = re.compile(r'^(m4_\w+)\{(\w+)="([^"]*)"\}\s+(\S+)$')


class Server:
    """`m4 serve` in its own process on a free loopback port, its log in a file."""

    def __init__(self, model: str, *flags: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "m4", "serve", "--model", model, "--host", "127.0.0.1",
                     "--port", str(self.port), *flags]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="m4-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "M4_VERIFY": "0"})
        end = time.monotonic() + 600
        while time.monotonic() < end and self.proc.poll() is None:
            try:
                r = httpx.get(self.url + "/v1/models")
                if r.status_code == 200:
                    self.name = r.json()["data"][0]["id"]
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise RuntimeError(f"the server did not start: {self.log_tail()}")

    @property
    def command(self) -> str:
        return " ".join(["python", *self.argv[1:]])

    def status(self, field: str) -> float:
        """A /proc/PID/status field in kB, as MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metrics(self) -> dict[tuple[str, str], float]:
        """/metrics' labelled m4 samples: (name, label value) -> value."""
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if m := METRIC.match(line):
                out[m[1], m[3]] = float(m[4])
        return out

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-chars:]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


# -- requests ------------------------------------------------------------------------------

def data_url(seed: int) -> str:
    """A distinct random 48x48 PNG (the server resizes it) as a data URL."""
    a = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(a).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def user(text: str, *image_seeds: int) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(s)}} for s in image_seeds]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def body(name: str, messages: list, max_tokens: int) -> dict:
    return {"model": name, "messages": messages, "max_tokens": max_tokens, "temperature": 0}


def post(h: httpx.Client, b: dict) -> httpx.Response | str:
    try:
        return h.post("/v1/chat/completions", json=b)
    except httpx.TransportError as e:
        return type(e).__name__


def plan(model: str, requests: int, image_mb: float, prefix_mb: float) -> dict:
    """Bytes of one image's embeddings and of one token's keys and values (fp32 on the CPU),
    and the images per request that put twice the image bound through the encoder cache."""
    from m4.model.config import PRESETS

    if model in PRESETS:
        a = PRESETS[model]
    else:
        import m4
        a = m4.load(model).arch
    t = a.text
    head = t.head_size or t.hidden // t.heads
    image_bytes = a.tokens_per_image * t.hidden * 4
    kv_token = t.layers * 2 * t.kv_heads * head * 4
    images = min(MAX_IMAGES, max(2, math.ceil(2 * image_mb * 2**20 / (requests * image_bytes))))
    words = " ".join(f"w{k}" for k in range(24))  # some text beside the images
    return {"image_embedding_bytes": image_bytes, "kv_bytes_per_token": kv_token, "images_per_request": images,
            "tokens_per_image": a.tokens_per_image, "words": words,
            "image_mib_through": requests * images * image_bytes / 2**20,
            "prefix_mib_through_at_least": requests * images * a.tokens_per_image * kv_token / 2**20}


# -- bounded -------------------------------------------------------------------------------

class Sampler(threading.Thread):
    """The server's RSS and caches' bytes every 0.5 s: their maxima."""

    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server, self.stop = server, threading.Event()
        self.max_bytes = {"image": 0.0, "prefix": 0.0}
        self.max_rss = 0.0

    def run(self):
        while not self.stop.wait(0.5):
            try:
                m = self.server.metrics()
            except httpx.TransportError:
                continue
            for c in self.max_bytes:
                self.max_bytes[c] = max(self.max_bytes[c], m.get(("m4_cache_bytes", c), 0))
            self.max_rss = max(self.max_rss, self.server.status("VmRSS"))


def bounded(model: str, requests: int, image_mb: float, prefix_mb: float, p: dict) -> dict:
    images = p["images_per_request"]
    server = Server(model, "--image-cache-mb", f"{image_mb:g}", "--prefix-cache-mb", f"{prefix_mb:g}",
                    "--max-images", str(max(16, images)))
    statuses: Counter = Counter()
    errors: dict = {}  # status -> the first such response's body
    lock = threading.Lock()
    local = threading.local()

    def one(k: int) -> None:
        if not hasattr(local, "h"):
            local.h = httpx.Client(base_url=server.url, timeout=600)
        seeds = [1_000_000 + k * images + j for j in range(images)]
        r = post(local.h, body(server.name, [user(f"Request {k}: {p['words']} -- what is in these?", *seeds)], 4))
        with lock:
            status = r if isinstance(r, str) else r.status_code
            statuses[status] += 1
            if status != 200 and status not in errors:
                errors[status] = r if isinstance(r, str) else r.text[:500]

    sampler = Sampler(server)
    try:
        t0 = time.perf_counter()
        sampler.start()
        with ThreadPoolExecutor(BOUNDED_CLIENTS) as pool:
            list(pool.map(one, range(min(WARMUP, requests))))
            warm = server.status("VmRSS")
            warm_metrics = server.metrics()
            list(pool.map(one, range(WARMUP, requests)))
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        m = server.metrics()
        end, peak = server.status("VmRSS"), server.status("VmHWM")
        log = server.log_tail() if any(isinstance(s, str) or s >= 500 for s in statuses) else ""
    finally:
        server.close()
    limit = warm + image_mb + prefix_mb
    caches = {c: {"bytes_mib": m[("m4_cache_bytes", c)] / 2**20,
                  "max_sampled_mib": sampler.max_bytes[c] / 2**20,
                  "limit_mib": m[("m4_cache_limit_bytes", c)] / 2**20,
                  "evictions": int(m[("m4_cache_evictions_total", c)]),
                  "hits": int(m[("m4_cache_hits_total", c)]), "misses": int(m[("m4_cache_misses_total", c)]),
                  "bytes_mib_after_warmup": warm_metrics.get(("m4_cache_bytes", c), 0) / 2**20} for c in ("image", "prefix")}
    return {"command": server.command, "requests": requests, "clients": BOUNDED_CLIENTS, "images_per_request": images,
            "max_tokens": 4, "wall_s": round(wall, 1), "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "non_2xx": sum(v for k, v in statuses.items() if isinstance(k, str) or not 200 <= k < 300),
            "5xx": sum(v for k, v in statuses.items() if isinstance(k, str) or k >= 500),
            "first_errors": {str(k): v for k, v in errors.items()},
            "rss_mib": {"after_warmup": round(warm, 1), "end": round(end, 1), "peak_vmhwm": round(peak, 1),
                        "max_sampled": round(sampler.max_rss, 1)},
            "rss_bound_mib": round(limit * 1.10, 1), "rss_within_bound": end <= limit * 1.10,
            "bytes_within_bounds": all(c["max_sampled_mib"] <= c["limit_mib"] and c["bytes_mib"] <= c["limit_mib"]
                                       for c in caches.values()),
            "caches": caches, "cached_tokens": int(m.get(("m4_tokens_total", "cached"), 0)),
            "prompt_tokens": int(m.get(("m4_tokens_total", "prompt"), 0)), **({"server_log_tail": log} if log else {})}


# -- load ----------------------------------------------------------------------------------

def turn_message(client: int, k: int) -> dict:
    """Client `client`'s k-th user message (0-based): the first is its group's (repeated by
    every client of the group), the second a new image of its own, the third another group's
    shared image."""
    g = client % GROUPS
    if k == 0:
        return user(f"Group {g} asks: what is in this picture?", 2_000_000 + g)
    if k == 1:
        return user(f"Client {client} asks: and in this one?", 3_000_000 + client)
    return user("Compare it with this one.", 2_000_000 + (g + 3) % GROUPS)


def conversation(server: Server, client: int, turns: int, max_tokens: int) -> list[dict]:
    """One client's turns in order, each resending the ones before with their answers."""
    messages: list[dict] = [{"role": "system", "content": SYSTEM}]
    out = []
    with httpx.Client(base_url=server.url, timeout=600) as h:
        for k in range(turns):
            messages.append(turn_message(client, k))
            r = post(h, body(server.name, messages, max_tokens))
            if isinstance(r, str) or r.status_code != 200:
                out.append({"status": r if isinstance(r, str) else r.status_code,
                            "error": "" if isinstance(r, str) else r.text[:500]})
                break
            j = r.json()
            text = j["choices"][0]["message"]["content"]
            out.append({"status": 200, "text": text, "prompt_tokens": j["usage"]["prompt_tokens"],
                        "cached_tokens": j["usage"]["prompt_tokens_details"]["cached_tokens"]})
            messages.append({"role": "assistant", "content": text})
    return out


def rate(m1: dict, m0: dict, cache: str) -> dict:
    hits = m1.get(("m4_cache_hits_total", cache), 0) - m0.get(("m4_cache_hits_total", cache), 0)
    misses = m1.get(("m4_cache_misses_total", cache), 0) - m0.get(("m4_cache_misses_total", cache), 0)
    return {"hits": int(hits), "misses": int(misses), "hit_rate": round(hits / (hits + misses), 3) if hits + misses else None}


def load(model: str, clients: int, image_mb: float, prefix_mb: float, turns: int = 3, max_tokens: int = 8) -> dict:
    queue = str(max(64, 2 * clients))
    ref_server = Server(model, "--no-cache", "--max-queue", queue)
    try:
        t0 = time.perf_counter()
        reference = [conversation(ref_server, c, turns, max_tokens) for c in range(clients)]
        ref_wall = time.perf_counter() - t0
        ref_cached = ref_server.metrics().get(("m4_tokens_total", "cached"), 0)
    finally:
        ref_server.close()
    server = Server(model, "--image-cache-mb", f"{image_mb:g}", "--prefix-cache-mb", f"{prefix_mb:g}",
                    "--max-queue", queue)
    try:
        m0 = server.metrics()
        results: list = [None] * clients
        threads = [threading.Thread(target=lambda c=c: results.__setitem__(c, conversation(server, c, turns, max_tokens)))
                   for c in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        m1 = server.metrics()
        log = server.log_tail() if any(r["status"] != 200 for rs in results for r in rs) else ""
    finally:
        server.close()
    pairs = [(c, k, ref, got) for c in range(clients) for k, (ref, got) in enumerate(zip(reference[c], results[c]))]
    equal = sum(ref.get("text") is not None and ref.get("text") == got.get("text") for _, _, ref, got in pairs)
    statuses = Counter(str(r["status"]) for rs in results for r in rs)
    client_cached = sum(r.get("cached_tokens", 0) for rs in results for r in rs)
    metric_cached = m1.get(("m4_tokens_total", "cached"), 0) - m0.get(("m4_tokens_total", "cached"), 0)
    return {"commands": {"reference": ref_server.command, "cached": server.command},
            "clients": clients, "turns": turns, "max_tokens": max_tokens, "requests": clients * turns,
            "reference_wall_s": round(ref_wall, 1), "wall_s": round(wall, 1), "statuses": dict(statuses),
            "reference_statuses": dict(Counter(str(r["status"]) for rs in reference for r in rs)),
            "answers_equal": equal, "answers_compared": clients * turns,
            "mismatches": [{"client": c, "turn": k + 1, "one_by_one": ref.get("text"), "concurrent": got.get("text"),
                            "status": got["status"]} for c, k, ref, got in pairs
                           if ref.get("text") is None or ref.get("text") != got.get("text")][:20],
            "cached_tokens": {"clients_sum": client_cached, "metrics_delta": int(metric_cached),
                              "equal": client_cached == metric_cached, "reference_server": int(ref_cached)},
            "prompt_tokens": sum(r.get("prompt_tokens", 0) for rs in results for r in rs),
            "hit_rates": {c: rate(m1, m0, c) for c in ("image", "prefix")},
            **({"server_log_tail": log} if log else {})}


# -- report --------------------------------------------------------------------------------

def table(result: dict) -> Table:
    t = Table(title=f"m4 serve reuse caches ({result['model']})")
    t.add_column("check")
    t.add_column("value")
    b, ld = result.get("bounded"), result.get("load")
    if b:
        r = b["rss_mib"]
        t.add_row("bounded: requests / wall", f"{b['requests']} x {b['images_per_request']} images / {b['wall_s']} s")
        t.add_row("bounded: statuses (5xx)", f"{b['statuses']} ({b['5xx']})")
        t.add_row("bounded: RSS warm-up / end / peak", f"{r['after_warmup']} / {r['end']} / {r['peak_vmhwm']} MiB")
        t.add_row("bounded: end RSS <= bound", f"{b['rss_within_bound']} (bound {b['rss_bound_mib']} MiB)")
        for c, v in b["caches"].items():
            t.add_row(f"bounded: {c} held (max) / bound, evictions",
                      f"{v['bytes_mib']:.1f} ({v['max_sampled_mib']:.1f}) / {v['limit_mib']:g} MiB, {v['evictions']}")
    if ld:
        t.add_row("load: answers equal one-by-one", f"{ld['answers_equal']}/{ld['answers_compared']}")
        t.add_row("load: statuses / wall", f"{ld['statuses']} / {ld['wall_s']} s")
        t.add_row("load: cached tokens clients / metrics",
                  f"{ld['cached_tokens']['clients_sum']} / {ld['cached_tokens']['metrics_delta']}")
        for c, v in ld["hit_rates"].items():
            t.add_row(f"load: {c} hit rate", f"{v['hit_rate']} ({v['hits']} hits, {v['misses']} misses)")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--requests", type=int, default=1000, help="distinct requests of the bounded test (0: skip)")
    ap.add_argument("--clients", type=int, default=50, help="concurrent conversations of the load test (0: skip)")
    ap.add_argument("--image-cache-mb", type=float, default=128.0)
    ap.add_argument("--prefix-cache-mb", type=float, default=256.0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    t0 = time.perf_counter()
    result: dict = {"machine": machine(), "command": " ".join(["python", *sys.argv]), "model": a.model}
    if a.requests:
        p = plan(a.model, a.requests, a.image_cache_mb, a.prefix_cache_mb)
        result["plan"] = p
        print(f"bounded: {a.requests} requests x {p['images_per_request']} images", file=sys.stderr)
        result["bounded"] = bounded(a.model, a.requests, a.image_cache_mb, a.prefix_cache_mb, p)
    if a.clients:
        print(f"load: {a.clients} clients", file=sys.stderr)
        result["load"] = load(a.model, a.clients, a.image_cache_mb, a.prefix_cache_mb)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    Console(stderr=True).print(table(result))


if __name__ == "__main__":
    main()
