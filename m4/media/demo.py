"""A generated video scene, so that a fresh machine without cameras or files has video.

A few coloured shapes move at constant velocity over a plain background and bounce off the
edges. Positions are closed-form in time, so any frame can be rendered on its own and a
seed always gives the same pixels. Each shape starts on the side it moves away from and
covers at most half the free span in `duration`, and no two shapes' paths touch within the
clip, so it never bounces or hides and "which way does the red square move?" has one answer;
describe() gives it. `shapes` keeps the first few of a seed's shapes (the others are drawn
after them, so they are the same shapes as in the full scene).
"""

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 60, 220),
    "cyan": (40, 210, 220),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
KINDS = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image y grows down
# Mid-grey, which preprocessing maps to 0: an empty patch then embeds to almost nothing, so
# image tokens differ by what they show. On a dark background every token was mostly the same
# large vector (95-98% of its energy): trained from scratch on scenes (96 px, tower frozen),
# the demo preset named 23% of colours right after 3,000 steps there, 85% on mid-grey.
BACKGROUND = (128, 128, 128)


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: int  # side / diameter in pixels
    x0: float  # centre at t = 0
    y0: float
    vx: float  # pixels per second
    vy: float
    direction: str


class DemoScene:
    def __init__(self, seed: int = 0, width: int = 256, height: int = 256, fps: float = 10.0, duration: float = 10.0,
                 shapes: int | None = None):
        self.width, self.height, self.fps, self.duration = width, height, fps, duration
        self.num_frames = round(duration * fps)
        rng = np.random.default_rng(seed)
        n = int(rng.integers(2, 5))
        colours = rng.choice(list(COLOURS), size=n, replace=False)
        self.shapes: list[Shape] = []
        for c in colours[:shapes]:
            # redraw a shape whose path would cross another's: occluded shapes make wrong answers
            for _ in range(100):
                shape = self._make_shape(rng, str(c))
                if not any(self._collide(shape, other) for other in self.shapes):
                    break
            self.shapes.append(shape)

    def _make_shape(self, rng: np.random.Generator, colour: str) -> Shape:
        size = int(rng.integers(min(self.width, self.height) // 8, min(self.width, self.height) // 5 + 1))
        direction = str(rng.choice(list(DIRECTIONS)))
        dx, dy = DIRECTIONS[direction]
        lo = size / 2
        spans = (self.width - size, self.height - size)
        # speed and start chosen so the shape travels at most half its span without bouncing
        speed = rng.uniform(0.3, 0.5) * spans[dy != 0] / self.duration
        travel = speed * self.duration
        start = []
        for axis, d in ((0, dx), (1, dy)):
            first, last = lo, lo + spans[axis]
            if d > 0:
                last -= travel
            elif d < 0:
                first += travel
            start.append(rng.uniform(first, last))
        return Shape(str(rng.choice(KINDS)), colour, size, start[0], start[1], dx * speed, dy * speed, direction)

    def _collide(self, a: Shape, b: Shape) -> bool:
        for i in range(self.num_frames):
            (ax, ay), (bx, by) = self.center(a, i / self.fps), self.center(b, i / self.fps)
            if max(abs(ax - bx), abs(ay - by)) < (a.size + b.size) / 2 + 2:
                return True
        return False

    def center(self, shape: Shape, t: float) -> tuple[float, float]:
        """Centre of a shape at time t, reflecting off the edges."""
        lo = shape.size / 2
        return (
            _bounce(shape.x0 + shape.vx * t, lo, self.width - lo),
            _bounce(shape.y0 + shape.vy * t, lo, self.height - lo),
        )

    def frame(self, i: int) -> np.ndarray:
        img = Image.new("RGB", (self.width, self.height), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for s in self.shapes:
            x, y = self.center(s, i / self.fps)
            draw_shape(draw, s.kind, x, y, s.size / 2, COLOURS[s.colour])
        return np.array(img)

    def frames(self) -> Iterator[np.ndarray]:
        return (self.frame(i) for i in range(self.num_frames))

    def describe(self) -> list[dict]:
        return [
            {
                "colour": s.colour,
                "kind": s.kind,
                "size": s.size,
                "start": (round(s.x0), round(s.y0)),
                "velocity": (round(s.vx, 2), round(s.vy, 2)),
                "direction": s.direction,
            }
            for s in self.shapes
        ]


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, x: float, y: float, r: float, fill) -> None:
    """One of KINDS centred at (x, y) with half-size r (also M4-Synth's renderer)."""
    if kind == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    elif kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)


def _bounce(p: float, lo: float, hi: float) -> float:
    # Fold the unbounded straight-line position back into [lo, hi] (a triangle wave).
    span = hi - lo
    q = (p - lo) % (2 * span)
    return lo + (q if q <= span else 2 * span - q)
