"""M4-Instruct / LLaVA JSON records, read and checked without torch (training, calibration
data and evaluation all read them).

A record is `{"id", "image": path or [paths] | "video": path, "conversations": [{"from":
"human" | "gpt", "value"}, ...]}` with one `<image>` per image in the human turns (one, or
none, for a video), paths relative to the image root. m4 adds `"patches": true`: each image
is fed as its anyres base view and tiles, as `m4 run --patches` does.

Bad records never stop a run: what can be checked up front (shape, placeholders, files) is
checked when the file is read and counted in `Skipped` with the first reasons.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from m4.jsonio import read_json_list
from m4.prompt import IMAGE


class Skipped:
    """Bad records: a count per kind of problem and the first few reasons."""

    def __init__(self, keep: int = 5):
        self.counts: Counter[str] = Counter()
        self.first: list[str] = []
        self.keep = keep

    def add(self, kind: str, reason: str) -> None:
        self.counts[kind] += 1
        if len(self.first) < self.keep:
            self.first.append(reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.counts.most_common())
        return f"skipped {self.total} records ({kinds}); first: " + "; ".join(self.first)


def as_list(x) -> list:
    return [] if x is None else [x] if isinstance(x, str) else list(x)


def turns(conversation) -> list[tuple[str, str]]:
    return [(conversation[i]["value"], conversation[i + 1]["value"]) for i in range(0, len(conversation), 2)]


def problem(rec, root: Path) -> tuple[str, str] | None:
    """(kind, reason) when a record cannot be trained on, else None."""
    if not isinstance(rec, dict):
        return "bad record", "not a JSON object"
    conv = rec.get("conversations")
    if not conv or not isinstance(conv, list):
        return "empty conversation", "no conversation"
    roles = [t.get("from") if isinstance(t, dict) and isinstance(t.get("value"), str) else None for t in conv]
    if len(conv) % 2 or roles != ["human", "gpt"] * (len(conv) // 2):
        return "bad conversation", f"turns are {roles}, not human/gpt pairs"
    if any(not a.strip() for _, a in turns(conv)):
        return "empty conversation", "an empty answer"
    if any(IMAGE in a for _, a in turns(conv)):
        return "placeholders", f"{IMAGE} in an answer"
    images, video = rec.get("image"), rec.get("video")
    if images is not None and video is not None:
        return "bad record", "both image and video"
    paths = as_list(images if video is None else video)
    if not all(isinstance(p, str) for p in paths):
        return "bad record", "image paths are not strings"
    marks = sum(q.count(IMAGE) for q, _ in turns(conv))
    if video is not None and marks > 1:
        return "placeholders", f"{marks} {IMAGE} placeholders for one video (want 0 or 1)"
    if video is None and marks != len(paths):
        return "placeholders", f"{marks} {IMAGE} placeholders for {len(paths)} images"
    for p in paths:
        if not (root / p).is_file():
            return f"missing {'video' if video else 'image'}", f"missing {'video' if video else 'image'} {p}"
    return None


def load_records(path: Path, root: Path, skipped: Skipped) -> list[dict]:
    """The trainable records of a JSON file; the others are counted in `skipped`."""
    data = read_json_list(path, "data")
    good = []
    for i, rec in enumerate(data):
        bad = problem(rec, root)
        if bad:
            rid = rec.get("id", f"#{i}") if isinstance(rec, dict) else f"#{i}"
            skipped.add(bad[0], f"record {rid}: {bad[1]}")
        else:
            good.append(rec)
    return good


def texts(records: list[dict]) -> list[str]:
    """All the words of a data set, for the small tokenizers of fresh tiny/demo models."""
    return [t["value"].replace(IMAGE, "") for r in records for t in r["conversations"]]


def in_front(text: str) -> str:
    """The text of the in-front placement: placeholders (and the newline after each) removed."""
    text = re.sub(re.escape(IMAGE) + r"\n?", "", text)
    text = re.sub(r"[ \t]+([?.!,;:])", r"\1", re.sub(r"[ \t]{2,}", " ", text))
    return text.strip()
