"""Next-token choice from logits: greedy, or temperature with nucleus (top-p)."""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    # the smallest set of most likely tokens whose mass reaches top_p
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), s.top_p)) + 1]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))
