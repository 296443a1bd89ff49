"""What a MODEL argument names: `demo`, a checkpoint or bundle directory, or a hub id.

`demo` ships twice inside the package: as a transformers checkpoint (m4/assets/demo, what
torch runs and the tests compare with transformers) and as the fp16 ONNX bundle exported from
it (m4/assets/demo-bundle, rebuilt by scripts/ship_demo.py), which an install without torch
runs.
"""

import importlib.util
import os
import re
from pathlib import Path

from m4.errors import M4Error

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
DEMO_DIR = Path(__file__).parent / "assets" / "demo"  # trained on M4-Synth (scripts/train_demo.sh)
DEMO_BUNDLE = Path(__file__).parent / "assets" / "demo-bundle"  # m4 export demo --dtype fp16


def cache_dir() -> Path:
    return Path(os.environ.get("M4_CACHE", Path.home() / ".cache" / "m4"))


def resolve(spec: str, bundle: bool | None = None) -> Path:
    """The directory SPEC names. For `demo`: its bundle with `bundle=True`, its checkpoint with
    False, and by default the checkpoint where torch is installed, else the bundle."""
    if spec == "demo":
        if bundle is None:
            bundle = not has_torch()
        return demo_bundle() if bundle else demo_checkpoint()
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise M4Error(f"{spec} is a file; MODEL is a checkpoint or bundle directory, a hub id, or demo")
    if HUB_ID.fullmatch(spec) and not spec.startswith("."):
        return fetch(spec)
    raise M4Error(f"model not found: {spec}")


def fetch(repo_id: str) -> Path:
    """Download a hub checkpoint into huggingface_hub's cache (safetensors and configs only)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated: all one line for the user
        raise M4Error(f"model not found: {repo_id} is not a local directory and could not be fetched "
                      f"from the hub ({type(e).__name__}); offline, pass a checkpoint directory") from None


def demo_checkpoint() -> Path:
    """The demo model, shipped inside the package (a transformers checkpoint, fp16 weights)."""
    if not (DEMO_DIR / "model.safetensors").is_file():
        raise M4Error(f"the demo model is missing from this install ({DEMO_DIR}): reinstall m4")
    return DEMO_DIR


def demo_bundle() -> Path:
    """The demo model as an ONNX bundle (fp16), exported from the checkpoint beside it."""
    if not (DEMO_BUNDLE / "m4.json").is_file():
        raise M4Error(f"the demo bundle is missing from this install ({DEMO_BUNDLE}): reinstall m4")
    return DEMO_BUNDLE


def has_torch() -> bool:
    """Whether torch is installed (found, not imported: importing it takes seconds)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a finder that refuses it; a torch module without a spec
        return False
