"""M4-Synth: procedurally rendered data for the four M4 scenarios, in M4-Instruct format.

Tasks (scenario, question type):
  multi-image  diff-colour (multi-choice), diff-move, diff-describe   spot the difference
  multi-frame  motion, order, count                                  direction, order of appearance, events
  multi-view   view-count, view-total                                objects of a colour / all objects in a
                                                                     scene seen from 2-4 viewpoints, some of
                                                                     which hide some objects
  multi-patch  patch-colour, patch-shape (multi-choice)              one small object in a large image,
                                                                     made out at tile resolution
Every sample also yields a dense caption of its media (per image, frame or view): a tiny model
trained on one-word answers alone learns the answer prior and ignores the images, so the
captions give it a signal per object to learn to look with (docs/demo-model.md, "Recipe"). Even
those are too hard for a model that has never looked: from scratch the demo preset stays
blind on them, so each sample also yields a scene, one image of 1-3 shapes and its caption,
the first stage of the demo recipe (docs/demo-model.md).

Output (paths relative to OUT):
  train.json     M4-Instruct records: questions and captions; videos as MP4 (`video`)
  scenes.json    single-image captions of 1-3 shapes: stage 0 of the demo recipe
  captions.json  the caption records alone: stage 1
  bench.json     LLaVA-Interleave Bench records (videos as frame PNGs, `metadata.scenario`)
  media/         PNG and MP4 files
Multi-patch records carry `"patches": true` (m4's extension): the trainer and `m4 eval` feed
the image as its anyres base view and tiles.
"""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import Progress

from m4.atomic import atomic_directory
from m4.errors import M4Error
from m4.media import write_video
from m4.media.demo import BACKGROUND, COLOURS, KINDS, DemoScene, draw_shape
from m4.model.config import PRESETS
from m4.prompt import IMAGE

FRAMES = 8  # frames per clip: what `m4 train --frames` and `m4.load(...).ask(video=path)` sample
# Multiple choice is answered with the option's text, not its letter: the demo decoder, trained
# from scratch, did not learn to pick the letter of the option that names what it sees
# (docs/demo-model.md). `m4 eval` scores the text or the letter alike, and
# bench records keep the letter as their reference, as LLaVA-Interleave Bench does.
CHOICE = "Answer with the option's text from the given choices directly."
PLACES = [["top left", "top", "top right"], ["left", "centre", "right"], ["bottom left", "bottom", "bottom right"]]
GROUND = (96, 96, 96)  # the floor under multi-view scenes
VIEW_COLOURS = ["red", "green", "blue", "yellow"]  # of multi-view objects: fewer, so colours repeat
HORIZON = 0.3  # of the height


@dataclass(frozen=True)
class Obj:
    kind: str
    colour: str
    x: float  # centre, pixels
    y: float
    r: float  # half-size, pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass
class Item:
    task: str
    images: list[np.ndarray]  # stills, views, one large image, or a clip's frames
    question: str  # with one <image> per image; a clip's question has none (frames go in front)
    answer: str
    caption: tuple[str, str]  # (question, answer) of the dense caption of the same media
    video: bool = False
    patches: bool = False
    info: dict = field(default_factory=dict)  # ground truth the tests check (multi-view visibility)
    reference: str | None = None  # the bench's answer where it differs: a multiple choice's letter


# -- drawing and describing ---------------------------------------------------------------

def render(objs: list[Obj], w: int, h: int, horizon: float | None = None) -> np.ndarray:
    img = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if horizon is not None:
        draw.rectangle((0, horizon, w, h), fill=GROUND)
    for o in objs:
        draw_shape(draw, o.kind, o.x, o.y, o.r, COLOURS[o.colour])
    return np.array(img)


def place(x: float, y: float, w: int, h: int) -> str:
    return PLACES[min(int(3 * y / h), 2)][min(int(3 * x / w), 2)]


def describe(objs: list[Obj], w: int, h: int, sizes: bool = False) -> str:
    """'a red square at top left, a blue circle at centre and ...' ('nothing' when empty)."""
    words = [a_or_an(f"{'small ' if sizes and o.r < w / 20 else 'large ' if sizes else ''}{o.name}")
             + f" at {place(o.x, o.y, w, h)}" for o in sorted(objs, key=lambda o: (int(3 * o.y / h), o.x))]
    return joined(words) if words else "nothing"


