"""Tiny random checkpoints in the real transformers layout, built once per test session.

Each is `LlavaConfig` + `LlavaForConditionalGeneration.save_pretrained`, with its own small
byte-level BPE tokenizer (ChatML specials + <image>) saved beside the weights, as a real
checkpoint's is. Variants cover what differs between real models.
"""

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping

import numpy as np
import pytest
from filelock import FileLock

# One thread for torch, here and in every process a test starts: the models are tiny, and on
# two cores OpenMP threads spinning against another process (a server, a CLI, a second
# worker) made an evaluation of the demo model several times slower.
os.environ["OMP_NUM_THREADS"] = "1"
torch = pytest.importorskip("torch")
torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")

import m4  # noqa: E402
from m4.bundle_format import ORT_DECODER  # noqa: E402
from m4.export.bundle import export_bundle  # noqa: E402
from m4.model.config import PRESETS  # noqa: E402
from m4.tokenizer import TOKENIZER_CORPUS, build_tokenizer  # noqa: E402

# name -> (decoder, vision tower, kv heads, tied embeddings, vision_feature_layer, strategy)
VARIANTS = {
    "gqa-tied-last-full": ("qwen2", "siglip", 2, True, -1, "full"),
    "mha-untied-penult-default": ("qwen2", "siglip", 4, False, -2, "default"),
    "gqa-untied-penult-full": ("qwen2", "siglip", 2, False, -2, "full"),
    "mha-tied-last-default": ("qwen2", "siglip", 4, True, -1, "default"),
    "llama-siglip-gqa-untied-penult-default": ("llama", "siglip", 2, False, -2, "default"),
    "llama-clip-mha-tied-penult-default": ("llama", "clip", 4, True, -2, "default"),
    # Llama 3.1's rope scaling, and biases on every attention projection
    "llama3.1-clip-gqa-untied-last-full": ("llama", "clip", 2, False, -1, "full"),
}
TOWERS = {"siglip": {}, "clip": {"kind": "clip", "act": "quick_gelu", "eps": 1e-5}}
DECODERS = {"qwen2": {}, "llama": {"kind": "llama", "qkv_bias": False, "rope_theta": 5e5, "eps": 1e-5}}


def tiny_arch(variant: str, image_token_id: int, **text):
    """The tiny preset in a variant's shape; `text` overrides decoder fields (hidden, heads, ...)."""
    decoder, tower, kv_heads, tied, layer, strategy = VARIANTS[variant]
    base = PRESETS["tiny"]
    text = {**DECODERS[decoder], **text}
    if variant.startswith("llama3.1"):
        text.update(rope_llama3=(8.0, 1.0, 4.0, 64), qkv_bias=True, o_bias=True)
    return base.replace(vision=dataclasses.replace(base.vision, **TOWERS[tower]),
                        text=dataclasses.replace(base.text, kv_heads=kv_heads, tied=tied, **text),
                        feature_layers=(layer,), strategy=strategy, image_token_id=image_token_id)


def save_tiny_checkpoint(path, variant: str, seed: int = 0, **text):
    style = "llama3" if VARIANTS[variant][0] == "llama" else "chatml"
    tokenizer = build_tokenizer(TOKENIZER_CORPUS, PRESETS["tiny"].text.vocab, style)
    arch = tiny_arch(variant, tokenizer.token_id("<image>"), **text)
    config = transformers.LlavaConfig(**arch.to_hf())
    # a wider init than transformers' 0.02 keeps random logits apart, so greedy choices
    # are decided by the model and not by rounding
    config.text_config.initializer_range = config.vision_config.initializer_range = 0.2
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    tokenizer.save(path)
    return path


