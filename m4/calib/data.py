"""Calibration data: `--data SRC` -> interleaved prompts with their images, decoded.

SRC is a folder of images and videos, an M4-Instruct or Mantis-Instruct JSON (its records'
first question with their images or video), or `demo` (clips of the generated scene). Each
sample is one prompt as `Model.ask` takes it; the vision graph is calibrated on their pictures
and the decoder on their embedded prompts. Calibration only samples its data, so bad records
of a JSON are skipped, and counted by kind in one warning on stderr; files that fail to
decode are skipped; a source that yields nothing decodable is one clear error.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from m4.errors import M4Error
from m4.media import DemoScene, load_image, sample_uniform
from m4.plan import CALIB_FRAMES
from m4.records import Skipped, as_list, in_front, load_records

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v"}
FRAMES = CALIB_FRAMES  # frames taken from each video (m4.plan sizes calibration's caches by them)
# questions for sources without text, one, two or FRAMES images each: all three placements
QUESTIONS = ("Describe <image> in one sentence.", "What changed between <image> and <image>?",
             "Which way does each shape move?")


@dataclass
class Sample:
    text: str
    images: list = field(default_factory=list)  # PIL images or HxWx3 arrays
    video: bool = False  # frames go in front of the text
    patches: bool = False  # anyres tiles, as `m4 run --patches`

    def ask_kwargs(self) -> dict:
        return {"video" if self.video else "images": self.images, "patches": self.patches}


def load_samples(src: str, n: int) -> list[Sample]:
    """Up to n samples from SRC (fewer where it holds fewer)."""
    if src == "demo":
        return demo_samples(n)
    path = Path(src)
    if not path.exists():
        raise M4Error(f"calibration data not found: {src} (a folder of images/videos, an M4-Instruct or "
                      "Mantis-Instruct JSON, or demo)")
    samples = folder_samples(path, n) if path.is_dir() else json_samples(path, n)
    if not samples:
        raise M4Error(f"no decodable image or video in {src}")
    return samples


def demo_samples(n: int) -> list[Sample]:
    """Clips of seeded demo scenes, cycled through the three placements."""
    out = []
    for k in range(n):
        scene = DemoScene(seed=k)
        step = scene.num_frames // FRAMES
        frames = [scene.frame(i * step) for i in range(FRAMES)]
        kind = k % 3
        out.append(Sample(QUESTIONS[kind], frames if kind == 2 else frames[:kind + 1], video=kind == 2))
    return out


def folder_samples(path: Path, n: int) -> list[Sample]:
    """Each video a clip, images one or two at a time (in name order, subfolders too)."""
    files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
    out: list[Sample] = []
    pending: list[Image.Image] = []
    for f in files:
        if len(out) >= n:
            break
        try:
            if f.suffix.lower() in VIDEO_SUFFIXES:
                out.append(Sample(QUESTIONS[2], [x.image for x in sample_uniform(str(f), FRAMES)], video=True))
                continue
            pending.append(load_image(f))
        except M4Error:
            continue  # an undecodable file is skipped; none at all is the error above
        if len(pending) == 1 + len(out) % 2:
            out.append(Sample(QUESTIONS[len(pending) - 1], pending))
            pending = []
    if pending and len(out) < n:
        out.append(Sample(QUESTIONS[0], pending[:1]))
    return out


def json_samples(path: Path, n: int) -> list[Sample]:
    """The first question of each record, with its images or video frames as training sees them."""
    out: list[Sample] = []
    skipped = Skipped()
    records = load_records(path, path.parent, skipped)
    if skipped.total:
        print(f"m4: warning: {path}: {skipped.summary()}", file=sys.stderr)
    for rec in records:
        if len(out) >= n:
            break
        question = rec["conversations"][0]["value"]
        try:
            if "video" in rec:
                frames = [x.image for x in sample_uniform(str(path.parent / rec["video"]), FRAMES)]
                out.append(Sample(in_front(question), frames, video=True))
            else:
                images = [load_image(path.parent / p) for p in as_list(rec.get("image"))]
                out.append(Sample(question, images, patches=bool(rec.get("patches"))))
        except M4Error:
            continue
    return out
