"""Architecture numbers: the one table of presets, and config.json in and out.

An `Arch` is everything the compact model, the exporter and the tools need to know about a
checkpoint. It is read from transformers' config.json (`from_hf`), written back
(`to_hf`), or taken from PRESETS. Nothing here imports torch: the ONNX runtime and
`m4 info` use it on machines without torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m4.errors import M4Error

QWEN_IMAGE_TOKEN = 151646


@dataclass(frozen=True)
class VisionArch:
    """The vision tower: SigLIP, or CLIP (a class token in front of the patches, a layer
    norm before the encoder, a patch projection without bias)."""

    hidden: int
    layers: int
    heads: int
    mlp: int
    image_size: int
    patch_size: int
    act: str = "gelu_pytorch_tanh"
    eps: float = 1e-6
    kind: str = "siglip"  # or "clip"

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def positions(self) -> int:
        """Tokens the tower outputs: its patches, and CLIP's class token."""
        return self.patches + (self.kind == "clip")


@dataclass(frozen=True)
class TextArch:
    """The decoder: Qwen2 (q/k/v with bias) or Llama (no bias unless attention_bias;
    Llama 3.1's rope scaling)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    tied: bool = True
    rope_theta: float = 1e6
    eps: float = 1e-6
    act: str = "silu"
    max_positions: int = 32768
    kind: str = "qwen2"  # or "llama"
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    head_size: int | None = None  # config.json's head_dim where it is not hidden / heads
    # Llama 3.1's rope scaling: (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings); None for plain RoPE
    rope_llama3: tuple[float, float, float, int] | None = None

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads


@dataclass(frozen=True)
class Arch:
    vision: VisionArch
    text: TextArch
    # None for presets whose tokenizer is built with the checkpoint (tiny, demo): the id
    # is whatever that tokenizer gives `<image>`, and config.json records it.
    image_token_id: int | None = QWEN_IMAGE_TOKEN
    feature_layers: tuple[int, ...] = (-1,)  # config's vision_feature_layer (int or list)
    strategy: str = "full"  # vision_feature_select_strategy: "default" drops the first token
    projector_act: str = "gelu"
    projector_bias: bool = True

    @property
    def tokens_per_image(self) -> int:
        return self.vision.positions - (1 if self.strategy == "default" else 0)

    @property
    def feature_states(self) -> tuple[int, ...]:
        """Which hidden states LLaVA reads, counted from 0 = the patch embedding."""
        return tuple(k % (self.vision.layers + 1) for k in self.feature_layers)

    @property
    def vision_layers_run(self) -> int:
        """Encoder layers worth running: those after the deepest state read are never needed."""
        return max(self.feature_states)

    @property
    def projector_in(self) -> int:
        return self.vision.hidden * len(self.feature_layers)

    def params(self) -> dict[str, int]:
        """Parameter count per part, from the shapes alone (no weights allocated)."""
        v, t = self.vision, self.text
        clip = v.kind == "clip"
        vision = (3 * v.patch_size**2 * v.hidden + (0 if clip else v.hidden)  # patch conv
                  + (3 * v.hidden if clip else 0)  # class embedding, pre-layernorm
                  + v.positions * v.hidden  # position embedding
                  + self.vision_layers_run * (4 * (v.hidden * v.hidden + v.hidden)  # q k v o
                                              + 2 * v.hidden * v.mlp + v.mlp + v.hidden  # mlp
                                              + 4 * v.hidden))  # two layer norms
        b = 1 if self.projector_bias else 0
        projector = self.projector_in * t.hidden + t.hidden * t.hidden + 2 * b * t.hidden
        q, kv = t.heads * t.head_dim, t.kv_heads * t.head_dim
        layer = (t.hidden * (q + 2 * kv) + t.qkv_bias * (q + 2 * kv)  # q k v
                 + q * t.hidden + t.o_bias * t.hidden  # o
                 + 3 * t.hidden * t.mlp + t.mlp_bias * (2 * t.mlp + t.hidden)  # mlp
                 + 2 * t.hidden)  # two norms
        decoder = t.vocab * t.hidden + t.layers * layer + t.hidden + (0 if t.tied else t.vocab * t.hidden)
        return {"vision": vision, "projector": projector, "decoder": decoder}

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        t = self.text
        return 2 * t.layers * t.kv_heads * t.head_dim * bytes_per_value

    # -- transformers' config.json -------------------------------------------------------

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that `LlavaConfig(**d)` accepts."""
        layer = self.feature_layers[0] if len(self.feature_layers) == 1 else list(self.feature_layers)
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": self.image_token_id,
            "vision_feature_layer": layer,
            "vision_feature_select_strategy": self.strategy,
            "projector_hidden_act": self.projector_act,
            "multimodal_projector_bias": self.projector_bias,
            "image_seq_length": self.tokens_per_image,
            "tie_word_embeddings": self.text.tied,
            "vision_config": vision_to_hf(self.vision),
            "text_config": text_to_hf(self.text),
        }

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> Arch:
        """Read a LLaVA config.json (transformers 4.x and 5.x spellings)."""
        kind = cfg.get("model_type")
        if kind in OTHER_ARCHITECTURES:
            raise M4Error(f"config.json has model_type {kind!r}: {OTHER_ARCHITECTURES[kind]}, which m4 does not run "
                          "(m4 runs LLaVA checkpoints: LLaVA-Interleave, Mantis-8B-siglip/clip-llama3)")
        if kind != "llava":
            raise M4Error(f"not a LLaVA checkpoint: config.json has model_type {kind!r}")
        layer = cfg.get("vision_feature_layer", -2)
        return cls(
            vision=vision_from_hf(cfg.get("vision_config") or {}),
            text=text_from_hf(cfg.get("text_config") or {}, cfg),
            image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 32000)),
            feature_layers=tuple(layer) if isinstance(layer, list) else (layer,),
            strategy=cfg.get("vision_feature_select_strategy", "default"),
            projector_act=cfg.get("projector_hidden_act", "gelu"),
            projector_bias=cfg.get("multimodal_projector_bias", True),
        )

    @classmethod
    def from_dir(cls, path: Path) -> Arch:
        f = Path(path) / "config.json"
        if not f.is_file():
            raise M4Error(f"no config.json in {path}: not a transformers checkpoint")
        try:
            return cls.from_hf(json.loads(f.read_text()))
        except (json.JSONDecodeError, TypeError, AttributeError) as e:
            raise M4Error(f"cannot read {f}: {e}") from None

    def replace(self, **kw: Any) -> Arch:
        return dataclasses.replace(self, **kw)


