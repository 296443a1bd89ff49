"""m4.plan: what each step needs, shown by `m4 info`, and the one-line refusal of a step that
cannot fit, before any weight is read."""

import json
import os
import subprocess
import sys

import pytest

import m4
from m4.errors import M4Error
from m4.machine import available_memory
from m4.model.checkpoint import random_checkpoint
from m4.model.config import PRESETS
from m4.plan import GB, PRECISIONS, check_fits, kv_cache, needs, plan
from m4.resolve import DEMO_BUNDLE


def m4_cli(*args, limit=None):
    env = {**os.environ, **({"M4_MEMORY_LIMIT": limit} if limit else {})}
    return subprocess.run([sys.executable, "-m", "m4", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint whose weights cannot be read: a step that reads them fails otherwise."""
    ck = tmp_path_factory.mktemp("ck") / "tiny"
    random_checkpoint("tiny", ck)
    weights = ck / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return ck


def one_error_line(r, *words):
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("m4: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_info_prints_the_plan_of_a_preset():
    r = m4_cli("info", "14b", "--window", "4")
    assert r.returncode == 0, r.stderr
    assert "plan: peak memory with a window of 4 frames" in r.stdout
    assert all(w in r.stdout for w in ("export", "calibrate", "run", *PRECISIONS))
    r = m4_cli("info", "14b", "--window", "4", "--json")
    p = json.loads(r.stdout)["plan"]
    arch = PRESETS["14b"]
    assert p["steps"] == json.loads(json.dumps(plan(arch, 4)["steps"]))
    runs = {s["precision"]: s for s in p["steps"] if s["step"] == "run"}
    assert list(runs) == list(PRECISIONS)
    # each precision needs less than the one above it; the cache grows with the window
    assert [runs[x]["memory"] for x in PRECISIONS] == sorted((runs[x]["memory"] for x in PRECISIONS), reverse=True)
    assert runs["fp16"]["kv_cache"] == 2 * arch.text.layers * arch.text.kv_heads * arch.text.head_dim * 2 * p["kv_tokens"]
    assert needs(arch, "run", "fp16", 16) - needs(arch, "run", "fp16", 4) == kv_cache(arch, "fp16", 12) - kv_cache(arch, "fp16", 0)


def test_the_refusal_names_the_need_and_a_precision_that_fits(monkeypatch):
    arch = PRESETS["14b"]
    monkeypatch.setenv("M4_MEMORY_LIMIT", "22G")
    assert available_memory() == 22 * 2**30
    with pytest.raises(M4Error) as e:
        check_fits(arch, "run", "fp32", name="14b")
    need, fits = needs(arch, "run", "fp32") / GB, needs(arch, "run", "int4") / GB
    assert str(e.value).startswith(f"running 14b at fp32 needs {need:.1f} GB and M4_MEMORY_LIMIT allows 23.6 GB "
                                   f"available; use a lower precision (m4 export --dtype int4: running it needs {fits:.1f} GB)")
    check_fits(arch, "run", "int4", name="14b")
    monkeypatch.setenv("M4_MEMORY_LIMIT", "1G")
    with pytest.raises(M4Error, match="no precision fits"):
        check_fits(arch, "export", "fp32")
    monkeypatch.setenv("M4_MEMORY_LIMIT", "lots")
    with pytest.raises(M4Error, match="M4_MEMORY_LIMIT='lots'"):
        available_memory()


def test_the_caches_count_in_the_fit(monkeypatch):
    """Memory kept beside the model (m4.load's cache_mb, the server's caches) is counted: a
    model that fits alone but not with its caches stops in one line naming them."""
    from m4.bundle_format import manifest_arch, read_manifest
    from m4.plan import bundle_precision
    from m4.serve.app import make_server
    from m4.serve.settings import Settings

    m = read_manifest(DEMO_BUNDLE)
    monkeypatch.setenv("M4_MEMORY_LIMIT", str(needs(manifest_arch(m), "run", bundle_precision(m)) + 50 * 2**20))
    m4.load(DEMO_BUNDLE, backend="onnx")
    for load in (lambda: m4.load(DEMO_BUNDLE, backend="onnx", cache_mb=100),
                 lambda: make_server(Settings(model=str(DEMO_BUNDLE), backend="onnx", image_cache_mb=40,
                                              prefix_cache_mb=60))):
        with pytest.raises(M4Error, match=r"^running .* with 0\.1 GB of caches needs .*\(or smaller caches\)$"):
            load()
    make_server(Settings(model=str(DEMO_BUNDLE), backend="onnx", no_cache=True))


def test_load_refuses_before_reading_weights(tiny, monkeypatch):
    monkeypatch.setenv("M4_MEMORY_LIMIT", "100M")
    with pytest.raises(M4Error, match=r"^running .* on torch at fp32 needs 1\.5 GB and M4_MEMORY_LIMIT allows 0\.1 GB"):
        m4.load(tiny)
    with pytest.raises(M4Error, match=r"^running .* at fp16 needs"):
        m4.load(DEMO_BUNDLE, backend="onnx")
    monkeypatch.delenv("M4_MEMORY_LIMIT")
    with pytest.raises(M4Error, match="cannot read weights"):  # the weights really are unreadable
        m4.load(tiny)


@pytest.mark.parametrize("command, words", [
    (("run", "--model", "{tiny}", "--prompt", "Hi"), ("running", "on torch at fp32", "1.5 GB")),
    (("export", "{tiny}", "{out}", "--dtype", "fp16"), ("exporting", "to fp16", "no precision fits")),
    (("calibrate", DEMO_BUNDLE, "{out}", "--data", "demo", "--decoder", "int4"), ("calibrating", "to int4")),
])
def test_commands_that_cannot_fit_stop_in_one_line(tiny, tmp_path, command, words):
    r = m4_cli(*(str(c).format(tiny=tiny, out=tmp_path / "out") for c in command), limit="1G")
    one_error_line(r, *words, "M4_MEMORY_LIMIT allows 1.1 GB available")
    assert not (tmp_path / "out").exists()
