"""Images in: paths, PIL images or arrays -> RGB PIL images -> SigLIP pixel arrays."""

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


def preprocess(images: Sequence[ImageLike] | ImageLike, size: int) -> np.ndarray:
    """SigLIP preprocessing: (n, 3, size, size) float32, bicubic square resize, (x/255-0.5)/0.5."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        images = [images]  # a lone array would otherwise iterate over its rows
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, x in enumerate(images):
        img = load_image(x).resize((size, size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
    return (out / 255.0 - 0.5) / 0.5


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
