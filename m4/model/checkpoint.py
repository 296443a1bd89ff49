"""transformers LLaVA checkpoints (safetensors, sharded or not) <-> the compact model.

The compact model keeps transformers' leaf names, so the mapping is by prefix, except
where it fuses projections (m4/model/fused.py). Two layouts exist in the wild: the public
checkpoints' (`language_model.model.*`, `vision_tower.vision_model.*`) and transformers
>= 4.52's (`model.language_model.*`, `vision_tower.*`, `lm_head.*`); both load.
"""

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from m4.atomic import atomic_directory
from m4.errors import M4Error
from m4.model.config import Arch
from m4.model.fused import fuse_weights, split_weights
from m4.model.llava import LLaVA
from m4.model.shards import TensorSpec, write_shards
from m4.model.vision import VisionTower

# (checkpoint prefix, m4 prefix), longest first so the first match is the right one.
PREFIXES = [
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("language_model.lm_head.", "text.lm_head."),
    ("lm_head.", "text.lm_head."),
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
]
# m4 prefix -> the public checkpoints' prefix, for writing.
SAVE_PREFIXES = [
    ("text.lm_head.", "language_model.lm_head."),
    ("text.", "language_model.model."),
    ("vision.layers.", "vision_tower.vision_model.encoder.layers."),
    ("vision.", "vision_tower.vision_model."),
    ("projector.", "multi_modal_projector."),
]


def m4_name(key: str) -> str | None:
    for src, dst in PREFIXES:
        if key.startswith(src):
            return (dst + key[len(src):]).replace("vision.encoder.layers.", "vision.layers.")
    return None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under its m4 name (None-mapped keys dropped later)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise M4Error(f"no safetensors weights in {path} (m4 loads safetensors only)")
    weights = {}
    for f in files:
        try:
            tensors = load_file(f)
        except (SafetensorError, OSError) as e:
            raise M4Error(f"cannot read weights {f}: {e}") from None
        for key, t in tensors.items():
            weights[m4_name(key) or key] = t
    return weights


def load_model(path: Path, arch: Arch, dtype: torch.dtype = torch.float32,
               device: str = "cpu") -> LLaVA:
    with torch.device("meta"):
        model = LLaVA(arch)
    expected = model.state_dict()
    weights = read_weights(Path(path))
    absent = fuse_weights(model, weights)
    # Tied checkpoints may or may not store lm_head; either way it is the embedding table.
    tied = arch.text.tied or "text.lm_head.weight" not in weights
    if tied and "text.embed_tokens.weight" in weights:
        weights["text.lm_head.weight"] = weights["text.embed_tokens.weight"]
    # The tower's pooling head, post-layernorm and unread layers are not part of LLaVA.
    unknown = [k for k in weights if k not in expected and not k.startswith("vision.")]
    missing = absent + [k for k in expected if k not in weights]
    if unknown or missing:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unknown[:3]}"
        raise M4Error(f"weights in {path} do not match config.json: {what}")
    state = {}
    for k, ref in expected.items():
        w = weights[k]
        if w.shape != ref.shape:
            raise M4Error(f"weight {k} in {path} has shape {tuple(w.shape)}, config.json says {tuple(ref.shape)}")
        state[k] = w.to(dtype)
    model.load_state_dict(state, assign=True)
    if tied:
        model.text.lm_head.weight = model.text.embed_tokens.weight
    return model.to(device).eval()


def checkpoint_name(name: str) -> str:
    for src, dst in SAVE_PREFIXES:
        if name.startswith(src):
            return dst + name[len(src):]
    raise KeyError(name)


# what random_checkpoint writes: floats in these dtypes (the hub's checkpoints are bf16 or fp16)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size
PIECE_VALUES = 1 << 24  # values made at once: 64 MB of float32