def joined(words: list[str]) -> str:
    """'a, b and c'."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


SHAPE = re.compile(r"an? (\w+) (\w+) at ([a-z ]+?)(?=,| and |\.)")  # what describe writes of a shape


def read_description(text: str) -> list[tuple[str, str, str]]:
    """describe's words read back (from a caption, or a model's): (colour, kind, place) of each
    shape it names."""
    return SHAPE.findall(text)


def a_or_an(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def listing(label: str, descriptions: list[str]) -> str:
    return " ".join(f"{label} {i + 1}: {d}." for i, d in enumerate(descriptions))


def grid_objects(rng, n: int, size: int, cells=None) -> list[Obj]:
    """n shapes of distinct colours in distinct cells of a 3x3 grid, so places name them."""
    colours = rng.choice(list(COLOURS), n, replace=False).tolist()
    cells = cells or rng.choice(9, n, replace=False).tolist()
    return [cell_object(rng, str(rng.choice(KINDS)), c, cell, size) for c, cell in zip(colours, cells)]


def cell_object(rng, kind: str, colour: str, cell: int, size: int, scale=(0.16, 0.22)) -> Obj:
    step = size / 3
    x, y = (cell % 3 + 0.5) * step, (cell // 3 + 0.5) * step
    jitter = rng.uniform(-0.06, 0.06, 2) * size
    return Obj(kind, colour, x + jitter[0], y + jitter[1], rng.uniform(*scale) * size / 2)


def choices(rng, options: list[str], right: str) -> tuple[str, str]:
    """Shuffled options as 'A. ...' lines, and the right one's letter."""
    order = rng.permutation(len(options)).tolist()
    shown = [options[i] for i in order]
    lines = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(shown))
    return lines, chr(65 + shown.index(right))


# -- multi-image: spot the difference -------------------------------------------------------

def changed_pair(rng, size: int, how: str) -> tuple[list[Obj], list[Obj], int]:
    """Two scenes that differ in one object's colour or place; the index of that object."""
    n = int(rng.integers(3, 5))
    cells = rng.choice(9, n + 1, replace=False).tolist()
    a = grid_objects(rng, n, size, cells=cells[:n])
    k = int(rng.integers(n))
    o = a[k]
    if how == "colour":
        new = str(rng.choice([c for c in COLOURS if c not in {p.colour for p in a}]))
        b = a[:k] + [Obj(o.kind, new, o.x, o.y, o.r)] + a[k + 1:]
    else:
        moved = cell_object(rng, o.kind, o.colour, cells[n], size)
        b = a[:k] + [Obj(o.kind, o.colour, moved.x, moved.y, o.r)] + a[k + 1:]
    return a, b, k


def diff_item(task: str, size: int, a: list[Obj], b: list[Obj], question: str, answer: str) -> Item:
    # One prompt form, as the views' and the patches': the trainer already varies where the
    # images go, and with a second wording ("The first image is <image> and ...") the demo
    # preset learned diff-move more slowly (docs/demo-model.md)
    captions = [describe(a, size, size), describe(b, size, size)]
    return Item(task, [render(a, size, size), render(b, size, size)], f"{IMAGE}\n{IMAGE}\n{question}", answer,
                (f"{IMAGE}\n{IMAGE}\nDescribe each image.", listing("Image", captions)))


def diff_colour(rng, size: int) -> Item:
    a, b, k = changed_pair(rng, size, "colour")
    right = f"the {a[k].name}"
    lines, letter = choices(rng, [f"the {o.name}" for o in a], right)
    return replace(diff_item("diff-colour", size, a, b, f"Which object changed colour?\n{lines}\n{CHOICE}", right),
                   reference=letter)


def diff_move(rng, size: int) -> Item:
    a, b, k = changed_pair(rng, size, "move")
    return diff_item("diff-move", size, a, b, "Which object moved? Answer with its colour and shape.", a[k].name)


def diff_describe(rng, size: int) -> Item:
    how = str(rng.choice(["colour", "move"]))
    a, b, k = changed_pair(rng, size, how)
    o, p = a[k], b[k]
    if how == "colour":
        answer = f"The {o.kind} at {place(o.x, o.y, size, size)} changed colour from {o.colour} to {p.colour}."
    else:
        answer = f"The {o.name} moved from {place(o.x, o.y, size, size)} to {place(p.x, p.y, size, size)}."
    return diff_item("diff-describe", size, a, b, "What is the difference between the two images?", answer)


# -- multi-frame: a clip of FRAMES frames ---------------------------------------------------

def clip_item(task: str, frames: list[list[Obj]], w: int, question: str, answer: str, images=None) -> Item:
    captions = listing("Frame", [describe(f, w, w) for f in frames])
    return Item(task, images or [render(f, w, w) for f in frames], question, answer,
                ("Describe each frame.", captions), video=True)


