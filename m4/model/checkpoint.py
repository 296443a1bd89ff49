"""transformers LLaVA checkpoints (safetensors, sharded or not) <-> the compact model.

The compact model keeps transformers' leaf names, so the mapping is by prefix, except
where it fuses projections (m4/model/fused.py). Two layouts exist in the wild: the public
checkpoints' (`language_model.model.*`, `vision_tower.vision_model.*`) and transformers
>= 4.52's (`model.language_model.*`, `vision_tower.*`, `lm_head.*`); both load.
"""

import hashlib
import json
from contextlib import contextmanager
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open

from m4.atomic import atomic_directory
from m4.errors import M4Error
from m4.model.config import Arch
from m4.model.fused import fused, split_weights
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


@contextmanager
def opened(f: Path) -> Iterator[Any]:
    """A safetensors file's handle (its tensors memory-mapped), closed after use."""
    try:
        with safe_open(f, framework="pt") as h:
            yield h
    except (SafetensorError, OSError) as e:
        raise M4Error(f"cannot read weights {f}: {e}") from None


class Checkpoint:
    """A checkpoint's tensors under m4 names, read one at a time from memory-mapped
    (sharded) safetensors: nothing is loaded until asked for, so export, calibration and
    loading hold a step's tensors, not the model. The model's fused projections are
    concatenated from their parts when asked for; a tied head is the embedding table."""

    def __init__(self, path: Path, arch: Arch):
        self.path, self.arch = Path(path), arch
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({self.path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise M4Error(f"no safetensors weights in {self.path} (m4 loads safetensors only)")
        self.where: dict[str, tuple[Path, str]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            with opened(f) as h:
                for key in h.keys():
                    name = m4_name(key) or key
                    self.where[name] = (f, key)
                    self.shapes[name] = tuple(h.get_slice(key).get_shape())
        with torch.device("meta"):
            self.model = LLaVA(arch)  # the names and shapes the weights must have
        self.parts = {key: [f"{prefix}.{part}.{kind}" for part in module.parts]
                      for prefix, key, kind, module in fused(self.model)}
        self.tied = arch.text.tied or "text.lm_head.weight" not in self.where
        self.check()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def stored(self, name: str) -> list[str]:
        """The checkpoint tensors that make the model's tensor `name`."""
        if name == "text.lm_head.weight" and self.tied:
            return ["text.embed_tokens.weight"]
        return self.parts.get(name, [name])

    def check(self) -> None:
        """Names and shapes against config.json, from the files' headers alone."""
        expected = self.model.state_dict()
        missing = [s for k in expected for s in self.stored(k) if s not in self.where]
        used = {s for k in expected for s in self.stored(k)}
        # the tower's pooling head, post-layernorm and unread layers are not part of LLaVA
        unknown = [k for k in self.where if k not in used and not k.startswith("vision.")]
        if missing or unknown:
            what = f"missing {missing[:3]}" if missing else f"unexpected {unknown[:3]}"
            raise M4Error(f"weights in {self.path} do not match config.json: {what}")
        for k, ref in expected.items():
            parts = [self.shape(s) for s in self.stored(k)]
            if any(p[1:] != tuple(ref.shape[1:]) for p in parts):
                raise M4Error(f"weight {self.stored(k)[0]} in {self.path} has shape {parts[0]}; config.json gives "
                              f"{k} the shape {tuple(ref.shape)}")
            if (shape := self.model_shape(k)) != tuple(ref.shape):
                raise M4Error(f"weight {k} in {self.path} has shape {shape}, config.json says {tuple(ref.shape)}")

    def model_shape(self, name: str) -> tuple[int, ...]:
        """The shape of the model's tensor `name` (its parts stacked)."""
        parts = [self.shape(s) for s in self.stored(name)]
        return (sum(p[0] for p in parts), *parts[0][1:]) if parts[0] else ()

    def names(self) -> list[str]:
        return list(self.model.state_dict())

    def tensor(self, name: str, dtype: torch.dtype | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """The model's tensor `name` (or its rows `rows`, reading only those), cast to `dtype`
        (a view of the mapped file where it is one stored tensor already in that dtype)."""
        shape = self.model_shape(name)
        start, stop, _ = rows.indices(shape[0]) if shape else (0, 0, 1)
        parts, first = [], 0
        for s in self.stored(name):
            f, key = self.where[s]
            n = self.shapes[s][0] if shape else 0
            lo, hi = max(start - first, 0), min(stop - first, n)
            first += n
            if shape and lo >= hi:
                continue
            with opened(f) as h:  # a mapping per read: pages read stay mapped only while their tensor lives
                whole = not shape or (lo, hi) == (0, n)
                parts.append(h.get_tensor(key) if whole else h.get_slice(key)[lo:hi])
        t = parts[0] if len(parts) == 1 else torch.cat(parts)
        return t if dtype is None else t.to(dtype)


def load_model(path: Path, arch: Arch, dtype: torch.dtype = torch.float32,
               device: str = "cpu") -> LLaVA:
    """The compact model with the checkpoint's weights in `dtype` on `device`, assigned one
    tensor at a time: no float32 copy of a half-precision checkpoint is ever made."""
    source = Checkpoint(path, arch)
    model = source.model
    tied = source.tied
    state = {k: source.tensor(k, dtype).to(device) for k in source.names() if not (tied and k == "text.lm_head.weight")}
    model.load_state_dict(state, assign=True, strict=not tied)
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
