import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m4.errors import M4Error
from m4.media import (
    DemoScene,
    Frame,
    load_image,
    open_source,
    preprocess,
    sample_rate,
    sample_uniform,
    tile,
    write_video,
)
from m4.media.demo import COLOURS

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def quadrants(h: int, w: int) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2 :] = RED, GREEN
    a[h // 2 :, : w // 2], a[h // 2 :, w // 2 :] = BLUE, YELLOW
    return a


def assert_one_line_error(exc: pytest.ExceptionInfo, *parts: str):
    msg = str(exc.value)
    assert "\n" not in msg
    for p in parts:
        assert p in msg, (p, msg)


# --- images -------------------------------------------------------------------------------


def test_load_image_from_path_pil_and_arrays(tmp_path):
    a = quadrants(20, 30)
    Image.fromarray(a).save(tmp_path / "q.png")
    for x in (tmp_path / "q.png", str(tmp_path / "q.png"), Image.fromarray(a), a):
        img = load_image(x)
        assert img.mode == "RGB" and img.size == (30, 20)
        np.testing.assert_array_equal(np.asarray(img), a)

    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(np.asarray(load_image(gray)), np.repeat(gray[..., None], 3, axis=2))

    # transparent pixels become white, opaque ones keep their colour (as transformers does)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    out = np.asarray(load_image(rgba))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (255, 255, 255)
    assert tuple(np.asarray(load_image(Image.fromarray(rgba)))[1, 1]) == (255, 255, 255)


def test_load_image_errors(tmp_path):
    (tmp_path / "a.txt").write_text("not an image\n")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(tmp_path / "f.png")
    data = (tmp_path / "f.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])

    cases = {
        tmp_path / "missing.png": "image not found",
        tmp_path: "is a directory",
        tmp_path / "a.txt": "not an image file",
        tmp_path / "t.png": "truncated",
    }
    for path, reason in cases.items():
        with pytest.raises(M4Error) as e:
            load_image(str(path))
        assert_one_line_error(e, str(path), reason)

    for bad in (np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((2, 4, 4, 3), np.uint8)):
        with pytest.raises(M4Error) as e:
            load_image(bad)
        assert_one_line_error(e, str(bad.shape))
    with pytest.raises(M4Error):
        load_image(42)


def test_preprocess_values():
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, 10:] = 255
    out = preprocess(a, 8)  # a lone array is one image, not a list of rows
    assert out.shape == (1, 3, 8, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, :, 0], -1.0, atol=1e-6)  # black -> -1
    np.testing.assert_allclose(out[0, :, :, -1], 1.0, atol=1e-6)  # white -> +1


def test_preprocess_matches_transformers_siglip():
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle for SigLIP preprocessing")
    proc = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (300, 500, 3), np.uint8),
        Image.fromarray(rng.integers(0, 256, (500, 301, 3), np.uint8)),
        Image.fromarray(rng.integers(0, 256, (50, 60), np.uint8)),  # grayscale
        Image.fromarray(rng.integers(0, 256, (64, 40, 4), np.uint8)),  # with alpha
        quadrants(17, 23),
    ]
    ref = proc(size={"height": 384, "width": 384})(images, return_tensors="np")["pixel_values"]
    ours = preprocess(images, 384)
    assert ours.shape == ref.shape == (5, 3, 384, 384)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


# --- anyres ---------------------------------------------------------------------------------