def scene_objects(scene: DemoScene) -> list[list[Obj]]:
    """The shapes of each frame of a demo scene, where they are in it."""
    return [[Obj(s.kind, s.colour, *scene.center(s, i / scene.fps), s.size / 2) for s in scene.shapes]
            for i in range(scene.num_frames)]


def clip_scene(rng, w: int, shapes: int | None = None) -> DemoScene:
    """A demo scene as a motion clip has it: w px square, FRAMES frames over its 10 seconds."""
    return DemoScene(seed=int(rng.integers(2**31)), width=w, height=w, fps=FRAMES / 10, duration=10.0, shapes=shapes)


def motion(rng, size: int, shapes: int | None = None) -> Item:
    """A demo scene (`m4 run --video demo` is one of one shape), FRAMES frames over its 10 seconds."""
    scene = clip_scene(rng, 4 * size, shapes)
    frames = scene_objects(scene)
    s = scene.shapes[int(rng.integers(len(scene.shapes)))]
    item = clip_item("motion", frames, 4 * size, f"Which way does the {s.colour} {s.kind} move?", s.direction,
                     images=list(scene.frames()))
    item.info["scene"] = scene  # the geometry the tests check per-frame answers against
    return item


def order(rng, size: int) -> Item:
    objs = grid_objects(rng, 3, size)
    starts = sorted(rng.choice(np.arange(1, FRAMES - 1), 2, replace=False).tolist())
    starts = [int(rng.integers(0, min(2, starts[0])))] + starts
    frames = [[o for o, s in zip(objs, starts) if s <= t] for t in range(FRAMES)]
    answer = ", then ".join(f"the {o.name}" for o in objs)
    return clip_item("order", frames, size, "In which order do the shapes appear?", answer)


def count(rng, size: int) -> Item:
    n = int(rng.integers(1, 5))
    # frames at least two apart, so that every appearance is a separate event
    shown = sorted(rng.choice(np.arange(FRAMES - n + 1), n, replace=False).tolist())
    shown = [f + i for i, f in enumerate(shown)]
    cells = rng.choice(9, 3, replace=False).tolist()
    objs = grid_objects(rng, 3, size, cells=cells)
    target, still = objs[0], objs[1:int(rng.integers(2, 4))]
    frames = [still + ([target] if t in shown else []) for t in range(FRAMES)]
    return clip_item("count", frames, size, f"How many times does the {target.name} appear?", str(n))


# -- multi-view: one 3D scene from 2-4 viewpoints -------------------------------------------

@dataclass(frozen=True)
class Thing:
    kind: str
    colour: str
    x: float  # ground plane, scene units
    z: float


def project(t: Thing, angle: float, size: int, radius=0.25, distance=2.6, height=0.8) -> tuple[Obj, float]:
    """Perspective view from a camera circling the scene at `height` above the floor: the
    shape on screen, and its depth."""
    u = t.x * math.cos(angle) + t.z * math.sin(angle)
    depth = -t.x * math.sin(angle) + t.z * math.cos(angle) + distance
    f = 1.2 * size
    r = f * radius / depth
    ground = HORIZON * size + f * height / depth
    return Obj(t.kind, t.colour, size / 2 + f * u / depth, ground - r, r), depth


def view(things: list[Thing], angle: float, size: int) -> tuple[np.ndarray, list[Obj], list[float]]:
    """The view's pixels, each thing's shape on screen, and the share of it left visible."""
    placed = [project(t, angle, size) for t in things]
    objs = [o for o, _ in placed]
    far_first = sorted(range(len(things)), key=lambda i: -placed[i][1])
    canvas = Image.new("L", (size, size), 0)
    for i in far_first:
        draw_shape(ImageDraw.Draw(canvas), objs[i].kind, objs[i].x, objs[i].y, objs[i].r, i + 1)
    ids = np.asarray(canvas)
    visible = []
    for i, o in enumerate(objs):
        alone = Image.new("L", (size, size), 0)
        draw_shape(ImageDraw.Draw(alone), o.kind, o.x, o.y, o.r, 1)
        own = np.asarray(alone).astype(bool)
        visible.append(float((ids[own] == i + 1).sum() / max(own.sum(), 1)))
    return render([objs[i] for i in far_first], size, size, horizon=HORIZON * size), objs, visible


