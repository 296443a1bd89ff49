"""Training records: Mantis-Instruct read beside M4-Instruct (both of its published layouts,
per record), bad records named by id; `m4 data check`; `m4 train` stopping at a bad record or
skipping with --skip-bad; calibration data from a Mantis-Instruct file."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from m4.records import BadRecord, Skipped, check, form, load_records, normalise, problem

from test_cli import m4_in_process

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def m4cli(*args):
    return subprocess.run([sys.executable, "-m", "m4", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def readme_layout(rid, images, turns, **extra):
    """TIGER-AI-Lab/Mantis data/README.md: `images`, `conversations` of from/value."""
    conv = [{"from": who, "value": text} for q, a in turns for who, text in (("human", q), ("gpt", a))]
    return {"id": rid, "images": images, "conversations": conv, **extra}


def example_layout(rid, images, turns, system=None):
    """Mantis's data/examples/chat/train.json: `conversation` of role/content, a `source` key."""
    conv = [{"role": who, "content": text} for q, a in turns for who, text in (("user", q), ("assistant", a))]
    if system:
        conv = [{"role": "system", "content": system}] + conv
    return {"id": rid, "images": images, "conversation": conv, "source": "synthetic"}


def mantis_records(n=24):
    """Several turns each; placeholders all at the start of the first message, interleaved, at
    its end, or none (images in front); both layouts, a system message, and an M4 record."""
    names = list(COLOURS)
    out = []
    for i in range(n):
        a, b = names[i % 4], names[(i + 1 + i // 4) % 4]
        images = [f"imgs/{a}.png", f"imgs/{b}.png"]
        if i % 4 == 0:
            out.append(readme_layout(f"m{i}", images, [
                ("<image><image>What colour is image 1?", f"{a}."), ("And image 2?", f"{b}.")]))
        elif i % 4 == 1:
            out.append(example_layout(f"m{i}", images, [
                (f"Compare <image> with <image>. Which one is {a}?", "The first."),
                ("Which one is the second?", f"The {b} one.")], system="Answer briefly." if i == 1 else None))
        elif i % 4 == 2:
            out.append(example_layout(f"m{i}", images, [
                ("Name the colours of both images.<image><image>", f"{a} and {b}."), ("Which is first?", f"{a}.")]))
        else:
            out.append(readme_layout(f"m{i}", images, [("What colours are these?", f"{a} and {b}.")]))
    out.append({"id": "llava", "image": ["imgs/red.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red."}]})
    return out


@pytest.fixture
def mantis(tmp_path):
    root = tmp_path / "mantis"
    (root / "imgs").mkdir(parents=True)
    for name, rgb in COLOURS.items():
        Image.fromarray(np.full((40, 48, 3), rgb, dtype=np.uint8)).save(root / "imgs" / f"{name}.png")
    (root / "train.json").write_text(json.dumps(mantis_records(), indent=1))
    return root / "train.json"


def bad_records():
    return [
        readme_layout("bad-marks", ["imgs/red.png", "imgs/blue.png"], [("<image>\nOne mark, two images.", "No.")]),
        example_layout("bad-missing", ["imgs/purple.png"], [("<image>What colour?", "purple.")]),
        {"id": "bad-role", "images": ["imgs/red.png"], "conversation": [
            {"role": "user", "content": "<image>What colour?"}, {"role": "bot", "content": "red."}]},
    ]


def test_both_mantis_layouts_normalise_to_m4_records(tmp_path):
    readme, example = readme_layout("a", ["x.png"], [("<image>Q?", "A.")]), example_layout(
        "b", ["x.png"], [("<image>Q?", "A."), ("Q2?", "A2.")], system="Be brief.")
    want = [{"from": "human", "value": "<image>Q?"}, {"from": "gpt", "value": "A."}]
    assert normalise(readme) == {"id": "a", "image": ["x.png"], "conversations": want}
    assert normalise(example) == {"id": "b", "image": ["x.png"], "source": "synthetic", "system": "Be brief.",
                                  "conversations": want + [{"from": "human", "value": "Q2?"},
                                                           {"from": "gpt", "value": "A2."}]}
    m4rec = {"id": "c", "image": "x.png", "conversations": want}
    assert normalise(m4rec) == m4rec
    assert [form(r) for r in (readme, example, m4rec, "x")] == ["Mantis-Instruct", "Mantis-Instruct",
                                                                 "M4-Instruct", None]
    (tmp_path / "x.png").write_bytes(b"")
    assert problem(normalise(example), tmp_path) is None
    both = {**readme, "image": ["x.png"]}
    assert problem(normalise(both), tmp_path) == ("bad record", "both 'image' and 'images'")
    none = readme_layout("d", ["x.png", "x.png"], [("No placeholders: images in front.", "A.")])
    assert problem(normalise(none), tmp_path) is None
    late = {**example, "conversation": example["conversation"][1:3] + example["conversation"][:1]}
    assert problem(normalise(late), tmp_path)[1].startswith("turn 3 is from 'system'")


def test_records_without_placeholders_train_on_the_inference_prompt(tiny_checkpoint, tmp_path):
    """No placeholders: all images in front of the first question, as `Model.prompt` puts them;
    a Mantis record gives the sample of the same M4 record."""
    import m4
    from m4.train.data import Collate, InstructData

    tiny = m4.load(tiny_checkpoint)
    a = tiny.arch
    names = ["a.png", "b.png"]
    for k, n in enumerate(names):
        Image.fromarray(np.full((40, 48, 3), 60 * k, dtype=np.uint8)).save(tmp_path / n)
    mantis = example_layout("m", names, [("Which is darker?", "The first."), ("Sure?", "Yes.")])
    m4rec = {"id": "m", "image": names, "conversations": [
        {"from": w, "value": v} for w, v in (("human", "Which is darker?"), ("gpt", "The first."),
                                             ("human", "Sure?"), ("gpt", "Yes."))]}
    rows = []
    for rec in (normalise(mantis), m4rec):
        for prob in (0.0, 1.0):
            ds = InstructData([rec], tmp_path, tiny.tokenizer, tiny.template, a.image_token_id, tiny.processing,
                              in_front_prob=prob, tokens_per_image=a.tokens_per_image)
            rows.append(Collate(a.image_token_id, a.tokens_per_image, 0)([ds[(0, 0)]]))
    prompt = tiny.prompt("Which is darker?", images=[tmp_path / n for n in names]).ids
    for row in rows:
        assert row["input_ids"][0].tolist()[:len(prompt)] == prompt
        assert row["pixel_values"].shape[0] == 2
        assert row["input_ids"].tolist() == rows[0]["input_ids"].tolist()
        assert row["labels"].tolist() == rows[0]["labels"].tolist()


def test_mantis_file_checks_trains_and_calibrates(mantis, tmp_path):
    from m4.calib.data import load_samples

    r = m4cli("data", "check", mantis)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{mantis}: 25 records (Mantis-Instruct 24, M4-Instruct 1)" in r.stdout
    assert "good: 25 (49 images, 0 videos, 43 turns)" in r.stdout and "bad: 0" in r.stdout
    assert "leading system messages left out (m4 trains under the model's own): 1" in r.stdout
    r = m4cli("data", "check", mantis, "--image-root", tmp_path)  # paths are relative to the image root
    assert r.returncode == 1 and "bad: 25 (missing image 25)" in r.stdout

    out = tmp_path / "out"
    r = m4_in_process("train", "--preset", "tiny", "--data", mantis, "--out", out, "--steps", "24", "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    assert "25 records" in r.stderr and "skipped" not in r.stderr
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 24 and np.mean(losses[-3:]) <= 0.6 * np.mean(losses[:3]), losses

    samples = load_samples(str(mantis), 6)
    assert [len(s.images) for s in samples] == [2] * 6
    assert samples[0].text == "<image><image>What colour is image 1?"
    assert samples[1].text == "Compare <image> with <image>. Which one is green?"
    assert samples[3].text == "What colours are these?"  # images in front, as m4 run puts them
    assert all(np.asarray(s.images[0]).shape == (40, 48, 3) for s in samples)


def test_bad_records_are_named_by_id_and_stop_training_unless_skipped(mantis, tmp_path, capsys):
    from m4.calib.data import load_samples

    data = mantis.parent / "mixed.json"
    data.write_text(json.dumps(mantis_records(8) + bad_records()))
    r = m4cli("data", "check", data)
    assert r.returncode == 1
    assert "good: 9" in r.stdout and "bad: 3 (" in r.stdout
    for reason in ("record bad-marks: 1 <image> placeholders for 2 images",
                   "record bad-missing: missing image imgs/purple.png",
                   "record bad-role: turn 2 is from 'bot': want human/user or gpt/assistant"):
        assert reason in r.stdout
    with pytest.raises(BadRecord, match="record bad-marks"):
        load_records(data, data.parent)
    skipped = Skipped()
    assert len(load_records(data, data.parent, skipped)) == 9
    assert dict(skipped.counts) == {"placeholders": 1, "missing image": 1, "bad conversation": 1}

    # its own process: the one line is all a failed run writes, imports and all
    r = m4cli("train", "--preset", "tiny", "--data", data, "--out", tmp_path / "strict", "--steps", "2")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"m4: error: {data}: record bad-marks: 1 <image> placeholders for 2 images")
    assert "--skip-bad" in lines[0]
    assert not (tmp_path / "strict" / "log.jsonl").exists()

    r = m4_in_process("train", "--preset", "tiny", "--data", data, "--out", tmp_path / "skip", "--steps", "2",
                      "--skip-bad")
    assert r.returncode == 0, r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith(f"{data}: skipped 3 records (") and "record bad-role" in first
    assert "9 records" in r.stderr
    assert len((tmp_path / "skip" / "log.jsonl").read_text().splitlines()) == 2

    capsys.readouterr()
    samples = load_samples(str(data), 20)  # calibration samples: skipped, with a warning
    assert len(samples) == 9
    err = capsys.readouterr().err
    assert err.startswith(f"m4: warning: {data}: skipped 3 records (") and "record bad-missing" in err

    census = check(data)
    assert (census.records, census.good, census.bad.total) == (12, 9, 3)