def centre(img: Image.Image) -> tuple:
    return tuple(int(v) for v in np.asarray(img)[img.height // 2, img.width // 2])


def test_tile_square_image_is_2x2_row_major():
    tiles = tile(quadrants(64, 64), 32)
    assert len(tiles) == 5 and all(t.size == (32, 32) and t.mode == "RGB" for t in tiles)
    # base view first: the whole image downscaled, so its corners keep the quadrant colours
    base = np.asarray(tiles[0])
    assert tuple(base[2, 2]) == RED and tuple(base[-3, -3]) == YELLOW
    # then row-major: top-left, top-right, bottom-left, bottom-right; each tile is one quadrant
    for t, colour in zip(tiles[1:], (RED, GREEN, BLUE, YELLOW)):
        assert (np.asarray(t) == colour).all()


def test_tile_wide_and_tall_images_pad_with_black():
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, :32], wide[:, 32:64], wide[:, 64:] = RED, GREEN, BLUE
    tiles = tile(wide, 16)  # best grid: 3 cols x 1 row (48x16), image scaled to 48x16 exactly
    assert [centre(t) for t in tiles[1:]] == [RED, GREEN, BLUE]

    tall = np.full((130, 40, 3), 200, np.uint8)  # aspect 3.25: 1 col x 3 rows, padded left/right
    tiles = tile(tall, 32)
    assert len(tiles) == 4
    for t in tiles[1:]:
        a = np.asarray(t)
        assert tuple(a[16, 0]) == (0, 0, 0) and tuple(a[16, 31]) == (0, 0, 0)  # pad
        assert tuple(a[16, 16]) == (200, 200, 200)


def test_tile_small_image_tie_follows_llava_next_order():
    # an image smaller than every candidate keeps all its pixels in each: least padding wins,
    # and of the two 2-tile grids LLaVA-NeXT lists (width 384, height 768) first -> a column
    tiles = tile(quadrants(10, 10), 32)
    assert len(tiles) == 3
    top, bottom = np.asarray(tiles[1]), np.asarray(tiles[2])
    assert tuple(top[-1, 16]) != (0, 0, 0) and tuple(top[0, 16]) == (0, 0, 0)
    assert tuple(bottom[0, 16]) != (0, 0, 0) and tuple(bottom[-1, 16]) == (0, 0, 0)


# --- demo scene -----------------------------------------------------------------------------


def test_demo_scene_is_deterministic_and_described():
    a, b, c = DemoScene(seed=3), DemoScene(seed=3), DemoScene(seed=4)
    assert a.num_frames == 100
    f = a.frame(7)
    assert f.shape == (256, 256, 3) and f.dtype == np.uint8
    np.testing.assert_array_equal(f, b.frame(7))
    assert not np.array_equal(f, c.frame(7))
    assert not np.array_equal(a.frame(0), a.frame(50))  # things move
    for seed in range(5):
        desc = DemoScene(seed=seed).describe()
        assert 2 <= len(desc) <= 4
        assert len({d["colour"] for d in desc}) == len(desc)
        for d in desc:
            assert d["kind"] in ("square", "circle", "triangle")
            assert d["direction"] in ("left", "right", "up", "down")


def test_demo_scene_keeps_its_first_shapes():
    for seed in range(5):
        full = DemoScene(seed=seed)
        for k in (1, 2):
            assert DemoScene(seed=seed, shapes=k).shapes == full.shapes[:k]
    lone = DemoScene(seed=0, shapes=1)
    drawn = np.nonzero((lone.frame(30) != lone.frame(30)[0, 0]).any(axis=2))
    assert (lone.frame(30)[drawn] == COLOURS[lone.shapes[0].colour]).all()  # nothing else drawn


def colour_box_centre(frame: np.ndarray, colour: str) -> np.ndarray:
    # bounding-box centre: "start" is the centre of the shape's box (a triangle's centroid is lower)
    ys, xs = np.nonzero((frame == COLOURS[colour]).all(axis=2))
    return np.array([xs.min() + xs.max(), ys.min() + ys.max()]) / 2


def test_demo_shapes_move_as_described():
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for seed in range(20):
        scene = DemoScene(seed=seed)
        first, last = scene.frame(0), scene.frame(scene.num_frames - 1)
        for d in scene.describe():
            moved = colour_box_centre(last, d["colour"]) - colour_box_centre(first, d["colour"])
            assert np.dot(moved, step[d["direction"]]) > 10, (seed, d, moved)  # pixels, in the right direction
            assert np.allclose(colour_box_centre(first, d["colour"]), d["start"], atol=4)


def test_demo_shapes_bounce_and_stay_inside():
    scene = DemoScene(seed=1, width=96, height=64)
    for s in scene.shapes:
        for t in np.linspace(0, 500, 2001):
            x, y = scene.center(s, t)
            assert s.size / 2 - 1e-9 <= x <= 96 - s.size / 2 + 1e-9
            assert s.size / 2 - 1e-9 <= y <= 64 - s.size / 2 + 1e-9
    assert scene.frame(10_000).shape == (64, 96, 3)


# --- video ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, DemoScene]:
    scene = DemoScene(seed=2, width=64, height=48, fps=10.0, duration=2.0)
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, scene.frames(), scene.fps)
    return path, scene