def views_scene(rng, size: int):
    """A scene whose every object shows in some view while some view hides some object."""
    while True:
        n = int(rng.integers(3, 7))
        pts: list[np.ndarray] = []
        while len(pts) < n:
            p = rng.uniform(-1, 1, 2)
            if np.hypot(*p) <= 1 and all(np.hypot(*(p - q)) > 0.5 for q in pts):
                pts.append(p)
        things = [Thing(str(rng.choice(KINDS)), str(rng.choice(VIEW_COLOURS)), *p) for p in pts]
        k = int(rng.integers(2, 5))
        start = rng.uniform(0, 2 * math.pi)
        views = [view(things, start + 2 * math.pi * v / k + rng.uniform(-0.3, 0.3), size) for v in range(k)]
        seen = np.array([vis for _, _, vis in views])  # (views, things)
        if seen.max(0).min() >= 0.6 and seen.min() < 0.25:
            return things, views, seen


def views_item(task: str, size: int, question: str, answer: str, views, seen) -> Item:
    # a view's caption names what it shows: objects at least half visible
    captions = [describe([o for o, v in zip(objs, vis) if v >= 0.5], size, size) for _, objs, vis in views]
    head = f"{IMAGE}\n" * len(views)
    return Item(task, [img for img, _, _ in views], head + question, answer,
                (head + "Describe each view.", listing("View", captions)), info={"visible": seen.tolist()})


def view_count(rng, size: int) -> Item:
    things, views, seen = views_scene(rng, size)
    colour = str(rng.choice(sorted({t.colour for t in things}) + VIEW_COLOURS))
    n = sum(t.colour == colour for t in things)
    return views_item("view-count", size, f"The images show one scene from several viewpoints. "
                      f"How many {colour} objects are in the scene?", str(n), views, seen)


def view_total(rng, size: int) -> Item:
    things, views, seen = views_scene(rng, size)
    return views_item("view-total", size, "The images show one scene from several viewpoints. "
                      "How many objects are in the scene?", str(len(things)), views, seen)


# -- multi-patch: a small object in an image twice the model's size ------------------------

def patch_scene(rng, size: int) -> tuple[list[Obj], Obj]:
    """Two large shapes and one small one, inside one anyres tile. The small one is as large
    in its tile as a scene shape in its image (about half a 32-px patch of the demo preset),
    and sits, as they do, on a cell of its tile's 3x3 grid: the demo tower reads a shape
    centred in a patch and barely one that straddles patches (docs/demo-model.md, "Data:
    M4-Synth"). The downscaled base view shrinks it to a quarter of the pixels, blurred into
    the background."""
    big = 2 * size
    cells = rng.choice(9, 2, replace=False).tolist()
    colours = rng.choice(list(COLOURS), 3, replace=False).tolist()
    large = [cell_object(rng, str(rng.choice(KINDS)), c, cell, big, scale=(0.18, 0.24))
             for c, cell in zip(colours[:2], cells)]
    while True:
        tx, ty = rng.integers(0, 2, 2) * size
        o = cell_object(rng, str(rng.choice(KINDS)), colours[2], int(rng.integers(9)), size, scale=(1 / 6, 1 / 6))
        small = replace(o, x=tx + o.x, y=ty + o.y)
        if all(max(abs(small.x - p.x), abs(small.y - p.y)) > p.r + small.r + 2 for p in large):
            return large, small


def patch_item(task: str, size: int, large: list[Obj], small: Obj, question: str, answer: str) -> Item:
    objs = large + [small]
    return Item(task, [render(objs, 2 * size, 2 * size)], f"{IMAGE}\n{question}", answer,
                (f"{IMAGE}\nDescribe the image in detail.", describe(objs, 2 * size, 2 * size, sizes=True) + "."),
                patches=True)


def patch_colour(rng, size: int) -> Item:
    large, small = patch_scene(rng, size)
    return patch_item("patch-colour", size, large, small, f"What colour is the small {small.kind}?", small.colour)


def patch_shape(rng, size: int) -> Item:
    large, small = patch_scene(rng, size)
    lines, letter = choices(rng, list(KINDS), small.kind)
    return replace(patch_item("patch-shape", size, large, small,
                              f"What shape is the small {small.colour} object?\n{lines}\n{CHOICE}", small.kind),
                   reference=letter)


# task -> (scenario, question type, generator)
TASKS = {
    "diff-colour": ("multi-image", "multi-choice", diff_colour),
    "diff-move": ("multi-image", "open-ended", diff_move),
    "diff-describe": ("multi-image", "open-ended", diff_describe),
    "motion": ("multi-frame", "open-ended", motion),
    "order": ("multi-frame", "open-ended", order),
    "count": ("multi-frame", "open-ended", count),
    "view-count": ("multi-view", "open-ended", view_count),
    "view-total": ("multi-view", "open-ended", view_total),
    "patch-colour": ("multi-patch", "open-ended", patch_colour),
    "patch-shape": ("multi-patch", "multi-choice", patch_shape),
}


