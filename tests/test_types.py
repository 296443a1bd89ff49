"""The types hold: mypy over m4 as pyproject.toml's [tool.mypy] sets it (the model and the
runtime, the backend interface included, strictly). A backend that drifts from the Backend
protocol, or a caller that passes what the protocol does not take, fails here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_passes():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        pytest.fail(r.stdout + r.stderr, pytrace=False)
