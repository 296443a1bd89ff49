"""`m4 run`: gather the visual input, ask each question, stream or emit JSON events."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from itertools import islice

import numpy as np

from m4.media import open_source, sample_rate, sample_uniform


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def collect_video(spec: str, max_frames: int, fps: float, emit_json: bool) -> list[np.ndarray]:
    """`max_frames` frames: spread over a whole file or the demo scene, or taken at `fps`
    from a live camera or stream."""
    with open_source(spec) as source:
        live = source.is_live
        frames = list(islice(sample_rate(source.frames(), fps), max_frames)) if live else None
    if not live:
        frames = sample_uniform(spec, max_frames)
    for f in frames:
        if emit_json:
            emit("frame", index=f.index, t=round(f.t, 3))
    return [f.image for f in frames]


def answer_all(model, questions: Iterable[str], inputs: dict, as_json: bool, generation: dict) -> None:
    for q in questions:
        pieces = model.ask(q, stream=True, **inputs, **generation)
        if as_json:
            text = "".join(pieces)
            s = model.stats
            emit("answer", question=q, text=text, ttft_ms=round(s.get("ttft_ms", 0.0), 1),
                 decode_tok_s=round(s.get("decode_tok_s", 0.0), 1), new_tokens=s.get("new_tokens", 0))
        else:
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
