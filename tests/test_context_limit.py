"""Prompts and live windows longer than the model's positions: one clear error before any
prefill, never a traceback from RoPE; an answer that would pass the limit ends at it."""

import json
import shutil
import subprocess
import sys

import pytest

import m4
from m4.errors import M4Error

from conftest import random_images

POSITIONS = 512


@pytest.fixture(scope="module")
def short(checkpoints, tmp_path_factory):
    """A tiny checkpoint whose context holds POSITIONS positions (its config says so)."""
    path = tmp_path_factory.mktemp("short")
    for f in checkpoints["gqa-tied-last-full"].iterdir():
        shutil.copy(f, path / f.name)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = POSITIONS
    (path / "config.json").write_text(json.dumps(config))
    return m4.load(path)


def test_a_prompt_over_the_limit_is_one_error(short):
    text = "red " * POSITIONS
    n = len(short.prompt(text).ids)
    with pytest.raises(M4Error, match=f"the prompt is {n} tokens and this model's context holds {POSITIONS} ") as e:
        short.ask(text)
    assert "\n" not in str(e.value)


def test_an_answer_ends_at_the_limit(short):
    """max_new_tokens is a bound: past the positions the prompt leaves, the answer is cut."""
    empty, full = (len(short.prompt("red " * k).ids) for k in (0, 100))
    text = "red " * int((POSITIONS - 8 - empty) * 100 / (full - empty))  # a few positions short of the limit
    n = len(short.prompt(text).ids)
    assert POSITIONS - 20 < n < POSITIONS
    ids = list(short.tokens(text, max_new_tokens=128))
    assert len(ids) <= POSITIONS - n and short.stats["prefill_tokens"] == n


def test_a_live_window_over_the_limit_is_one_error_at_creation(short):
    with pytest.raises(M4Error, match=f"a live window of 8 frames needs .* context holds {POSITIONS}: use a smaller"):
        short.stream(window=8)
    live = short.stream(window=2)  # one that fits runs
    for frame in random_images(3):
        live.add_frame(frame)
    assert isinstance(live.ask("What is it?", max_new_tokens=2), str)


def test_cli_says_it_in_one_line(tmp_path):
    """The demo model (4,096 positions) asked about an image with a 12,000-word prompt."""
    from PIL import Image

    Image.fromarray(random_images(1)[0]).save(tmp_path / "x.png")
    r = subprocess.run([sys.executable, "-m", "m4", "run", "--images", tmp_path / "x.png", "--prompt", "word " * 12000],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("m4: error: the prompt is ") and r.stderr.count("\n") == 1, r.stderr
    assert "context holds 4096 positions" in r.stderr
