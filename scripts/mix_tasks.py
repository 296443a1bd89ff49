"""A question-stage mix from M4-Synth train.json files: each task's questions weighted, plus
a share of caption records; image paths rewritten relative to OUT's folder, so one mix can draw
on several synth runs (seeds).

usage: python scripts/mix_tasks.py OUT.json SRC/train.json [SRC2/train.json ...]
           [--captions 0.2] [--seed 0] [--weight TASK=W ...] [--per-view W] [--per-frame W]

A weight of 1.3 keeps every question of the task and repeats 30% of them (drawn at random);
0.6 keeps 60%. The tasks the ten-task mix learns last (docs/demo-model.md) are weighted up.
--per-view W adds W questions per multi-view sample about one of its views ("How many red
objects does view 2 show?"), answered from the sample's caption: the step view-count builds
on (the count in a scene is the most that one view shows, for 96% of them), as a curriculum.
--per-frame W does the same for motion clips ("Where is the cyan circle in frame 1?"): the
place change from the first frame to the last names the direction for 90% of them.
"""

import argparse
import os
import random
import re

from m4.jsonio import read_json_list, write_json_list
from m4.train.synth import TASKS, VIEW_COLOURS, conversation, read_description

VIEW_TASKS = tuple(t for t, (scenario, *_) in TASKS.items() if scenario == "multi-view")


def task_of(record: dict) -> str:
    return record["id"].rsplit("-", 1)[0]


def records_for(src: str, out: str, what: str) -> list[dict]:
    """The records of `src`, their media paths rewritten relative to `out`'s folder."""
    rel = os.path.relpath(os.path.dirname(os.path.abspath(src)), os.path.dirname(os.path.abspath(out)))
    return [rebase(r, rel) for r in read_json_list(src, what)]


def rebase(record: dict, rel: str) -> dict:
    for key in ("image", "video"):
        if isinstance(record.get(key), list):
            record[key] = [os.path.join(rel, p) for p in record[key]]
        elif key in record:
            record[key] = os.path.join(rel, record[key])
    return record


def parts(caption: dict, label: str) -> tuple[str, list[str]]:
    """A caption record's text before "Describe", and its answer split at "View N: " or "Frame N: "."""
    return (caption["conversations"][0]["value"].split("Describe")[0],
            re.split(rf"{label} \d+: ", caption["conversations"][1]["value"])[1:])


def question(caption: dict, kind: str, text: str, answer: str) -> dict:
    media = {k: caption[k] for k in ("image", "video") if k in caption}
    return {"id": caption["id"].replace("-caption", f"-{kind}"), **media, "conversations": conversation(text, answer)}


def view_questions(caption: dict, n: int, rng: random.Random) -> list[dict]:
    """n questions about single views of a multi-view caption record ("View 1: a red circle
    at left and .... View 2: ..."), asking for a colour present in the scene or any other."""
    head, views = parts(caption, "View")
    counts = [{c: len(re.findall(rf"\b{c} ", v)) for c in VIEW_COLOURS} for v in views]
    colours = sorted({c for seen in counts for c, k in seen.items() if k}) + VIEW_COLOURS
    out = []
    for _ in range(n):
        j, colour = rng.randrange(len(views)), rng.choice(colours)
        out.append(question(caption, "view", f"{head}The images show one scene from several viewpoints. "
                            f"How many {colour} objects does view {j + 1} show?", str(counts[j][colour])))
    return out


def frame_questions(caption: dict, n: int, rng: random.Random) -> list[dict]:
    """n questions about single frames of a clip's caption record ("Frame 1: an orange circle
    at top right and a green triangle at left. Frame 2: ..."): where one of its shapes is, in
    the first or last frame half the time (a motion's answer is the move between those two)."""
    head, frames = parts(caption, "Frame")
    out = []
    for _ in range(n):
        j = rng.choice([0, len(frames) - 1]) if rng.random() < 0.5 else rng.randrange(len(frames))
        colour, kind, where = rng.choice(read_description(frames[j]))
        out.append(question(caption, "frame", f"{head}Where is the {colour} {kind} in frame {j + 1}?", where))
    return out


def mix(out: str, sources: list[str], captions: float, seed: int, weights: dict[str, float],
        per_view: float = 0.0, per_frame: float = 0.0) -> list[dict]:
    rng = random.Random(seed)
    questions, caption_records = [], []
    for src in sources:
        for r in records_for(src, out, "M4-Synth train.json"):
            (caption_records if r["id"].endswith("-caption") else questions).append(r)
    records = []
    for r in questions:
        w = weights.get(task_of(r), 1.0)
        records += [r] * int(w) + ([r] if rng.random() < w - int(w) else [])
    n = min(int(len(records) * captions / (1 - captions)), len(caption_records))
    records += rng.sample(caption_records, n)
    # each with its own generator: the mix above stays what it was without --per-view / --per-frame
    for w, tasks, ask in ((per_view, VIEW_TASKS, view_questions), (per_frame, ("motion",), frame_questions)):
        if w:
            srng = random.Random(seed)
            for c in caption_records:
                if c["id"].rsplit("-", 2)[0] in tasks:  # view-count-000123-caption
                    records += ask(c, int(w) + (srng.random() < w % 1), srng)
    rng.shuffle(records)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--captions", type=float, default=0.2, help="share of caption records in the mix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight", action="append", default=[], metavar="TASK=W")
    ap.add_argument("--per-view", type=float, default=0.0, metavar="W",
                    help="questions about single views per multi-view sample")
    ap.add_argument("--per-frame", type=float, default=0.0, metavar="W",
                    help="questions about single frames per motion clip")
    a = ap.parse_args()
    weights = {k: float(v) for k, v in (w.split("=") for w in a.weight)}
    unknown = set(weights) - set(TASKS)
    if unknown:
        ap.error(f"unknown task(s): {', '.join(sorted(unknown))}; M4-Synth has {', '.join(TASKS)}")
    records = mix(a.out, a.sources, a.captions, a.seed, weights, a.per_view, a.per_frame)
    write_json_list(a.out, records)
    print(f"{a.out}: {len(records)} records")


if __name__ == "__main__":
    main()
