"""What a MODEL argument names: `demo`, a checkpoint or bundle directory, or a hub id."""

import os
import re
from pathlib import Path

from m4.errors import M4Error

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
DEMO_DIR = Path(__file__).parent / "assets" / "demo"  # trained on M4-Synth (scripts/train_demo.sh)


def cache_dir() -> Path:
    return Path(os.environ.get("M4_CACHE", Path.home() / ".cache" / "m4"))


def resolve(spec: str) -> Path:
    if spec == "demo":
        return demo_checkpoint()
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
