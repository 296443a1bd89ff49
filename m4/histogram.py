"""A bounded histogram: percentiles of a stream of any length in fixed memory.

Buckets grow by 2^(1/8) (9%) from 2^-16 to 2^40, so a percentile read back is within half a
bucket (about 4.5%) of the exact one; count, sum, min and max are exact. `m4 run --stats`
and `m4 serve`'s /metrics keep their latencies in these.
"""

import math

STEPS = 8  # buckets per doubling
LOW, HIGH = -16 * STEPS, 40 * STEPS  # bucket k holds values in (2^((k-1)/8), 2^(k/8)]


class Histogram:
    def __init__(self):
        self.counts = [0] * (HIGH - LOW + 1)
        self.count, self.sum = 0, 0.0
        self.min, self.max = math.inf, -math.inf

    def add(self, value: float) -> None:
        value = float(value)
        k = math.ceil(math.log2(value) * STEPS) if value > 0 else LOW
        self.counts[min(max(k, LOW), HIGH) - LOW] += 1
        self.count += 1
        self.sum += value
        self.min, self.max = min(self.min, value), max(self.max, value)

    @staticmethod
    def bound(k: int) -> float:
        """The upper bound of bucket k (its index from LOW)."""
        return 2.0 ** ((k + LOW) / STEPS)

    def percentile(self, p: float) -> float:
        """The p-th percentile (0-100), interpolated geometrically inside its bucket."""
        if not self.count:
            return math.nan
        rank, seen = p / 100 * self.count, 0
        for k, n in enumerate(self.counts):
            if n and seen + n >= rank:
                lo, hi = self.bound(k - 1), self.bound(k)
                value = lo * (hi / lo) ** ((rank - seen) / n)
                return min(max(value, self.min), self.max)
            seen += n
        return self.max

    def cumulative(self, bounds: list[float]) -> list[int]:
        """Counts of values at or under each of `bounds` (exact where a bound is a bucket's)."""
        out, seen, k = [], 0, 0
        for b in bounds:
            while k < len(self.counts) and self.bound(k) <= b * (1 + 1e-12):
                seen += self.counts[k]
                k += 1
            out.append(seen)
        return out
