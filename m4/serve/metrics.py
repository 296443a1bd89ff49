"""What /metrics exports, in Prometheus's text format.

Latencies are kept in m4's bounded histograms (m4.histogram, as `m4 run --stats` keeps
them): fixed memory however long the server runs, percentiles for the session stats, and
exported as Prometheus histograms on power-of-two bounds (exact: those are bucket bounds).
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client import Histogram as PrometheusHistogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from m4.histogram import Histogram
from m4.runtime.reuse import Reuse

# stage -> what it times; each is exported in seconds
STAGES = {
    "queue": "a job's wait for the model's worker",
    "ttft": "the model's time to first token (encoding and prefill included, queueing not)",
    "vision": "image preprocessing and encoding",
    "prefill": "prompt prefill",
    "ingest": "a live frame: preprocess, encode, prefill",
    "decode": "one decoded token",
}
BOUNDS_MS = [2.0 ** k for k in range(-4, 17)]  # 62.5 us .. 65.5 s
BATCH_BOUNDS = [2 ** k for k in range(7)]  # 1 .. 64 answers in one decode step

disable_created_metrics()  # no *_created series beside each counter: the process start says as much


class Metrics:
    def __init__(self, reuse: Reuse):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("m4_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.errors = Counter("m4_errors", "refused or failed requests by kind", ["kind"], registry=r)
        self.tokens = Counter("m4_tokens", "tokens by kind (prompt, completion; cached: prompt tokens loaded from the "
                              "prefix cache or a session's window)", ["kind"], registry=r)
        self.cancelled = Counter("m4_cancelled", "answers stopped because their client left", registry=r)
        self.frames = Counter("m4_frames", "live frames by outcome (ingested, dropped)", ["outcome"], registry=r)
        self.sessions = Gauge("m4_sessions", "open live sessions", registry=r)
        self.queue = Gauge("m4_queue_depth", "jobs waiting for the model", registry=r)
        self.batch = PrometheusHistogram("m4_decode_batch_size", "answers decoded together, one observation per "
                                         "decode step", buckets=BATCH_BOUNDS, registry=r)
        self.lock = threading.Lock()
        self.stages = {s: Histogram() for s in STAGES}
        r.register(_Stages(self))
        r.register(_Caches(reuse))

    def observe(self, **ms: float) -> None:
        """Stage latencies in milliseconds (from any thread)."""
        with self.lock:
            for stage, value in ms.items():
                self.stages[stage].add(value)

    def observe_answer(self, stats: dict) -> None:
        """An answer's stats (a Model's or a LiveContext's, with prompt_tokens): stages and tokens."""
        stages = {k: stats[f"{k}_ms"] for k in ("vision", "prefill", "ttft") if f"{k}_ms" in stats}
        if stats.get("decode_tok_s"):
            stages["decode"] = 1e3 / stats["decode_tok_s"]
        self.observe(**stages)
        self.tokens.labels("completion").inc(stats.get("new_tokens", 0))
        self.tokens.labels("prompt").inc(stats.get("prompt_tokens", 0))
        self.tokens.labels("cached").inc(stats.get("cached_tokens", 0))

    def percentiles(self, stage: str) -> dict:
        with self.lock:
            h = self.stages[stage]
            return {"count": h.count, **({f"p{p}": round(h.percentile(p), 2) for p in (50, 95)} if h.count else {})}

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Stages:
    """Exports the stage histograms at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        family = HistogramMetricFamily("m4_stage_seconds", "latency of each stage of the model's work",
                                       labels=["stage"])
        with self.metrics.lock:
            for stage, h in self.metrics.stages.items():
                counts = h.cumulative(BOUNDS_MS)
                buckets = [(repr(b / 1e3), c) for b, c in zip(BOUNDS_MS, counts)] + [("+Inf", h.count)]
                family.add_metric([stage], buckets, h.sum / 1e3)
        yield family


class _Caches:
    """Exports the encoder and prefix caches' counts at scrape time (m4.runtime.reuse counts
    them on the worker)."""

    def __init__(self, reuse: Reuse):
        self.reuse = reuse

    def collect(self):
        stats = self.reuse.stats()
        for metric, key, kind, doc in (
                ("m4_cache_hits", "hits", CounterMetricFamily, "lookups that found an entry (an image, a prompt's prefix)"),
                ("m4_cache_misses", "misses", CounterMetricFamily, "lookups that found none"),
                ("m4_cache_evictions", "evictions", CounterMetricFamily, "entries evicted to stay within the bound"),
                ("m4_cache_bytes", "bytes", GaugeMetricFamily, "bytes held"),
                ("m4_cache_limit_bytes", "limit", GaugeMetricFamily, "the bound (0: off)")):
            family = kind(metric, f"m4's caches (image, prefix): {doc}", labels=["cache"])
            for cache, counts in stats.items():
                family.add_metric([cache], counts[key])
            yield family
