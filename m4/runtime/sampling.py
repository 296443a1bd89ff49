"""Next-token choice from logits: greedy, or temperature with nucleus (top-p), either one
within the answer's constraint where it has one (m4.constraint)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from m4.constraint import Constraint


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    seed: int | None = None
    constraint: Constraint | None = None  # masks the logits before either way of choosing

    def constrained(self, schema: Any = None, choices: list[str] | None = None, regex: str | None = None) -> Sampling:
        """This sampling with the one constraint given (m4.constraint.Constraint.of), or as it
        is where none is."""
        c = Constraint.of(schema, choices, regex)
        return self if c is None else replace(self, constraint=c)

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
