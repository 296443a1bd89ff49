"""Why does a checkpoint miss `motion`? On held-out motion clips (M4-Synth's demo scenes), it
answers the motion question of the clip as it is, played backwards (right: the opposite way)
and with only the asked shape drawn (do the other shapes get in the way?), and asks it about
every shape of the clip (does the answer depend on the shape asked?); then describes
each frame ("Describe each frame."), of the clip as it is and with every shape moved to the
centre of the grid cell its centre is in (one 32-px patch of the demo preset each, the way
the other tasks place their shapes). Printed: the answers' accuracy; the share of (shape,
frame) pairs its descriptions name at the right place, for both clips; how often the place
change of the asked shape between its own first and last frame names the right direction;
and how well a linear map from one frame's image tokens gives a lone shape's centre (ridge,
fitted on 1,500 frames, RMSE on 500 others, in the model's pixels): small means the vision
side holds where a shape is and the decoder does not use it; and whether the colour a question
names reaches the answer at all (docs/training.md, "One answer for every shape of a clip").

    python scripts/motion_probe.py CHECKPOINT [--n 60] [--seed 5]
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import torch
import transformers
from PIL import Image

import m4
from m4.media import preprocess
from m4.media.demo import COLOURS, KINDS
from m4.train.synth import TASKS, Obj, direction, make, place, read_description, render, scene_objects

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def snap(o: Obj, w: int) -> Obj:
    return Obj(o.kind, o.colour, (int(3 * o.x / w) + 0.5) * w / 3, (int(3 * o.y / w) + 0.5) * w / 3, o.r)


def place_readout(model, w: int, n: int = 2000, seed: int = 0) -> float:
    """RMSE, in the model's pixels, of the best linear map from a frame's image tokens to
    the centre of the one shape it shows (sized as in the demo scene, anywhere in a w-px frame)."""
    rng = np.random.default_rng(seed)
    frames, centres = [], []
    for _ in range(n):
        r = rng.integers(w // 8, w // 5 + 1) / 2
        x, y = rng.uniform(r, w - r, 2)
        shape = Obj(str(rng.choice(KINDS)), str(rng.choice(list(COLOURS))), x, y, r)
        frames.append(Image.fromarray(render([shape], w, w)))
        centres.append((x, y))
    chunks = [np.asarray(model.encode(frames[k:k + 100]), np.float64) for k in range(0, n, 100)]
    f = np.concatenate([t.reshape(len(t), -1) for t in chunks])
    f = np.hstack([f, np.ones((n, 1))])
    c = np.array(centres) * model.arch.vision.image_size / w
    fit = 3 * n // 4
    coef = np.linalg.solve(f[:fit].T @ f[:fit] + 100 * np.eye(f.shape[1]), f[:fit].T @ c[:fit])  # ridge
    return float(np.sqrt(((f[fit:] @ coef - c[fit:]) ** 2).mean()))


def colour_reach(model, image: Image.Image) -> float:
    """1 - the mean cosine, over pairs of the eight colours, of the last layer's hidden state at
    the answer's position (transformers running the checkpoint) when "Where is the C circle?"
    names each colour about `image`: 0 when the colour named does not reach the answer."""
    llava = transformers.LlavaForConditionalGeneration.from_pretrained(model.path).eval()
    pixels = torch.as_tensor(np.asarray(preprocess([image], model.arch.vision.image_size)))
    last = []
    for colour in COLOURS:
        ids = torch.tensor([list(model.prompt(f"Where is the {colour} circle?", images=[image]).ids)])
        with torch.no_grad():
            last.append(llava(input_ids=ids, pixel_values=pixels, output_hidden_states=True).hidden_states[-1][0, -1])
    h = torch.nn.functional.normalize(torch.stack(last), dim=-1)
    return 1 - float((h @ h.T)[~torch.eye(len(last), dtype=torch.bool)].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--n", type=int, default=60, help="motion clips (the held-out bench's first n)")
    ap.add_argument("--seed", type=int, default=5, help="M4-Synth seed of the bench (5: the held-out one)")
    a = ap.parse_args()
    model = m4.load(a.checkpoint)
    size = model.arch.vision.image_size
    index = list(TASKS).index("motion")
    answered = backwards = alone = own = every = same = truly_same = 0
    named = {"as is": 0, "snapped": 0}
    pairs = 0
    for i in range(index, index + 10 * a.n, 10):  # the bench's motion samples: tasks taken in turn
        item = make("motion", [a.seed, 1, i], size)
        scene, w = item.info["scene"], item.info["scene"].width
        frames = scene_objects(scene)
        clips = {"as is": [Image.fromarray(x) for x in item.images],
                 "snapped": [Image.fromarray(render([snap(o, w) for o in fr], w, w)) for fr in frames]}
        # every shape asked, the bench's own question among them
        ways = [model.ask(f"Which way does the {s.colour} {s.kind} move?", video=clips["as is"],
                          max_new_tokens=4).strip() for s in scene.shapes]
        name = item.question.split("does the ")[1].removesuffix(" move?")
        answered += ways[[f"{s.colour} {s.kind}" for s in scene.shapes].index(name)] == item.answer
        every += sum(way == s.direction for way, s in zip(ways, scene.shapes)) / len(ways)
        same += len(set(ways)) == 1
        truly_same += len({s.direction for s in scene.shapes}) == 1
        backwards += (model.ask(item.question, video=clips["as is"][::-1], max_new_tokens=4).strip()
                      == OPPOSITE[item.answer])
        only = [Image.fromarray(render([o for o in fr if o.name == name], w, w)) for fr in frames]
        alone += model.ask(item.question, video=only, max_new_tokens=4).strip() == item.answer
        for k, clip in clips.items():
            told = re.split(r"Frame \d+: ", model.ask("Describe each frame.", video=clip, max_new_tokens=400))[1:]
            told += [""] * (len(frames) - len(told))
            named[k] += sum((o.colour, o.kind, place(o.x, o.y, w, w)) in read_description(told[f])
                            for f, fr in enumerate(frames) for o in fr)
            if k == "as is":  # where its own words put the asked shape first and last
                colour = name.split()[0]
                at = [next((p for c, _, p in read_description(t) if c == colour), None) for t in (told[0], told[-1])]
                own += direction(*at) == item.answer
        pairs += sum(len(fr) for fr in frames)
    print(f"{a.checkpoint}: {a.n} motion clips (seed {a.seed})")
    print(f"  motion answers right                          {answered / a.n:.2f}")
    print(f"  the same, played backwards                    {backwards / a.n:.2f}")
    print(f"  the same, only the asked shape drawn          {alone / a.n:.2f}")
    print(f"  the same, asked about every shape             {every / a.n:.2f}")
    print(f"  clips whose shapes all get the same answer    {same / a.n:.2f}")
    print(f"  clips whose shapes all go the same way        {truly_same / a.n:.2f}")
    print(f"  (shape, frame) places named right, as is      {named['as is'] / pairs:.2f}")
    print(f"  the same, each shape at its cell's centre     {named['snapped'] / pairs:.2f}")
    print(f"  its own first/last places give the direction  {own / a.n:.2f}")
    print(f"  a lone shape's centre from one frame's tokens, RMSE in px of {size}  {place_readout(model, w):.1f}")
    print(f"  the answer's state across the colours named, 1 - cosine  {colour_reach(model, clips['as is'][0]):.1e}")


if __name__ == "__main__":
    main()
