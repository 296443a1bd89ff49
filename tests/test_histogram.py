"""The bounded histogram that m4 run --stats and m4 serve's /metrics keep latencies in."""

import numpy as np

from m4.histogram import Histogram


def test_percentiles_are_close_and_memory_is_fixed():
    rng = np.random.default_rng(0)
    values = rng.lognormal(mean=2.0, sigma=1.0, size=20_000)
    h = Histogram()
    size = len(h.counts)
    for v in values:
        h.add(v)
    assert len(h.counts) == size and h.count == len(values)
    for p in (1, 50, 95, 99):
        assert abs(h.percentile(p) / np.percentile(values, p) - 1) < 0.05, p
    assert h.percentile(100) == values.max() and h.percentile(0) >= values.min()
    assert abs(h.sum - values.sum()) < 1e-6 * values.sum()


def test_cumulative_counts_are_exact_at_bucket_bounds():
    h = Histogram()
    for v in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 1e9):
        h.add(v)
    assert h.cumulative([0.5, 1.0, 2.0, 4.0, 2.0 ** 40]) == [2, 3, 5, 6, 7]
    assert np.isnan(Histogram().percentile(50))
