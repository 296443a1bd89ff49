"""Multi-patch ("anyres") tiling of one large image, as in LLaVA-NeXT's process_anyres_image.

m4 feeds the base view and the tiles to the model as separate interleaved images.
"""

import math

from PIL import Image

from m4.media.image import ImageLike, load_image

# Grid pinpoints in tiles, as (cols, rows). LLaVA-NeXT's llava/mm_utils.py reads its
# pinpoints [[384,768],[768,384],[768,768],[1152,384],[384,1152]] as (width, height)
# (transformers' port reads the same list as (height, width)); we follow the original,
# including its order, which decides ties between candidates.
GRID = [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]


def tile(image: ImageLike, size: int) -> list[Image.Image]:
    """[base view resized to size x size] + size x size tiles of the best grid, row-major."""
    img = load_image(image)
    width, height = best_resolution(img.size, [(c * size, r * size) for c, r in GRID])
    padded = resize_and_pad(img, width, height)
    tiles = [
        padded.crop((x, y, x + size, y + size))
        for y in range(0, height, size)
        for x in range(0, width, size)
    ]
    return [img.resize((size, size), Image.Resampling.BICUBIC)] + tiles


def best_resolution(image_size: tuple[int, int], candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """LLaVA-NeXT's select_best_resolution: most image pixels kept, then least padding."""
    w, h = image_size
    best, best_key = candidates[0], None
    for cw, ch in candidates:
        scale = min(cw / w, ch / h)
        # pixels of the image that survive (upscaling adds none), and the padding left over
        effective = min(int(w * scale) * int(h * scale), w * h)
        key = (effective, -(cw * ch - effective))
        if best_key is None or key > best_key:  # strict: the earlier candidate wins ties
            best, best_key = (cw, ch), key
    return best


def resize_and_pad(img: Image.Image, width: int, height: int) -> Image.Image:
    """Fit inside width x height keeping aspect (LLaVA-NeXT's rounding), centred on black."""
    sw, sh = width / img.width, height / img.height
    if sw < sh:
        new_w, new_h = width, min(math.ceil(img.height * sw), height)
    else:
        new_w, new_h = min(math.ceil(img.width * sh), width), height
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(img.resize((new_w, new_h), Image.Resampling.BICUBIC), ((width - new_w) // 2, (height - new_h) // 2))
    return canvas
