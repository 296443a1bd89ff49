"""Images in: paths, PIL images or arrays -> RGB PIL images -> the vision tower's pixel arrays.

How pixels are made is read from the checkpoint's preprocessor_config.json (transformers'
SigLIP or CLIP image processor) and reproduces the PIL path of those processors exactly:
PIL resize of the uint8 image, centre crop, x * rescale_factor in float64 cast to float32,
then (x - mean) / std in float32.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from m4.errors import M4Error

ImageLike = Union[str, Path, Image.Image, np.ndarray]


def load_image(x: ImageLike) -> Image.Image:
    """Any accepted image input as a fully decoded RGB PIL image."""
    if isinstance(x, (str, Path)):
        return to_rgb(_open(Path(x)))
    if isinstance(x, Image.Image):
        return to_rgb(x)
    if isinstance(x, np.ndarray):
        return to_rgb(_from_array(x))
    raise M4Error(f"not an image: expected a path, PIL image or uint8 array, got {type(x).__name__}")


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise M4Error(f"image not found: {path}")
    if path.is_dir():
        raise M4Error(f"cannot decode image {path}: is a directory")
    try:
        img = Image.open(path)
        img.load()  # PIL decodes lazily; surface truncation and corrupt data here
    except Image.UnidentifiedImageError:
        raise M4Error(f"cannot decode image {path}: not an image file") from None
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, ...
        raise M4Error(f"cannot decode image {path}: {_one_line(e)}") from None
    return img


def _from_array(a: np.ndarray) -> Image.Image:
    # fromarray infers L / RGB / RGBA from these shapes
    if a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        return Image.fromarray(np.ascontiguousarray(a))
    raise M4Error(f"bad image array: expected HxW, HxWx3 or HxWx4 uint8, got shape {a.shape} {a.dtype}")


def to_rgb(img: Image.Image) -> Image.Image:
    # Transparency is composited onto white, as transformers' convert_to_rgb does, so that
    # pixels match the reference processor for RGBA / palette-with-transparency inputs.
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: CLIPImageProcessor's defaults
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's codes


@dataclass(frozen=True)
class ImageProcessing:
    """How an image becomes the tower's pixels: resize, optional centre crop, rescale, normalise."""
    resize: str  # "square": to size x size; "shortest_edge": the short side to size, aspect kept
    size: int
    crop: int | None  # centre crop to crop x crop after the resize
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale: float = 1 / 255
    resample: int = 3  # a PIL resampling code; 3 is bicubic

    @property
    def image_size(self) -> int:
        return self.crop or self.size

    @classmethod
    def siglip(cls, image_size: int) -> "ImageProcessing":
        """SigLIP's processor: a square bicubic resize, 0.5/0.5."""
        return cls("square", image_size, None)

    @classmethod
    def clip(cls, image_size: int) -> "ImageProcessing":
        """CLIP's processor: the shortest edge resized, a centre crop, OpenAI's mean and std."""
        return cls("shortest_edge", image_size, image_size, CLIP_MEAN, CLIP_STD)

    @classmethod
    def for_tower(cls, tower: str, image_size: int) -> "ImageProcessing":
        """The processor a tower ("siglip" or "clip") was trained with."""
        return cls.clip(image_size) if tower == "clip" else cls.siglip(image_size)

    @classmethod
    def from_dir(cls, path: Path, image_size: int, tower: str = "siglip") -> "ImageProcessing":
        """A checkpoint's or bundle's preprocessor_config.json; without one, the processor its
        tower ("siglip" or "clip") was trained with."""
        f = Path(path) / "preprocessor_config.json"
        if not f.is_file():
            return cls.for_tower(tower, image_size)
        try:
            cfg = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise M4Error(f"cannot read {f}: {_one_line(e)}") from None
        return cls.from_config(cfg, image_size, where=str(f))

    @classmethod
    def from_config(cls, cfg: dict, image_size: int | None = None, where: str = "preprocessor_config.json"
                    ) -> "ImageProcessing":
        """transformers' CLIPImageProcessor or SiglipImageProcessor config, with the class
        defaults for missing fields as transformers fills them; anything else is refused."""
        def bad(field: str, why: str):
            return M4Error(f"{where}: {field} {cfg.get(field)!r}: {why}")

        kind = str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "")
        family = kind.removesuffix("Fast").removesuffix("Pil")
        family = family.removesuffix("ImageProcessor").removesuffix("FeatureExtractor")
        if family not in ("CLIP", "Siglip"):
            field = "image_processor_type" if "image_processor_type" in cfg else "feature_extractor_type"
            raise bad(field, "m4 reads CLIPImageProcessor and SiglipImageProcessor configs only")
        clip = family == "CLIP"
        # do_convert_rgb is not read: m4 always converts, as the tower takes three channels
        for field in ("do_pad", "use_square_size"):  # the options of these classes m4 does not implement
            if cfg.get(field):
                raise bad(field, "m4 does not implement it")
        if not cfg.get("do_resize", True):
            raise bad("do_resize", "the tower takes a fixed size, so m4 always resizes")

        size = cfg.get("size", {"shortest_edge": 224} if clip else {"height": 224, "width": 224})
        if isinstance(size, int):  # old configs: an int is the shortest edge for both classes
            size = {"shortest_edge": size}
        if isinstance(size, dict) and set(size) == {"shortest_edge"}:
            resize, n = "shortest_edge", size["shortest_edge"]
        elif isinstance(size, dict) and set(size) == {"height", "width"} and size["height"] == size["width"]:
            resize, n = "square", size["height"]
        else:
            raise bad("size", 'expected {"shortest_edge": N} or {"height": N, "width": N}')

        crop = None
        if cfg.get("do_center_crop", clip):
            c = cfg.get("crop_size", {"height": 224, "width": 224})
            c = {"height": c, "width": c} if isinstance(c, int) else c
            if not (isinstance(c, dict) and set(c) == {"height", "width"} and c["height"] == c["width"]):
                raise bad("crop_size", 'expected a square {"height": N, "width": N}')
            crop = c["height"]
            if crop > n:  # transformers would pad with black; no real checkpoint does
                raise bad("crop_size", f"is larger than the resized image ({n})")
        elif resize == "shortest_edge":
            raise bad("do_center_crop", "without a crop, a shortest-edge resize does not give square pixels")

        resample = cfg.get("resample", 3)
        if not isinstance(resample, int) or resample not in RESAMPLE:
            codes = ", ".join(f"{k} ({v})" for k, v in RESAMPLE.items())
            raise bad("resample", f"expected a PIL resampling code: {codes}")
        mean, std = (0.0,) * 3, (1.0,) * 3  # (x - 0) / 1 is x exactly
        if cfg.get("do_normalize", True):
            mean = _triple(cfg, "image_mean", CLIP_MEAN if clip else (0.5,) * 3, where)
            std = _triple(cfg, "image_std", CLIP_STD if clip else (0.5,) * 3, where)
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        p = cls(resize, n, crop, mean, std, rescale, int(resample))
        if image_size is not None and p.image_size != image_size:
            raise bad("crop_size" if crop else "size",
                      f"gives {p.image_size}x{p.image_size} pixels, the tower takes {image_size}")
        return p

    def resized(self, img: Image.Image) -> Image.Image:
        """The resized and cropped RGB image, as transformers' PIL backend makes it."""
        w, h = img.size
        if self.resize == "square":
            img = img.resize((self.size, self.size), self.resample)
        else:  # transformers' get_resize_output_image_size: the long side truncated, not rounded
            short, long = (w, h) if w <= h else (h, w)
            other = int(self.size * long / short)
            img = img.resize((self.size, other) if w <= h else (other, self.size), self.resample)
        if self.crop:
            left, top = (img.width - self.crop) // 2, (img.height - self.crop) // 2
            img = img.crop((left, top, left + self.crop, top + self.crop))
        return img


def _triple(cfg: dict, field: str, default, where: str) -> tuple[float, float, float]:
    v = cfg.get(field, default)
    v = [v] * 3 if isinstance(v, (int, float)) else v
    if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
        raise M4Error(f"{where}: {field} {v!r}: expected one number or three")
    a, b, c = (float(x) for x in v)
    return a, b, c


def preprocess(images: Sequence[ImageLike] | ImageLike, processing: "ImageProcessing | int") -> np.ndarray:
    """(n, 3, S, S) float32 pixels; an int `processing` is SigLIP's square resize to that size."""
    p = processing if isinstance(processing, ImageProcessing) else ImageProcessing.siglip(processing)
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        images = [images]  # a lone array would otherwise iterate over its rows
    s = p.image_size
    raw = np.empty((len(images), 3, s, s), dtype=np.uint8)
    for i, x in enumerate(images):
        raw[i] = np.asarray(p.resized(load_image(x))).transpose(2, 0, 1)
    # the reference rescales in float64 and normalises in float32; the same steps give the same bits
    out = (raw.astype(np.float64) * p.rescale).astype(np.float32)
    mean, std = (np.array(v, np.float32)[:, None, None] for v in (p.mean, p.std))
    return (out - mean) / std


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
