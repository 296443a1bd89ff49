"""The shape of the code: pyproject.toml's import contracts hold (the layers of
docs/architecture.md, "Layers of the code"), and what a bundle runs on imports neither
torch nor transformers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that imports this checkout's m4."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_import_contracts_hold():
    """lint-imports over pyproject.toml's contracts; its report names the import that broke one."""
    r = python("from importlinter.cli import lint_imports; raise SystemExit(lint_imports(no_cache=True, no_logo=True))")
    if r.returncode:
        pytest.fail(r.stdout + r.stderr, pytrace=False)


@pytest.mark.parametrize("module", ["m4.runtime.onnx_backend", "m4.runtime.trt_backend", "m4.runtime.live",
                                    "m4.api", "m4.bundle_format", "m4.records", "m4.machine", "m4.serve.app"])
def test_bundle_path_imports_no_torch(module):
    """An [onnx]-only install (a Jetson running bundles) has no torch: importing what it runs must
    not need it. Checked in the interpreter, beside the static contract, as lazy imports count."""
    r = python(f"import sys, json, {module}; print(json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]))")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
