"""The `m4` command as a user runs it: answers, info, and one clear line for bad input."""

import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from typer.testing import CliRunner

from m4 import cli
from m4.model.config import PRESETS, Arch

from conftest import VARIANTS


def m4(*args, cache=None, stdin=None):
    env = {**os.environ, "M4_CACHE": str(cache)} if cache else None
    return subprocess.run([sys.executable, "-m", "m4", *map(str, args)], capture_output=True, text=True,
                          env=env, input=stdin, timeout=300)


def m4_in_process(*args, cache=None, stdin=None) -> subprocess.CompletedProcess:
    """As `m4`, but the command runs in this process: for what it answers, where the process
    around it (its start, its imports, all it writes) is not what a test checks."""
    argv = ["m4", *map(str, args)]
    env = {"M4_CACHE": str(cache)} if cache else {}
    code = 0
    with CliRunner().isolation(input=stdin, env=env) as (out, err, _), mock.patch.object(sys, "argv", argv):
        try:
            cli.main()
        except SystemExit as e:
            code = e.code
        sys.stdout.flush()
        sys.stderr.flush()
        return subprocess.CompletedProcess(argv, code, out.getvalue().decode(), err.getvalue().decode())


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_run_streams_an_answer_and_json(checkpoints, image):
    ck = checkpoints["gqa-tied-last-full"]
    r = m4_in_process("run", "--model", ck, "--images", image, image, "--prompt", "Compare <image> and <image>.",
                      "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    r = m4_in_process("run", "--model", ck, "--images", image, "--prompt", "What is it?", "--prompt", "And now?",
                      "--max-new-tokens", "6", "--json")
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["event"] for e in events] == ["answer", "answer"]
    assert events[0]["question"] == "What is it?" and events[0]["new_tokens"] == 6 and events[0]["ttft_ms"] > 0


def test_questions_from_stdin(checkpoints, image):
    r = m4_in_process("run", "--model", checkpoints["gqa-tied-last-full"], "--images", image, "--max-new-tokens", "3",
                      "--json", stdin="first?\n\nsecond?\n")
    assert [json.loads(line)["question"] for line in r.stdout.splitlines()] == ["first?", "second?"]


def test_demo_video_run(tmp_path):
    """What `make run` does, on the demo model and the generated demo scene."""
    r = m4("run", "--video", "demo", "--prompt", "What is moving?", "--max-new-tokens", "8", "--json",
           cache=tmp_path)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["event"] for e in events] == ["frame"] * 8 + ["answer"]
    assert [e["t"] for e in events[:8]] == sorted(e["t"] for e in events[:8])


def test_video_file(checkpoints, tmp_path):
    from m4.media import DemoScene, write_video

    scene = DemoScene(seed=1, width=64, height=64, fps=10, duration=3)
    write_video(tmp_path / "clip.mp4", scene.frames(), fps=10)
    r = m4_in_process("run", "--model", checkpoints["gqa-tied-last-full"], "--video", tmp_path / "clip.mp4",
                      "--window", "4", "--prompt", "Which way?", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["index"] for e in events if e["event"] == "frame"] == [0, 10, 19, 29]


@pytest.mark.parametrize("case", ["missing image", "not an image", "missing checkpoint", "unreadable video",
                                  "no camera", "placeholder mismatch"])
def test_bad_input_is_one_line(case, checkpoints, image, tmp_path):
    ck = checkpoints["gqa-tied-last-full"]
    text = tmp_path / "notes.txt"
    text.write_text("not media")
    fake_video = tmp_path / "clip.mp4"
    fake_video.write_text("not a video")
    args = {
        "missing image": ["--model", ck, "--images", tmp_path / "nope.png", "--prompt", "q"],
        "not an image": ["--model", ck, "--images", text, "--prompt", "q"],
        "missing checkpoint": ["--model", tmp_path / "no-such-checkpoint", "--images", image, "--prompt", "q"],
        "unreadable video": ["--model", ck, "--video", fake_video, "--prompt", "q"],
        "no camera": ["--model", ck, "--video", "cam9", "--prompt", "q"],
        "placeholder mismatch": ["--model", ck, "--images", image, "--prompt", "<image> vs <image>"],
    }[case]
    # each case's line is the command's; one case, the one that loads the model, runs as its own
    # process too, whose stderr holds whatever importing and loading write
    r = (m4 if case == "placeholder mismatch" else m4_in_process)("run", *args)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("m4: error: ") and "Traceback" not in r.stderr


def hf_param_count(arch: Arch) -> int:
    """transformers' own count, on the meta device (no memory), minus SigLIP's
    post-layernorm, which LLaVA never applies and m4 does not load."""
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**arch.to_hf()))
    return sum(p.numel() for p in model.parameters()) - 2 * arch.vision.hidden


@pytest.mark.parametrize("preset", ["0.5b", "7b", "14b"])
def test_info_presets_without_weights(preset):
    r = m4_in_process("info", preset, "--json")
    d = json.loads(r.stdout)
    assert d["params"]["total"] == hf_param_count(PRESETS[preset])
    assert d["tokens_per_image"] == 729 and d["decoder"]["hidden"] == PRESETS[preset].text.hidden
    table = m4_in_process("info", preset).stdout
    for word in ("vision", "projector", "decoder", "tokens per image", "729"):
        assert word in table


def test_info_checkpoint(checkpoints, oracle):
    for variant, ck in checkpoints.items():
        d = json.loads(m4_in_process("info", ck, "--json").stdout)
        hf = oracle(ck)
        # m4 loads neither the post-layernorm nor layers after the deepest one read
        skipped = sum(p.numel() for n, p in hf.named_parameters()
                      if "vision_tower" in n and ("post_layernorm" in n or f"layers.{d['vision']['layers_run']}." in n))
        assert d["params"]["total"] == sum(p.numel() for p in hf.parameters()) - skipped, variant
        clip, default = VARIANTS[variant][1] == "clip", VARIANTS[variant][5] == "default"
        assert d["tokens_per_image"] == 16 + clip - default  # 4 x 4 patches, CLIP's class token
