"""The demo model's shipped bundle (m4/assets/demo-bundle): it verifies, it is what an export
of the shipped checkpoint answers, and an install without torch runs `demo` on it."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

import m4
from m4.bundle_format import manifest_arch, verify
from m4.errors import M4Error
from m4.model.config import Arch
from m4.resolve import DEMO_BUNDLE, DEMO_DIR, resolve

from test_cli import m4_in_process

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Which way does the cyan circle move?"  # `make run`'s question about the demo scene


@pytest.fixture(scope="module")
def held_out_bench(held_out_synth):
    """One sample of each of M4-Synth's ten tasks, of a seed the demo never trained on."""
    records = json.loads((held_out_synth / "bench.json").read_text())
    first = {}
    for rec in records:
        first.setdefault(rec["metadata"]["dataset"], rec)
    return held_out_synth, list(first.values())


def answers(model, bench) -> list[list[int]]:
    """Greedy token ids for each bench sample, then for the demo scene's question."""
    root, records = bench
    out = []
    for rec in records:
        images = [root / f for f in rec["image"]]
        out.append(list(model.tokens(rec["conversations"][0]["value"], images=images,
                                     patches=bool(rec["metadata"].get("patches")), max_new_tokens=16)))
    out.append(list(model.tokens(QUESTION, video="demo", max_new_tokens=8)))
    return out


def test_shipped_bundle_verifies():
    """Every file matches the sha256 m4.json records; the bundle is the checkpoint's model."""
    m = verify(DEMO_BUNDLE)
    assert m["source"] == "demo" and m["dtype"] == "fp16" and m["quantisation"] is None
    assert manifest_arch(m) == Arch.from_dir(DEMO_DIR)
    assert {"vision.onnx", "decoder.onnx", "decoder_ort.onnx", "embed_tokens.npy", "tokenizer.json"} <= m["files"].keys()
    assert sorted(f.name for f in DEMO_BUNDLE.iterdir()) == sorted([*m["files"], "m4.json"])  # nothing unlisted


def test_shipped_bundle_answers_as_a_fresh_export_and_the_checkpoint(held_out_bench, tmp_path):
    """The shipped bundle has not drifted from the shipped checkpoint: it answers as a bundle
    exported from it now (as scripts/ship_demo.py exports it), and both as the checkpoint on
    torch, token for token."""
    from m4.export.bundle import export_bundle

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from ship_demo import BUNDLE_DTYPE
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    export_bundle("demo", tmp_path / "fresh", BUNDLE_DTYPE)
    shipped = answers(m4.load(str(DEMO_BUNDLE)), held_out_bench)
    assert shipped == answers(m4.load(str(tmp_path / "fresh")), held_out_bench)
    assert shipped == answers(m4.load("demo", backend="torch"), held_out_bench)
    assert all(shipped)


def test_demo_names_the_checkpoint_or_the_bundle():
    """With torch installed, `demo` is the checkpoint (backend auto or torch) and the shipped
    bundle for onnx; trt says how to build engines for it (never inside the package)."""
    assert resolve("demo") == DEMO_DIR and resolve("demo", bundle=True) == DEMO_BUNDLE
    assert m4.load("demo").path == DEMO_DIR
    assert m4.load("demo", backend="torch").path == DEMO_DIR
    model = m4.load("demo", backend="onnx")
    assert model.path == DEMO_BUNDLE and model.backend.name == "onnx"
    with pytest.raises(M4Error, match=r"ships without TensorRT engines.*cp -r .*m4 build DIR"):
        m4.load("demo", backend="trt")


# A Python without torch and transformers: importing either fails as if neither were
# installed, and every attempt to import one is written to $BLOCKED_LOG (asking whether one is
# installed, importlib.util.find_spec, is not an attempt).
BLOCKER = '''
import os, sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in ("torch", "transformers"):
            return None
        frame = sys._getframe(1)
        while frame and frame.f_code.co_name != "_find_and_load":
            frame = frame.f_back
        if frame:  # an import statement or importlib.import_module
            with open(os.environ["BLOCKED_LOG"], "a") as f:
                f.write(name + "\\n")
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Blocker())
'''


def without_torch(tmp_path: Path, args: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    log = tmp_path / "blocked.log"
    log.write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "BLOCKED_LOG": str(log), "M4_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    return r, log.read_text().split()


def test_run_demo_without_torch(tmp_path):
    """`m4 run --video demo` where torch and transformers cannot be imported: it runs the
    shipped bundle, tries to import neither, and answers as the checkpoint does on torch."""
    args = ["-m", "m4", "run", "--video", "demo", "--prompt", QUESTION, "--max-new-tokens", "8", "--json"]
    r, blocked = without_torch(tmp_path, args)
    assert r.returncode == 0, r.stderr
    assert blocked == []
    answer = [json.loads(line) for line in r.stdout.splitlines()][-1]
    assert answer["event"] == "answer" and answer["text"] == "down"

    with_torch = m4_in_process(*args[2:], cache=tmp_path / "cache")
    assert with_torch.returncode == 0, with_torch.stderr
    assert json.loads(with_torch.stdout.splitlines()[-1])["text"] == answer["text"]

    from m4.media import sample_uniform

    image = tmp_path / "scene.png"
    Image.fromarray(sample_uniform("demo", 1)[0].image).save(image)
    check = ("import sys, m4; from m4.resolve import DEMO_BUNDLE; model = m4.load('demo'); "
             "assert model.path == DEMO_BUNDLE and model.backend.name == 'onnx', model.path; "
             f"print(model.ask('Describe <image>', images=[{str(image)!r}], max_new_tokens=24)); "
             "assert not {'torch', 'transformers'} & sys.modules.keys()")
    r, blocked = without_torch(tmp_path, ["-c", check])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and blocked == []
