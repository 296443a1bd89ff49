"""Training records (M4-Instruct / LLaVA and Mantis-Instruct JSON), read and checked without
torch (training, calibration data and `m4 data check` all read them).

A record, as the rest of m4 sees it, is `{"id", "image": path or [paths] | "video": path,
"conversations": [{"from": "human" | "gpt", "value"}, ...]}` with one `<image>` per image in
the human turns, or none (the images then go in front of the first question); a video takes
one or none. Paths are relative to the image root (default: the JSON's folder). m4 adds
`"patches": true`: each image is fed as its anyres base view and tiles, as `m4 run --patches`
does.

Mantis-Instruct records (TIGER-AI-Lab/Mantis data/README.md) are read too, told apart per
record, so one file may mix both: `images` for `image`, `conversation` for `conversations`,
`role`/`content` for `from`/`value`, `user`/`assistant` for `human`/`gpt`. `normalise` turns
each record read into the form above and keeps its other keys. A leading system message is
left out of the conversation (kept under `"system"`, not trained on): m4 trains under the
checkpoint's own chat template and system prompt, as Mantis's loader drops a first message
that is not the user's.

A bad record is named by its id: `record <id>: <reason>`. What can be checked up front
(shape, roles, placeholders against images, files present) is checked when the file is read:
`load_records` stops at the first bad record (BadRecord), or, given a `Skipped`, counts it
there and leaves it out. `check` reads a whole file and counts everything for
`m4 data check`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from m4.errors import M4Error
from m4.jsonio import read_json_list
from m4.prompt import IMAGE

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
M4_FORM, MANTIS_FORM = "M4-Instruct", "Mantis-Instruct"


class BadRecord(M4Error):
    """A record that cannot be trained on: `PATH: record <id>: <reason>`."""

    def __init__(self, path: Path, kind: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.kind, self.reason = path, kind, reason


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

    def kinds(self) -> str:
        return ", ".join(f"{k} {n}" for k, n in self.counts.most_common())

    def summary(self) -> str:
        return f"skipped {self.total} records ({self.kinds()}); first: " + "; ".join(self.first)


def as_list(x) -> list:
    return [] if x is None else [x] if isinstance(x, str) else list(x)


def turns(conversation) -> list[tuple[str, str]]:
    return [(conversation[i]["value"], conversation[i + 1]["value"]) for i in range(0, len(conversation), 2)]


# -- one shape ------------------------------------------------------------------------------

def form(rec) -> str | None:
    """Which layout a record is written in (None: not a record at all)."""
    if not isinstance(rec, dict):
        return None
    conv = rec.get("conversation", rec.get("conversations"))
    messages = conv if isinstance(conv, list) else []
    mantis = ("images" in rec or "conversation" in rec
              or any(isinstance(m, dict) and ("role" in m or "content" in m) for m in messages))
    return MANTIS_FORM if mantis else M4_FORM


def message(m):
    """A message as `{"from": "human" | "gpt", "value"}`; what it cannot read it leaves for
    `problem` to name."""
    if not isinstance(m, dict):
        return m
    who = m["from"] if "from" in m else m.get("role")
    text = m["value"] if "value" in m else m.get("content")
    rest = {k: v for k, v in m.items() if k not in ("from", "role", "value", "content")}
    return {**rest, "from": ROLES.get(who, who) if isinstance(who, str) else who, "value": text}


def normalise(rec):
    """A record in M4-Instruct's form: Mantis-Instruct's keys and roles renamed, a leading
    system message moved to `"system"`, other keys kept. Both spellings of one field in one
    record are left as they are, for `problem` to name."""
    if not isinstance(rec, dict):
        return rec
    out = dict(rec)
    for mantis, m4 in (("images", "image"), ("conversation", "conversations")):
        if mantis in out and m4 not in out:
            out[m4] = out.pop(mantis)
    conv = out.get("conversations")
    if isinstance(conv, list):
        conv = [message(m) for m in conv]
        if conv and isinstance(conv[0], dict) and conv[0]["from"] == "system" and "system" not in out:
            out["system"], conv = conv[0]["value"], conv[1:]
        out["conversations"] = conv
    return out


# -- checks ---------------------------------------------------------------------------------

def conversation_problem(conv: list) -> str | None:
    for i, m in enumerate(conv, 1):
        if not isinstance(m, dict) or not isinstance(m.get("value"), str):
            return f"turn {i} is not a message with a text value/content"
        who = m.get("from")
        if who is None:
            return f"turn {i} has no from/role"
        if who not in ("human", "gpt"):
            return (f"turn {i} is from {who!r}: want human/user or gpt/assistant"
                    + (" (a system message goes first)" if who == "system" else ""))
        if who != ("human", "gpt")[(i - 1) % 2]:
            return f"turn {i} is from {who}: turns alternate human, gpt, starting with human"
    if len(conv) % 2:
        return "the last question has no answer"
    return None


def problem(rec, root: Path) -> tuple[str, str] | None:
    """(kind, reason) when a record (as `normalise` gives it) cannot be trained on, else None."""
    if not isinstance(rec, dict):
        return "bad record", "not a JSON object"
    for a, b in (("image", "images"), ("conversations", "conversation")):
        if a in rec and b in rec:
            return "bad record", f"both {a!r} and {b!r}"
    conv = rec.get("conversations")
    if not conv or not isinstance(conv, list):
        return "empty conversation", "no conversation"
    bad = conversation_problem(conv)
    if bad:
        return "bad conversation", bad
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
    if video is None and marks and marks != len(paths):
        return "placeholders", f"{marks} {IMAGE} placeholders for {len(paths)} images"
    for p in paths:
        if not (root / p).is_file():
            return f"missing {'video' if video else 'image'}", f"missing {'video' if video else 'image'} {p}"
    return None


def scan(path: Path, root: Path):
    """(raw record, normalised record, None or (kind, "record <id>: reason")) for each record."""
    for i, raw in enumerate(read_json_list(path, "data")):
        rec = normalise(raw)
        bad = problem(rec, Path(root))
        if bad:
            rid = rec.get("id", f"#{i}") if isinstance(rec, dict) else f"#{i}"
            bad = (bad[0], f"record {rid}: {bad[1]}")
        yield raw, rec, bad


def load_records(path: Path, root: Path, skipped: Skipped | None = None) -> list[dict]:
    """The trainable records of a JSON file, normalised. Without `skipped`, the first bad
    record is a BadRecord; with it, bad records are counted there and left out."""
    good = []
    for _, rec, bad in scan(path, root):
        if bad and skipped is None:
            raise BadRecord(path, *bad)
        if bad and skipped is not None:
            skipped.add(*bad)
        else:
            good.append(rec)
    return good


@dataclass
class Census:
    """What `m4 data check` reports about a training JSON."""

    path: Path
    records: int = 0
    forms: Counter = field(default_factory=Counter)
    bad: Skipped = field(default_factory=Skipped)
    images: int = 0  # over the good records
    videos: int = 0
    turns: int = 0  # question-answer pairs
    system: int = 0  # good records whose leading system message is left out

    @property
    def good(self) -> int:
        return self.records - self.bad.total

    def lines(self) -> list[str]:
        forms = ", ".join(f"{k} {n}" for k, n in self.forms.most_common())
        out = [f"{self.path}: {self.records} records" + (f" ({forms})" if forms else ""),
               f"good: {self.good} ({self.images} images, {self.videos} videos, {self.turns} turns)",
               f"bad: {self.bad.total}" + (f" ({self.bad.kinds()})" if self.bad.total else "")]
        out += [f"  {reason}" for reason in self.bad.first]
        if self.bad.total > len(self.bad.first):
            out.append(f"  ... and {self.bad.total - len(self.bad.first)} more")
        if self.system:
            out.append(f"leading system messages left out (m4 trains under the model's own): {self.system}")
        return out


def check(path: Path, root: Path | None = None) -> Census:
    """Every record of a training JSON checked as `m4 train` checks it, and counted."""
    path = Path(path)
    c = Census(path)
    for raw, rec, bad in scan(path, Path(root) if root else path.parent):
        c.records += 1
        if form(raw):
            c.forms[form(raw)] += 1
        if bad:
            c.bad.add(*bad)
            continue
        c.turns += len(rec["conversations"]) // 2
        c.videos += "video" in rec
        c.images += len(as_list(rec.get("image")))
        c.system += "system" in rec
    return c


def texts(records: list[dict]) -> list[str]:
    """All the words of a data set, for the small tokenizers of fresh tiny/demo models."""
    return [t["value"].replace(IMAGE, "") for r in records for t in r["conversations"]]


def in_front(text: str) -> str:
    """The text of the in-front placement: placeholders (and the newline after each) removed."""
    text = re.sub(re.escape(IMAGE) + r"\n?", "", text)
    text = re.sub(r"[ \t]+([?.!,;:])", r"\1", re.sub(r"[ \t]{2,}", " ", text))
    return text.strip()