# model types of other architectures a user may bring (Mantis's other variants among them)
OTHER_ARCHITECTURES = {"idefics2": "Idefics2 (Mantis-8B-Idefics2)", "fuyu": "Fuyu (Mantis-8B-Fuyu)",
                       "llava_next": "LLaVA-NeXT with anyres image features", "qwen2_vl": "Qwen2-VL"}
VISION_TYPES = {"siglip_vision_model": "siglip", "clip_vision_model": "clip"}
VISION_DEFAULTS = {"siglip": {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
                   "clip": {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}}


def vision_to_hf(v: VisionArch) -> dict[str, Any]:
    return {"model_type": f"{v.kind}_vision_model", "hidden_size": v.hidden, "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads, "intermediate_size": v.mlp, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": v.act, "layer_norm_eps": v.eps,
            **({"vision_use_head": False} if v.kind == "siglip" else {})}


def vision_from_hf(vc: dict[str, Any]) -> VisionArch:
    kind = VISION_TYPES.get(vc.get("model_type", "siglip_vision_model"))
    if kind is None:
        raise M4Error(f"unsupported vision tower {vc.get('model_type')!r}: m4 runs SigLIP and CLIP")
    default = VISION_DEFAULTS[kind]
    return VisionArch(
        hidden=vc.get("hidden_size", 768), layers=vc.get("num_hidden_layers", 12),
        heads=vc.get("num_attention_heads", 12), mlp=vc.get("intermediate_size", 3072),
        image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 16),
        act=vc.get("hidden_act", default["hidden_act"]), eps=vc.get("layer_norm_eps", default["layer_norm_eps"]),
        kind=kind)


def text_to_hf(t: TextArch) -> dict[str, Any]:
    d = {"model_type": t.kind, "hidden_size": t.hidden, "num_hidden_layers": t.layers,
         "num_attention_heads": t.heads, "num_key_value_heads": t.kv_heads, "intermediate_size": t.mlp,
         "vocab_size": t.vocab, "tie_word_embeddings": t.tied, "rms_norm_eps": t.eps, "hidden_act": t.act,
         "max_position_embeddings": t.max_positions, "head_dim": t.head_dim}
    rope = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_llama3:
        factor, low, high, original = t.rope_llama3
        rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                    original_max_position_embeddings=original)
    d.update(rope_theta=t.rope_theta, rope_parameters=rope, rope_scaling=rope)
    if t.kind == "llama":
        d.update(attention_bias=t.o_bias, mlp_bias=t.mlp_bias)
    return d


