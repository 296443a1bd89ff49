"""`m4 bench` on a tiny checkpoint: every field for every backend, JSON, CSV and a PNG."""

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

import m4 as m4_api
from m4.bench import bundle_for
from m4.bundle_format import ORT_DECODER
from test_cli import m4

# one worker for the file under pytest -n: the cache test finds the bundle the bench test exported
pytestmark = pytest.mark.xdist_group("bench")


@pytest.fixture(scope="module")
def cache(checkpoints, tmp_path_factory):
    """A cache holding a copy of the tiny checkpoint: the bundle the bench exports into it is the
    one the cache test finds current (exporting it is the bench's; the cache test exports again)."""
    root = tmp_path_factory.mktemp("cache")
    (root / "ckpt").mkdir()
    for f in checkpoints["gqa-tied-last-full"].iterdir():
        (root / "ckpt" / f.name).write_bytes(f.read_bytes())
    return root


def test_bench_all_workloads(cache, tmp_path):
    out = tmp_path / "out"
    r = m4("bench", "--model", cache / "ckpt", "--backends", "torch,onnx,trt,hf",
           "--workload", "all", "--frames", "4", "--window", "2", "--every", "2", "--images", "2",
           "--new-tokens", "4", "--contexts", "16,48", "--repeats", "2",
           "--json", f"{out}.json", "--csv", f"{out}.csv", "--plot", f"{out}.png", cache=cache)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    assert "m4 build" in result["skipped"]["trt"]  # a checkpoint: trt runs a bundle's engines
    records = result["records"]
    for backend in ("torch", "onnx", "hf"):
        mine = [x for x in records if x["backend"] == backend]
        assert [x["workload"] for x in mine] == ["stream", "images", "decode", "decode"]
        assert [x["context"] for x in mine if x["workload"] == "decode"] == [16, 48]
        for x in mine:
            assert x["decode_tok_s"] > 0 and x["peak_rss_bytes"] > 0 and x["dtype"] == "fp32"
            assert all(q["p95"] >= q["p50"] > 0 for q in x["stages"].values())
        assert "ttft_ms" in mine[0]["stages"] and "ttft_ms" in mine[1]["stages"]
        assert mine[2]["prefill_tok_s"] > 0
    for backend in ("torch", "onnx"):  # m4 backends ingest frames into the live window
        stream = next(x for x in records if x["backend"] == backend and x["workload"] == "stream")
        assert {"preprocess_ms", "vision_ms", "frame_prefill_ms", "ingest_ms"} <= set(stream["stages"])
        assert stream["frames_per_s"] > 0
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert len(rows) == len(records) and "ttft_ms_p50" in rows[0]
    assert Image.open(tmp_path / "out.png").size[0] > 600
    assert "ttft" in r.stdout and "onnx" in r.stdout


def test_bench_bad_arguments():
    r = m4("bench", "--preset", "0.5b")
    assert r.returncode == 2 and "--random-weights" in r.stderr
    r = m4("bench", "--backends", "torch,gpu")
    assert r.returncode == 2 and "unknown backend 'gpu'" in r.stderr


def test_bench_cuda_without_a_gpu(checkpoints):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA (tests/test_gpu.py and scripts/gpu_check.sh cover it)")
    r = m4("bench", "--model", checkpoints["gqa-tied-last-full"], "--device", "cuda")
    assert r.returncode == 2 and "torch sees no CUDA device" in r.stderr and "Traceback" not in r.stderr


def test_bench_bundle_cache_exports_again_when_stale(cache, monkeypatch):
    """A cached bundle is reused while it is current; one an older m4 left (here: an older
    manifest and decoder, no key) or one of a changed checkpoint is exported again."""
    monkeypatch.setenv("M4_CACHE", str(cache))
    ck = cache / "ckpt"
    out = Path(bundle_for(str(ck)))
    made = (out / "m4.json").stat().st_mtime_ns
    assert bundle_for(str(ck)) == str(out) and (out / "m4.json").stat().st_mtime_ns == made

    m = json.loads((out / "m4.json").read_text())
    m["files"] = {f: r for f, r in m["files"].items() if not f.startswith(ORT_DECODER)}
    (out / "m4.json").write_text(json.dumps({**m, "format_version": 0}))
    (out / "bench-key").unlink()
    assert bundle_for(str(ck)) == str(out)
    assert m4_api.load(out).backend.fused

    made = (out / "m4.json").stat().st_mtime_ns
    (ck / "config.json").write_text((ck / "config.json").read_text() + "\n")
    bundle_for(str(ck))
    assert (out / "m4.json").stat().st_mtime_ns != made
