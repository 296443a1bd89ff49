"""Pixels from a checkpoint's preprocessor_config.json, held to transformers' PIL image
processors (CLIPImageProcessorPil, SiglipImageProcessorPil) on photograph-like images of many
shapes, and the configs m4 refuses."""

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from m4.errors import M4Error
from m4.media import ImageProcessing, preprocess

transformers = pytest.importorskip("transformers", reason="transformers is the oracle for preprocessing")

# (width, height): landscape, portrait, tiny both ways, large, already square, odd, one pixel, a strip
SIZES = [(640, 480), (480, 640), (7, 5), (5, 7), (2000, 1500), (336, 336), (337, 500), (1, 1), (1000, 40)]

CLIP_336 = {"image_processor_type": "CLIPImageProcessor", "processor_class": "MLlavaProcessor",
            "do_resize": True, "size": {"shortest_edge": 336}, "do_center_crop": True,
            "crop_size": {"height": 336, "width": 336}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "do_convert_rgb": True}
SIGLIP_384 = {"image_processor_type": "SiglipImageProcessor", "processor_class": "LlavaProcessor",
              "do_resize": True, "size": {"height": 384, "width": 384}, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.5, 0.5, 0.5], "resample": 3}
# the tower's own file (openai/clip-vit-large-patch14-336) in the older layout: ints for sizes
CLIP_336_OLD = {"feature_extractor_type": "CLIPFeatureExtractor", "size": 336, "crop_size": 336,
                "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
                "image_mean": CLIP_336["image_mean"], "image_std": CLIP_336["image_std"]}


def photo(w: int, h: int, seed: int) -> Image.Image:
    """Smooth colour gradients, soft blotches, sensor noise and a few solid shapes, through JPEG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    px = np.stack([120 + 100 * np.sin(3 * x + c) * np.cos(2 * y - c) for c in rng.uniform(0, 6, 3)], -1)
    blotches = rng.normal(128, 40, (max(h // 16, 2), max(w // 16, 2), 3)).clip(0, 255).astype(np.uint8)
    px += np.asarray(Image.fromarray(blotches).resize((w, h), Image.Resampling.BICUBIC), float) - 128
    img = Image.fromarray((px + rng.normal(0, 6, px.shape)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        draw.ellipse([x0, y0, x0 + rng.uniform(1, w / 2 + 1), y0 + rng.uniform(1, h / 2 + 1)],
                     fill=tuple(rng.integers(0, 256, 3).tolist()))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.fixture(scope="module")
def photos():
    imgs = [photo(w, h, i) for i, (w, h) in enumerate(SIZES)]
    rng = np.random.default_rng(9)
    # other inputs m4 takes: an array, grayscale, and transparency composited onto white
    return imgs + [np.asarray(imgs[0]), imgs[1].convert("L"),
                   Image.fromarray(rng.integers(0, 256, (90, 70, 4), np.uint8))]


def reference(cls, cfg: dict, images) -> np.ndarray:
    kwargs = {k: v for k, v in cfg.items() if k not in ("image_processor_type", "feature_extractor_type",
                                                        "processor_class")}
    return cls(**kwargs)(images, return_tensors="np")["pixel_values"]


# Equal to the last bit today (the same PIL resize, then x * 1/255 in float64 cast to float32 and
# (x - mean) / std in float32); the tolerance leaves room for a reordering of those float steps,
# about two float32 ulps at the largest CLIP value (2.2).
ATOL = 1e-6


@pytest.mark.parametrize("cfg", [
    CLIP_336, CLIP_336_OLD, {**CLIP_336, "resample": 2, "image_processor_type": "CLIPImageProcessorFast"},
], ids=["clip", "clip-int-sizes", "clip-bilinear"])
def test_clip_pixels_equal_transformers(cfg, photos):
    p = ImageProcessing.from_config(cfg, 336)
    assert (p.resize, p.size, p.crop) == ("shortest_edge", 336, 336)
    ours, ref = preprocess(photos, p), reference(transformers.CLIPImageProcessorPil, cfg, photos)
    assert ours.shape == ref.shape == (len(photos), 3, 336, 336) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_siglip_pixels_equal_transformers(photos):
    p = ImageProcessing.from_config(SIGLIP_384, 384)
    assert p == ImageProcessing.siglip(384)  # the default for a checkpoint without a config
    ref = reference(transformers.SiglipImageProcessorPil, SIGLIP_384, photos)
    np.testing.assert_allclose(preprocess(photos, p), ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(preprocess(photos, 384), ref, atol=ATOL, rtol=0)  # the int form


def test_from_dir_reads_the_file_or_defaults_to_siglip(tmp_path):
    assert ImageProcessing.from_dir(tmp_path, 384) == ImageProcessing.siglip(384)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CLIP_336))
    assert ImageProcessing.from_dir(tmp_path, 336).mean == tuple(CLIP_336["image_mean"])
    with pytest.raises(M4Error, match="crop_size .* gives 336x336 pixels, the tower takes 384"):
        ImageProcessing.from_dir(tmp_path, 384)
    (tmp_path / "preprocessor_config.json").write_text("{")
    with pytest.raises(M4Error, match="cannot read .*preprocessor_config.json"):
        ImageProcessing.from_dir(tmp_path, 336)


@pytest.mark.parametrize("change, field", [
    ({"image_processor_type": "Idefics2ImageProcessor", "do_image_splitting": True}, "image_processor_type"),
    ({"image_processor_type": None}, "image_processor_type"),
    ({"do_pad": True}, "do_pad"),
    ({"resample": 7}, "resample"),
    ({"resample": "bicubic"}, "resample"),
    ({"do_resize": False}, "do_resize"),
    ({"do_center_crop": False}, "do_center_crop"),
    ({"size": {"height": 336, "width": 448}, "do_center_crop": False}, "size"),
    ({"size": {"shortest_edge": 336, "longest_edge": 672}}, "size"),
    ({"crop_size": {"height": 336, "width": 300}}, "crop_size"),
    ({"crop_size": {"height": 400, "width": 400}}, "crop_size"),
    ({"size": {"shortest_edge": 384}, "crop_size": {"height": 384, "width": 384}}, "crop_size"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
])
def test_configs_m4_cannot_honour_are_refused_by_field(change, field):
    with pytest.raises(M4Error) as e:
        ImageProcessing.from_config({**CLIP_336, **change}, 336)
    msg = str(e.value)
    assert field in msg and "\n" not in msg, msg