def text_from_hf(tc: dict[str, Any], cfg: dict[str, Any]) -> TextArch:
    kind = tc.get("model_type", "qwen2")
    if kind not in ("qwen2", "llama"):
        raise M4Error(f"unsupported decoder {kind!r}: m4 runs Qwen2 and Llama")
    if tc.get("use_sliding_window"):
        raise M4Error("sliding-window attention in the decoder is not supported")
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3") or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise M4Error(f"unsupported rope scaling {rope!r}: m4 runs plain RoPE and Llama 3.1's")
    hidden, heads, head = tc.get("hidden_size", 4096), tc.get("num_attention_heads", 32), tc.get("head_dim")
    # Qwen2 has biases on q, k and v only; Llama on all four projections or none
    bias = tc.get("attention_bias", False)
    llama3 = None
    if rope_type == "llama3":
        llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                  int(rope["original_max_position_embeddings"]))
    return TextArch(
        hidden=hidden, layers=tc.get("num_hidden_layers", 32),
        heads=heads, kv_heads=tc.get("num_key_value_heads") or heads,
        mlp=tc.get("intermediate_size", 11008), vocab=tc.get("vocab_size", 32000),
        tied=tc.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)),
        rope_theta=rope.get("rope_theta", tc.get("rope_theta", 10000.0)),
        eps=tc.get("rms_norm_eps", 1e-6), act=tc.get("hidden_act", "silu"),
        max_positions=tc.get("max_position_embeddings", 32768), kind=kind,
        qkv_bias=kind == "qwen2" or bias, o_bias=kind == "llama" and bias,
        mlp_bias=kind == "llama" and tc.get("mlp_bias", False),
        head_size=None if head in (None, hidden // heads) else head,
        rope_llama3=llama3)


SIGLIP_SO400M = VisionArch(hidden=1152, layers=26, heads=16, mlp=4304, image_size=384, patch_size=14)
CLIP_L_336 = VisionArch(hidden=1024, layers=24, heads=16, mlp=4096, image_size=336, patch_size=14, act="quick_gelu",
                        eps=1e-5, kind="clip")
# Llama-3-8B as Mantis tunes it: 128,256 tokens and the added <image>
LLAMA3_8B = TextArch(hidden=4096, layers=32, heads=32, kv_heads=8, mlp=14336, vocab=128257, tied=False,
                     rope_theta=5e5, eps=1e-5, max_positions=8192, kind="llama", qkv_bias=False)

# The architecture numbers of every model m4 knows by name (docs/architecture.md names them).
PRESETS: dict[str, Arch] = {
    # tests: GQA, tied, 16 tokens per image
    "tiny": Arch(
        vision=VisionArch(hidden=32, layers=2, heads=4, mlp=64, image_size=32, patch_size=8),
        text=TextArch(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, vocab=384),
        image_token_id=None),
    # the small model m4 ships: a few million parameters, 9 tokens per 96-px image (a 32-px
    # patch per cell of M4-Synth's 3x3 grid of places; an 8-frame clip is 72 tokens, which is
    # what lets 2 CPU cores train it); 4,096 positions (a 400-frame window), whose RoPE tables
    # an exported decoder carries: at Qwen2's 32,768 they would outweigh its 3.2 M weights
    "demo": Arch(
        vision=VisionArch(hidden=128, layers=4, heads=4, mlp=512, image_size=96, patch_size=32),
        text=TextArch(hidden=256, layers=4, heads=4, kv_heads=2, mlp=704, vocab=512, max_positions=4096),
        image_token_id=None),
    "0.5b": Arch(
        vision=SIGLIP_SO400M,
        text=TextArch(hidden=1024, layers=24, heads=16, kv_heads=16, mlp=2816, vocab=152000)),
    "7b": Arch(
        vision=SIGLIP_SO400M,
        text=TextArch(hidden=4096, layers=32, heads=32, kv_heads=32, mlp=11008, vocab=152000, tied=False)),
    "14b": Arch(
        vision=SIGLIP_SO400M,
        text=TextArch(hidden=5120, layers=40, heads=40, kv_heads=40, mlp=13696, vocab=152064, tied=False)),
    "mantis-8b": Arch(vision=SIGLIP_SO400M, text=LLAMA3_8B, image_token_id=128256, feature_layers=(-2,)),
    "mantis-8b-clip": Arch(vision=CLIP_L_336, text=LLAMA3_8B, image_token_id=128256, feature_layers=(-2,),
                           strategy="default"),
}