def test_write_and_read_back(clip):
    path, scene = clip
    with open_source(str(path)) as src:
        assert src.is_live is False and src.length == 20
        frames = list(src.frames())
    assert [f.index for f in frames] == list(range(20))
    np.testing.assert_allclose([f.t for f in frames], np.arange(20) / 10, atol=1e-6)
    for f in frames:
        assert f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8
        # lossy codec: close to the rendered frame, and far from a different frame
        err = np.abs(f.image.astype(int) - scene.frame(f.index)).mean()
        assert err < 4, (f.index, err)
    assert np.abs(frames[0].image.astype(int) - scene.frame(19)).mean() > 2 * err


def test_sample_uniform_file(clip):
    path, scene = clip
    frames = sample_uniform(str(path), 5)
    assert [f.index for f in frames] == [0, 5, 10, 14, 19]  # linspace(0, 19, 5).round()
    ts = [f.t for f in frames]
    assert ts == sorted(ts) and ts[0] == 0.0 and abs(ts[-1] - 1.9) < 1e-6
    assert all(f.image.shape == (48, 64, 3) for f in frames)
    assert [f.index for f in sample_uniform(str(path), 50)] == list(range(20))  # fewer than n: all


def test_sample_uniform_counts_frames_when_container_does_not(tmp_path):
    path = tmp_path / "clip.mkv"  # matroska stores no frame count
    write_video(path, (np.full((32, 32, 3), 8 * i, np.uint8) for i in range(13)), 5.0)
    with open_source(str(path)) as src:
        assert src.length is None
    frames = sample_uniform(str(path), 4)
    assert [f.index for f in frames] == [0, 4, 8, 12]
    assert [int(np.median(f.image)) for f in frames] == pytest.approx([0, 32, 64, 96], abs=3)


def test_demo_source():
    with open_source("demo") as src:
        assert src.is_live is False
        first = next(src.frames())
    scene = DemoScene(shapes=1)  # the first shape of seed 0 alone
    np.testing.assert_array_equal(first.image, scene.frame(0))
    frames = sample_uniform("demo", 4)
    assert [f.index for f in frames] == [0, 33, 66, 99]
    assert [f.t for f in frames] == pytest.approx([0.0, 3.3, 6.6, 9.9])
    np.testing.assert_array_equal(frames[2].image, scene.frame(66))


def test_video_errors(tmp_path):
    (tmp_path / "notes.mp4").write_text("hello\n" * 100)
    Image.fromarray(quadrants(16, 16)).save(tmp_path / "still.png")
    shutil.copy(tmp_path / "still.png", tmp_path / "still.mp4")
    with wave.open(str(tmp_path / "sound.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(np.zeros(800, np.int16).tobytes())
    cases = {
        str(tmp_path / "missing.mp4"): "video not found",
        str(tmp_path): "is a directory",
        str(tmp_path / "notes.mp4"): "cannot read video",
        str(tmp_path / "still.mp4"): "still image",
        str(tmp_path / "sound.wav"): "no video stream",
        "http://127.0.0.1:9/x.mp4": "cannot open stream",
    }
    for spec, reason in cases.items():
        with pytest.raises(M4Error) as e:
            open_source(spec)
        assert_one_line_error(e, spec, reason)
    with pytest.raises(M4Error) as e:
        sample_uniform(str(tmp_path / "notes.mp4"), 4)
    assert_one_line_error(e, "notes.mp4")


def test_missing_camera():
    if Path("/dev/video9").exists():
        pytest.skip("this machine has a /dev/video9")
    with pytest.raises(M4Error) as e:
        open_source("cam9")
    assert_one_line_error(e, "cam9", "/dev/video9", "no such device")


# --- rate sampling --------------------------------------------------------------------------


def frames_at(ts) -> list[Frame]:
    return [Frame(np.zeros((1, 1, 3), np.uint8), float(t), i) for i, t in enumerate(ts)]


def test_sample_rate():
    src = frames_at(np.arange(90) / 30)  # 3 s at 30 fps
    kept = list(sample_rate(src, 10))
    assert [f.index for f in kept] == list(range(0, 90, 3))
    # same rate as the source keeps everything, despite 0.1 + 0.1 + 0.1 > 0.3 in floats
    assert len(list(sample_rate(frames_at(np.arange(50) / 10), 10))) == 50
    # after a stall the next frame is kept, and the rate resumes without a burst
    stalled = frames_at([0.0, 0.5, 5.0, 5.1, 5.2, 5.5, 6.0])
    assert [f.t for f in sample_rate(stalled, 2)] == [0.0, 0.5, 5.0, 5.5, 6.0]
    with pytest.raises(M4Error):
        list(sample_rate(src, 0))