def checkpoint_specs(arch: Arch, dtype: torch.dtype) -> list[TensorSpec]:
    """Every tensor of a transformers checkpoint of `arch`, in its names and split layout: the
    whole vision tower (m4 builds only the layers it reads), with SigLIP's post-layernorm;
    a tied decoder stores no lm_head. Shapes from the meta device, nothing allocated."""
    with torch.device("meta"):
        model = LLaVA(arch)
        parts = {"vision.": VisionTower(arch.vision, arch.vision.layers), "projector.": model.projector,
                 "text.": model.text}
    shapes = {}
    for prefix, module in parts.items():
        state = module.state_dict()
        split_weights(module, state)
        shapes.update({prefix + k: tuple(t.shape) for k, t in state.items()})
    if arch.text.tied:
        del shapes["text.lm_head.weight"]
    # SigLIP's post-layernorm (CLIP's too), which LLaVA never applies: transformers loads it
    shapes.update({f"vision.post_layernorm.{k}": (arch.vision.hidden,) for k in ("weight", "bias")})
    return [TensorSpec(checkpoint_name(k), shape, dtype) for k, shape in shapes.items()]


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def random_pieces(spec: TensorSpec, seed: int, std: float) -> Iterator[torch.Tensor]:
    """transformers' init: normal(0, std) matrices, zero biases, unit norm weights (and a zero
    CLIP class embedding). Each tensor draws from a generator seeded by its name, so its
    values do not depend on the other tensors or their order; it is made in blocks of rows,
    in float32 then cast, so memory holds one block of it."""
    if len(spec.shape) == 1:
        yield torch.full(spec.shape, 1.0 if "norm" in spec.name and spec.name.endswith("weight") else 0.0)
        return
    g = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    rows, row = spec.shape[0], math.prod(spec.shape[1:])
    step = max(1, PIECE_VALUES // row)
    for r in range(0, rows, step):
        yield torch.empty((min(step, rows - r), *spec.shape[1:])).normal_(0, std, generator=g)


def random_checkpoint(preset: str, path: Path, seed: int = 0, std: float = 0.02, dtype: str = "fp32",
                      shard_bytes: int = SHARD_BYTES,
                      progress: Callable[[int, int], None] = lambda done, total: None) -> Arch:
    """A seeded random checkpoint of a preset (random_weights)."""
    from m4.model.config import PRESETS

    if preset not in PRESETS:
        raise M4Error(f"unknown preset {preset!r}: use " + ", ".join(PRESETS))
    return random_weights(PRESETS[preset], path, seed, std, dtype, shard_bytes, progress)


def random_weights(arch: Arch, path: Path, seed: int = 0, std: float = 0.02, dtype: str = "fp32",
                   shard_bytes: int = SHARD_BYTES,
                   progress: Callable[[int, int], None] = lambda done, total: None) -> Arch:
    """A seeded random checkpoint of `arch` with its own small tokenizer, written atomically
    a tensor at a time (any size fits in memory): sharded safetensors past `shard_bytes`,
    config.json, the tokenizer. transformers initialises with std 0.02; a wider one keeps
    random logits apart, for measuring. `progress(bytes written, total bytes)`. Returns the
    architecture written (its image token is the tokenizer's)."""
    from m4.tokenizer import TOKENIZER_CORPUS, build_tokenizer

    if dtype not in DTYPES:
        raise M4Error(f"unknown dtype {dtype!r}: use " + ", ".join(DTYPES))
    tokenizer = build_tokenizer(TOKENIZER_CORPUS, arch.text.vocab, "llama3" if arch.text.kind == "llama" else "chatml")
    arch = arch.replace(image_token_id=tokenizer.token_id("<image>"))
    specs = checkpoint_specs(arch, DTYPES[dtype])
    total, done = sum(s.nbytes for s in specs), 0

    def written(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    with atomic_directory(path) as tmp:
        write_shards(tmp, specs, lambda s: random_pieces(s, seed, std), shard_bytes, written)
        (tmp / "config.json").write_text(json.dumps(arch.to_hf(), indent=2))
        tokenizer.save(tmp)
    return arch