def make(task: str, seed: list[int], size: int) -> Item:
    return TASKS[task][2](np.random.default_rng(seed), size)


# -- writing the data set -------------------------------------------------------------------

def conversation(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def save_images(root: Path, stem: str, images: list[np.ndarray]) -> list[str]:
    names = [f"media/{stem}_{k}.png" for k in range(len(images))]
    for name, img in zip(names, images):
        Image.fromarray(img).save(root / name)
    return names


def train_records(root: Path, i: int, item: Item) -> tuple[dict, dict]:
    """The question record and the caption record of one sample (same media)."""
    rid = f"{item.task}-{i:06d}"
    media: dict[str, str | list[str]]
    if item.video:
        video = f"media/{rid}.mp4"
        media = {"video": video}
        write_video(root / video, item.images, fps=FRAMES)
        pair = [(f"{IMAGE}\n{q}", a) for q, a in ((item.question, item.answer), item.caption)]
    else:
        media = {"image": save_images(root, rid, item.images)}
        pair = [(item.question, item.answer), item.caption]
    extra = {"patches": True} if item.patches else {}
    return ({"id": rid, **media, **extra, "conversations": conversation(*pair[0])},
            {"id": f"{rid}-caption", **media, **extra, "conversations": conversation(*pair[1])})


def scene_record(root: Path, i: int, seed: int, size: int) -> dict:
    """One image of 1-3 shapes in distinct cells, and what is where."""
    rng = np.random.default_rng([seed, 2, i])
    objs = grid_objects(rng, int(rng.integers(1, 4)), size)
    rid = f"scene-{i:06d}"
    return {"id": rid, "image": save_images(root, rid, [render(objs, size, size)]),
            "conversations": conversation(f"{IMAGE}\nDescribe the image.", describe(objs, size, size) + ".")}


def bench_record(root: Path, i: int, item: Item, like: str | None = None) -> dict:
    """`like`: the task whose scenario and question type an item of another task has."""
    rid = f"{item.task}-bench-{i:06d}"
    scenario, qtype, _ = TASKS[like or item.task]
    meta: dict[str, str | bool] = {"question_type": qtype, "dataset": item.task, "scenario": scenario}
    if item.patches:
        meta["patches"] = True
    return {"sample_id": rid, "image": save_images(root, rid, item.images),
            "conversations": conversation(item.question, item.reference or item.answer), "metadata": meta}


def render_chunk(root: Path, names: list[str], seed: int, size: int, split: int, indices: range) -> list:
    """Render and write samples `indices` of one split (0 train, 1 bench): a unit of work for
    one process. A sample depends on its index alone, so any split of the work gives the
    same files."""
    items = ((i, make(names[i % len(names)], [seed, split, i], size)) for i in indices)
    if split == 0:
        return [(*train_records(root, i, item), scene_record(root, i, seed, size)) for i, item in items]
    return [bench_record(root, i, item) for i, item in items]


def synth(out: Path, n: int = 2000, bench: int = 200, seed: int = 0, size: int | None = None,
          workers: int | None = None) -> dict[str, int]:
    """Write M4-Synth to `out` (replaced atomically): n train samples (each with its caption
    record and a scene) and `bench` bench samples, tasks taken in turn, rendered by `workers`
    processes (default: all cores).
    `size` is the model's image size (default: the demo preset's)."""
    size = size or PRESETS["demo"].vision.image_size
    if size < 16 or size % 2:
        raise M4Error(f"--size must be an even number of pixels >= 16, got {size}")
    names, workers = list(TASKS), workers or os.cpu_count() or 1
    step = 250  # samples per unit of work: small enough to balance, large enough to amortise
    with atomic_directory(Path(out)) as root, ProcessPoolExecutor(workers) as pool, \
            Progress(console=Console(stderr=True), transient=True) as bar:
        (root / "media").mkdir()
        results = []
        for split, count in ((0, n), (1, bench)):
            task = bar.add_task("train" if split == 0 else "bench", total=count)
            jobs = [pool.submit(render_chunk, root, names, seed, size, split, range(a, min(a + step, count)))
                    for a in range(0, count, step)]
            done = []
            for job in jobs:  # in order: the records keep their index order
                done += job.result()
                bar.update(task, completed=len(done))
            results.append(done)
        files = {"train": [r for q, c, _ in results[0] for r in (q, c)], "captions": [c for _, c, _ in results[0]],
                 "scenes": [s for *_, s in results[0]], "bench": results[1]}
        for name, records in files.items():
            (root / f"{name}.json").write_text(json.dumps(records, indent=1))
    return {name: len(records) for name, records in files.items()}
