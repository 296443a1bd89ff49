"""Video sources (files, V4L2 cameras, rtsp/http streams, the demo scene) and frame sampling.

A source spec is one string, as given to `m4 run --video`:
  camN              V4L2 camera /dev/videoN (live)
  rtsp(s)://, http(s)://   a network stream (live)
  demo              the generated DemoScene, seed 0, its first shape alone
  anything else     a local video file
"""

import itertools
import re
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
from av.video.stream import VideoStream
import numpy as np

from m4.errors import M4Error
from m4.media.demo import DemoScene

# Seconds to wait for a network stream to open, and then for each read.
URL_TIMEOUT = (5.0, 10.0)


@dataclass
class Frame:
    image: np.ndarray  # HxWx3 uint8 RGB
    t: float  # seconds from the source's start
    index: int  # position in decode order


class Source:
    """An open video source. frames() is a single pass; use as a context manager."""

    is_live: bool = False
    length: int | None = None  # frame count, where known without decoding

    def frames(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DemoSource(Source):
    def __init__(self, scene: DemoScene):
        self.scene = scene
        self.length = scene.num_frames

    def frames(self) -> Iterator[Frame]:
        # generated as fast as asked for: no sleeping, time comes from the frame rate
        for i in range(self.scene.num_frames):
            yield Frame(self.scene.frame(i), i / self.scene.fps, i)


class AvSource(Source):
    def __init__(self, container: av.container.InputContainer, label: str, is_live: bool):
        self.container, self.label, self.is_live = container, label, is_live
        self.stream = container.streams.video[0]
        self.length = self.stream.frames or None  # 0 means the container does not say
        if not is_live:
            # frame threading decodes large files faster but adds latency live; on small clips
            # (a training set's) starting decoder threads costs more than it saves: 4.6 -> 4.0
            # ms per 8-frame M4-Synth clip on 2 cores (more threads start on more cores)
            ctx = self.stream.codec_context
            if (ctx.width or 0) * (ctx.height or 0) >= 640 * 480:
                self.stream.thread_type = "AUTO"
            else:
                ctx.thread_count = 1

    def frames(self) -> Iterator[Frame]:
        rate = float(self.stream.average_rate or self.stream.guessed_rate or 0)
        start, t0 = time.monotonic(), None
        try:
            for index, f in enumerate(self.container.decode(self.stream)):
                if f.time is not None:
                    t0 = f.time if t0 is None else t0
                    t = f.time - t0
                elif self.is_live or not rate:
                    t = time.monotonic() - start  # no timestamps: arrival time is the best we have
                else:
                    t = index / rate
                yield Frame(f.to_ndarray(format="rgb24"), t, index)
        except av.FFmpegError as e:
            raise M4Error(f"cannot read {self.label}: {_reason(e)}") from None

    def close(self) -> None:
        self.container.close()


CAMERA = re.compile(r"cam(\d+)")
URL = re.compile(r"(rtsps?|https?)://")


def is_live(spec: str) -> bool:
    """Cameras and network streams run in real time; files and the demo scene do not."""
    return bool(CAMERA.fullmatch(spec) or URL.match(spec))


def open_source(spec: str) -> Source:
    if spec == "demo":
        # one shape: the demo model tells which way a lone shape moves, not which way the asked
        # one of several does (docs/demo-model.md, "Known limits")
        return DemoSource(DemoScene(shapes=1))
    if m := CAMERA.fullmatch(spec):
        device = f"/dev/video{m.group(1)}"
        label = f"camera {spec} ({device})"
        if not Path(device).exists():
            raise M4Error(f"cannot open {label}: no such device")
        return _open_av(device, label, live=True, format="v4l2")
    if URL.match(spec):
        options = {"rtsp_transport": "tcp"} if spec.startswith("rtsp") else {}
        return _open_av(spec, f"stream {spec}", live=True, options=options, timeout=URL_TIMEOUT)
    path = Path(spec)
    if not path.exists():
        raise M4Error(f"video not found: {spec}")
    if path.is_dir():
        raise M4Error(f"cannot read video {spec}: is a directory")
    return _open_av(spec, f"video {spec}", live=False)


def _open_av(url: str, label: str, live: bool, **kwargs) -> AvSource:
    verb = "open" if live else "read"
    try:
        container = av.open(url, **kwargs)
    except (av.FFmpegError, OSError) as e:
        raise M4Error(f"cannot {verb} {label}: {_reason(e)}") from None
    # ffmpeg happily opens a still image as a one-frame "video"; a PNG renamed .mp4 is a mistake
    name = container.format.name
    if name == "image2" or name.endswith("_pipe"):
        container.close()
        raise M4Error(f"cannot {verb} {label}: is a still image ({name}), not a video")
    if not container.streams.video:
        container.close()
        raise M4Error(f"cannot {verb} {label}: no video stream")
    return AvSource(container, label, live)


def sample_uniform(spec: str, n: int) -> list[Frame]:
    """n frames evenly spread over a file or the demo (LLaVA's linspace), all if it has fewer."""
    if n < 1:
        raise M4Error(f"cannot sample {n} frames from {spec}: need at least 1")
    with open_source(spec) as src:
        if src.is_live:
            raise M4Error(f"cannot sample {spec} uniformly: it is live and has no end; sample by rate instead")
        total = src.length or sum(1 for _ in src.frames())
    if total == 0:
        raise M4Error(f"cannot read video {spec}: no frames")
    wanted = set(np.linspace(0, total - 1, min(n, total)).round().astype(int).tolist())
    picked = []
    # a second pass keeps only the wanted frames, so memory is n frames, not the whole video
    with open_source(spec) as src:
        for f in src.frames():
            if f.index in wanted:
                picked.append(f)
                if len(picked) == len(wanted):
                    break
    return picked


class RateSampler:
    """Keeps about fps frames per second of source time: a frame is kept once its slot is due.
    Fed one timestamp at a time, for readers that hand frames over as they come."""

    def __init__(self, fps: float):
        if fps <= 0:
            raise M4Error(f"frame rate must be positive, got {fps}")
        self.period = 1.0 / fps
        self.due: float | None = None

    def keep(self, t: float) -> bool:
        due = t if self.due is None else self.due
        # tolerance: summed periods drift above exact timestamps (0.1 + 0.1 + 0.1 > 0.3)
        if t + 1e-6 < due:
            self.due = due
            return False
        due += self.period
        # after a gap (a stalled stream) skip the missed slots instead of bursting through them
        while due <= t + 1e-6:
            due += self.period
        self.due = due
        return True


def sample_rate(frames: Iterable[Frame], fps: float) -> Iterator[Frame]:
    """Keep about fps frames per second of source time (RateSampler over an iterable)."""
    rate = RateSampler(fps)
    return (f for f in frames if rate.keep(f.t))


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float) -> None:
    """Encode HxWx3 uint8 RGB frames (even width and height) as H.264 (mpeg4 without libx264)."""
    frames = iter(frames)
    first = next(frames)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        assert isinstance(stream, VideoStream)  # a video codec's
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        for img in itertools.chain([first], frames):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())  # flush the encoder's delayed frames


def _reason(e: BaseException) -> str:
    # av errors carry ffmpeg's text in strerror ("Invalid data found when processing input")
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    text = " ".join(text.split())
    return text[:1].lower() + text[1:]
