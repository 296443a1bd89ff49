"""Media in: images, anyres tiles, video sources and sampling, live sources read for their newest
frame, the demo scene. numpy/Pillow/PyAV only."""

from m4.media.anyres import tile
from m4.media.demo import DemoScene
from m4.media.image import ImageProcessing, load_image, preprocess
from m4.media.latest import Latest
from m4.media.video import Frame, RateSampler, Source, is_live, open_source, sample_rate, sample_uniform, write_video

__all__ = [
    "ImageProcessing",
    "load_image",
    "preprocess",
    "tile",
    "DemoScene",
    "Frame",
    "Source",
    "is_live",
    "open_source",
    "sample_uniform",
    "sample_rate",
    "RateSampler",
    "write_video",
    "Latest",
]
