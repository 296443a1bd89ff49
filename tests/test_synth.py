"""M4-Synth: valid M4-Instruct and bench files, captions for every sample, and answers that the
pixels bear out (checked on the rendered frames, not on the generator's own bookkeeping)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from m4.eval import letter, options
from m4.media import sample_uniform, tile
from m4.media.demo import COLOURS
from m4.prompt import IMAGE
from m4.records import Skipped, load_records
from m4.train.synth import FRAMES, PLACES, TASKS, make, synth


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "m4synth"
    r = subprocess.run([sys.executable, "-m", "m4", "data", "synth", str(out), "--n", "20", "--bench", "20"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def load(path):
    return json.loads(path.read_text())


def test_train_and_caption_records_are_valid_m4_instruct(data):
    skipped = Skipped()
    train = load_records(data / "train.json", data, skipped)
    assert skipped.total == 0 and len(train) == 40
    questions = {r["id"]: r for r in train if not r["id"].endswith("-caption")}
    captions = {r["id"]: r for r in load(data / "captions.json")}
    assert len(questions) == len(captions) == 20
    assert {i.split("-0")[0] for i in questions} == set(TASKS)
    for rid, q in questions.items():
        c = captions[f"{rid}-caption"]
        assert {k: v for k, v in c.items() if k in ("image", "video", "patches")} == \
               {k: v for k, v in q.items() if k in ("image", "video", "patches")}
        described = c["conversations"][1]["value"]
        if "video" in q:
            assert q["conversations"][0]["value"].count(IMAGE) == 1
            assert len(sample_uniform(str(data / q["video"]), FRAMES)) == FRAMES
            assert described.count("Frame ") == FRAMES
        elif len(q["image"]) > 1:
            assert described.count(": ") == len(q["image"])  # "Image 1: ... View 3: ..."
        if TASKS[rid.split("-0")[0]][1] == "multi-choice":  # answered with the option's text
            human, gpt = q["conversations"]
            assert gpt["value"] in options(human["value"]).values() and "option's text" in human["value"]
    assert all(r.get("patches") for r in train if r["id"].startswith("patch-"))


def test_bench_is_llava_interleave_bench_format(data):
    bench = load(data / "bench.json")
    assert len(bench) == 20
    assert {r["metadata"]["scenario"] for r in bench} == {"multi-image", "multi-frame", "multi-view", "multi-patch"}
    for r in bench:
        meta, (human, gpt) = r["metadata"], r["conversations"]
        assert set(r) == {"sample_id", "image", "conversations", "metadata"}
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert (meta["scenario"], meta["question_type"]) == TASKS[meta["dataset"]][:2]
        assert all((data / p).is_file() for p in r["image"])
        marks = human["value"].count(IMAGE)
        if meta["scenario"] == "multi-frame":  # frames go in front: no placeholders
            assert marks == 0 and len(r["image"]) == FRAMES
        else:
            assert marks == len(r["image"])
        if meta["question_type"] == "multi-choice":
            assert letter(gpt["value"]) in options(human["value"])


def test_scenes_say_what_is_where_in_their_pixels(data):
    scenes = load(data / "scenes.json")
    assert len(scenes) == 20 and len({r["id"] for r in scenes}) == 20
    for r in scenes:
        (human, gpt), (path,) = r["conversations"], r["image"]
        assert human["value"] == f"{IMAGE}\nDescribe the image."
        img = np.asarray(Image.open(data / path).convert("RGB"))
        named = gpt["value"].rstrip(".").replace(" and ", ", ").split(", ")  # "a red square at top left"
        assert 1 <= len(named) <= 3
        for words in named:
            colour, place = words.split()[1], words.split(" at ")[1]
            ys, xs = np.nonzero(mask(img, colour))
            assert len(ys), (r["id"], words)
            cell = PLACES[int(3 * ys.mean() / img.shape[0])][int(3 * xs.mean() / img.shape[1])]
            assert cell == place, (r["id"], words)


def test_same_seed_same_files(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synth(tmp_path / name, n=10, bench=2, seed=seed)
    a, b, c = (tmp_path / "a", tmp_path / "b", tmp_path / "c")
    assert (a / "train.json").read_text() == (b / "train.json").read_text()
    assert (a / "media/diff-colour-000000_0.png").read_bytes() == (b / "media/diff-colour-000000_0.png").read_bytes()
    assert (a / "bench.json").read_text() == (b / "bench.json").read_text()
    assert (a / "scenes.json").read_text() == (b / "scenes.json").read_text()
    assert (a / "train.json").read_text() != (c / "train.json").read_text()


def mask(img: np.ndarray, colour: str, tol: int = 40) -> np.ndarray:
    return np.abs(img.astype(int) - np.array(COLOURS[colour])).max(-1) < tol


def colour_of(option: str) -> str:
    return option.split()[1]  # "the red square"


@pytest.mark.parametrize("i", range(6))
def test_spot_the_difference_answers_match_pixels(i):
    item = make("diff-colour", [9, 0, i], 64)
    right = item.answer  # the option's text; the bench's reference is its letter
    assert options(item.question)[item.reference] == right
    a, b = item.images
    assert mask(a, colour_of(right)).sum() > 20 and mask(b, colour_of(right)).sum() == 0
    for wrong in set(options(item.question).values()) - {right}:
        assert mask(a, colour_of(wrong)).sum() == mask(b, colour_of(wrong)).sum() > 20
    item = make("diff-move", [9, 0, i], 64)
    a, b = item.images
    moved = mask(a, item.answer.split()[0]), mask(b, item.answer.split()[0])
    assert moved[0].sum() > 20 and (moved[0] != moved[1]).sum() > 20
    assert sum((mask(a, c) != mask(b, c)).sum() for c in COLOURS if c != item.answer.split()[0]) == 0


def centroid(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("i", range(6))
def test_clips_answers_match_pixels(i):
    item = make("motion", [9, 0, i], 64)
    colour = item.question.split("the ")[1].split()[0]
    step = centroid(mask(item.images[-1], colour)) - centroid(mask(item.images[0], colour))
    axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[item.answer]
    assert step[axis] * sign > 10 and abs(step[1 - axis]) < 1
    item = make("count", [9, 0, i], 64)
    colour = item.question.split("the ")[1].split()[0]
    present = [mask(f, colour).sum() > 10 for f in item.images]
    assert len(present) == FRAMES and sum(present) == int(item.answer)
    assert not any(a and b for a, b in zip(present, present[1:]))  # separate events
    item = make("order", [9, 0, i], 64)
    first = [next(t for t, f in enumerate(item.images) if mask(f, colour_of(o)).sum() > 10)
             for o in item.answer.split(", then ")]
    assert first == sorted(first) and len(set(first)) == 3


@pytest.mark.parametrize("i", range(20))
def test_views_show_every_object_somewhere_and_hide_some(i):
    item = make("view-total" if i % 2 else "view-count", [9, 0, i], 64)
    seen = np.array(item.info["visible"])  # (views, objects): share of each object left visible
    assert 2 <= len(item.images) <= 4
    assert seen.max(0).min() >= 0.6 and seen.min() < 0.25
    if item.task == "view-total":
        assert int(item.answer) == seen.shape[1]


@pytest.mark.parametrize("i", range(10))
def test_patch_object_is_made_out_at_tile_resolution_only(i):
    item = make("patch-colour", [9, 0, i], 64)
    image = item.images[0]
    assert image.shape == (128, 128, 3)
    views = [np.asarray(t) for t in tile(Image.fromarray(image), 64)]  # base view, then 4 tiles
    counts = [mask(v, item.answer).sum() for v in views]
    # the base view halves it: at most a quarter of the pixels, blurred into the background
    assert max(counts[1:]) >= 10 and max(counts[1:]) >= 3 * counts[0]
    # and it sits on a cell of its tile's 3x3 grid (jitter 6% of the tile), as scene shapes do
    ys, xs = np.nonzero(mask(views[1 + int(np.argmax(counts[1:]))], item.answer))
    centre = np.array([xs.min() + xs.max(), ys.min() + ys.max()]) / 2 + 0.5
    assert np.abs(centre % (64 / 3) - 32 / 3).max() <= 0.06 * 64 + 1