class Built(Mapping):
    """name -> `make(name)`, made when first read: a test that reads one variant waits for that
    one alone, and each is made once per session whichever test file reads it first."""

    def __init__(self, names, make):
        self.names, self.make, self.made = list(names), make, {}

    def __getitem__(self, name):
        if name not in self.made:
            if name not in self.names:
                raise KeyError(name)
            self.made[name] = self.make(name)
        return self.made[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


@pytest.fixture(scope="session", autouse=True)
def one_onnx_runtime_thread():
    """ONNX Runtime's sessions on one thread too, unless a test asks for more: its idle threads
    spin as OpenMP's do."""
    from m4.runtime import onnx_backend

    with pytest.MonkeyPatch.context() as mp:
        session = onnx_backend.session
        mp.setattr(onnx_backend, "session", lambda f, chosen, threads: session(f, chosen, threads or 1))
        yield


def shared_root(tmp_path_factory, name: str):
    """A directory for what the session builds, one for all the workers of `pytest -n N`."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return tmp_path_factory.mktemp(name)
    root = tmp_path_factory.getbasetemp().parent / name  # the workers' base directories' parent
    root.mkdir(exist_ok=True)
    return root


def once(path, make):
    """`make(path)` unless a worker of this session has: the first makes it while the others
    wait, and none sees it half made."""
    with FileLock(f"{path}.lock"):
        if not path.exists():
            part = path.with_name(f".{path.name}.part")
            shutil.rmtree(part, ignore_errors=True)
            make(part)
            part.rename(path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = shared_root(tmp_path_factory, "ckpt")
    seeds = {v: i for i, v in enumerate(VARIANTS)}
    return Built(VARIANTS, lambda v: once(root / v, lambda p: save_tiny_checkpoint(p, v, seed=seeds[v])))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """m4's own tiny preset, seeded random weights (m4 checkpoint random tiny)."""
    from m4.model.checkpoint import random_checkpoint

    path = tmp_path_factory.mktemp("tiny") / "ck"
    random_checkpoint("tiny", path)
    return path


@pytest.fixture(scope="session")
def oracle():
    """transformers' LlavaForConditionalGeneration on a checkpoint directory, cached."""
    models = {}

    def get(path):
        if path not in models:
            models[path] = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
        return models[path]

    return get


def random_images(n: int, seed: int = 0, size=(48, 40)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(n)]


# -- bundles exported from the checkpoints, shared by the tests of the ONNX path ---------

@pytest.fixture(scope="session")
def bundles(checkpoints, tmp_path_factory):
    root = shared_root(tmp_path_factory, "bundles")
    return Built(checkpoints, lambda v: once(root / v, lambda p: export_bundle(str(checkpoints[v]), p)))


@pytest.fixture(scope="session")
def standard(bundles, tmp_path_factory):
    """The bundles as an m4 that wrote no decoder_ort.onnx left them: the CPU runs decoder.onnx."""
    root = tmp_path_factory.mktemp("standard")

    def make(v):
        b = bundles[v]
        (root / v).mkdir()
        for f in b.iterdir():
            if not f.name.startswith((ORT_DECODER, "m4.json")):
                (root / v / f.name).symlink_to(f)
        m = json.loads((b / "m4.json").read_text())
        m["files"] = {f: r for f, r in m["files"].items() if not f.startswith(ORT_DECODER)}
        del m["dtypes"][ORT_DECODER]
        (root / v / "m4.json").write_text(json.dumps(m))
        return root / v

    return Built(bundles, make)


GRAPHS = [ORT_DECODER, "decoder.onnx"]


@pytest.fixture(scope="session")
def paths(bundles, standard):
    """(variant, graph) -> a bundle whose decoder on the CPU is that graph."""
    return Built([(v, g) for v in bundles for g in GRAPHS],
                 lambda k: (bundles if k[1] == ORT_DECODER else standard)[k[0]])


@pytest.fixture(scope="session")
def models(paths):
    return Built(paths, lambda k: m4.load(paths[k]))


@pytest.fixture(scope="session")
def held_out_synth(tmp_path_factory):
    """M4-Synth's bench (20 samples) of a seed the shipped demo never trained on
    (scripts/train_demo.sh uses 0 and 4)."""
    from m4.train.synth import synth

    out = tmp_path_factory.mktemp("bench") / "m4synth"
    synth(out, n=0, bench=20, seed=7, workers=1)
    return out
