"""transformers LLaVA checkpoints (safetensors, sharded or not) <-> the compact model.

The compact model keeps transformers' leaf names, so the mapping is by prefix, except
where it fuses projections (m4/model/fused.py). Two layouts exist in the wild: the public
checkpoints' (`language_model.model.*`, `vision_tower.vision_model.*`) and transformers
>= 4.52's (`model.language_model.*`, `vision_tower.*`, `lm_head.*`); both load.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from m4.atomic import atomic_directory
from m4.errors import M4Error
from m4.model.config import Arch
from m4.model.fused import fuse_weights, split_weights
from m4.model.llava import LLaVA
from m4.tokenizer import Tokenizer

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


def save_checkpoint(model: LLaVA, tokenizer: Tokenizer, path: Path) -> None:
    """Write `model` as a transformers checkpoint, atomically."""
    tied = model.arch.text.tied
    state = model.state_dict()
    split_weights(model, state)
    out = {checkpoint_name(k): t.contiguous() for k, t in state.items() if not (tied and k == "text.lm_head.weight")}
    # SigLIP's post-layernorm, which LLaVA never applies: identity, so transformers loads it whole
    hidden = model.arch.vision.hidden
    out["vision_tower.vision_model.post_layernorm.weight"] = torch.ones(hidden)
    out["vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(hidden)
    with atomic_directory(path) as tmp:
        save_file(out, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model.arch.to_hf(), indent=2))
        tokenizer.save(tmp)


def random_checkpoint(preset: str, path: Path, seed: int = 0, std: float = 0.02) -> Arch:
    """A seeded random checkpoint of a preset with its own small tokenizer. transformers
    initialises with std 0.02; a wider one keeps random logits apart, for measuring."""
    from m4.model.config import PRESETS
    from m4.tokenizer import TOKENIZER_CORPUS, build_tokenizer

    arch = PRESETS[preset]
    tokenizer = build_tokenizer(TOKENIZER_CORPUS, arch.text.vocab)
    arch = arch.replace(image_token_id=tokenizer.token_id("<image>"))
    torch.manual_seed(seed)
    model = LLaVA(arch)
    for name, w in model.named_parameters():  # transformers' init: normal weights, zero biases
        if name.endswith("bias"):
            torch.nn.init.zeros_(w)
        elif w.dim() > 1:
            torch.nn.init.normal_(w, std=std)
    save_checkpoint(model, tokenizer, path)
    return arch
