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

from m4.errors import M4Error

QWEN_IMAGE_TOKEN = 151646


@dataclass(frozen=True)
class VisionArch:
    """SigLIP vision tower."""

    hidden: int
    layers: int
    heads: int
    mlp: int
    image_size: int
    patch_size: int
    act: str = "gelu_pytorch_tanh"
    eps: float = 1e-6

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextArch:
    """Qwen2 decoder."""

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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


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
        return self.vision.patches - (1 if self.strategy == "default" else 0)

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
        vision = (3 * v.patch_size**2 * v.hidden + v.hidden  # patch conv
                  + v.patches * v.hidden  # position embedding
                  + self.vision_layers_run * (4 * (v.hidden * v.hidden + v.hidden)  # q k v o
                                              + 2 * v.hidden * v.mlp + v.mlp + v.hidden  # mlp
                                              + 4 * v.hidden))  # two layer norms
        b = 1 if self.projector_bias else 0
        projector = self.projector_in * t.hidden + t.hidden * t.hidden + 2 * b * t.hidden
        kv = t.kv_heads * t.head_dim
        layer = (t.hidden * (t.hidden + 2 * kv) + t.hidden + 2 * kv  # q k v with bias
                 + t.hidden * t.hidden  # o
                 + 3 * t.hidden * t.mlp + 2 * t.hidden)  # mlp, two norms
        decoder = t.vocab * t.hidden + t.layers * layer + t.hidden + (0 if t.tied else t.vocab * t.hidden)
        return {"vision": vision, "projector": projector, "decoder": decoder}

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        t = self.text
        return 2 * t.layers * t.kv_heads * t.head_dim * bytes_per_value

    # -- transformers' config.json -------------------------------------------------------

    def to_hf(self) -> dict:
        """A config.json dict that `LlavaConfig(**d)` accepts."""
        v, t = self.vision, self.text
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
            "tie_word_embeddings": t.tied,
            "vision_config": {
                "model_type": "siglip_vision_model", "hidden_size": v.hidden,
                "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
                "intermediate_size": v.mlp, "image_size": v.image_size, "patch_size": v.patch_size,
                "hidden_act": v.act, "layer_norm_eps": v.eps, "vision_use_head": False,
            },
            "text_config": {
                "model_type": "qwen2", "hidden_size": t.hidden, "num_hidden_layers": t.layers,
                "num_attention_heads": t.heads, "num_key_value_heads": t.kv_heads,
                "intermediate_size": t.mlp, "vocab_size": t.vocab, "tie_word_embeddings": t.tied,
                "rope_theta": t.rope_theta, "rms_norm_eps": t.eps, "hidden_act": t.act,
                "max_position_embeddings": t.max_positions,
            },
        }

    @classmethod
    def from_hf(cls, cfg: dict) -> Arch:
        """Read a LLaVA config.json (transformers 4.x and 5.x spellings)."""
        if cfg.get("model_type") != "llava":
            raise M4Error(f"not a LLaVA checkpoint: config.json has model_type {cfg.get('model_type')!r}")
        vc, tc = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
        if vc.get("model_type", "siglip_vision_model") != "siglip_vision_model":
            raise M4Error(f"unsupported vision tower {vc.get('model_type')!r}: m4 runs SigLIP")
        if tc.get("model_type", "qwen2") != "qwen2":
            raise M4Error(f"unsupported decoder {tc.get('model_type')!r}: m4 runs Qwen2")
        if tc.get("use_sliding_window"):
            raise M4Error("sliding-window attention in the decoder is not supported")
        rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise M4Error(f"unsupported rope scaling {rope!r}")
        layer = cfg.get("vision_feature_layer", -2)
        heads = tc.get("num_attention_heads", 16)
        tied = tc.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
        return cls(
            vision=VisionArch(
                hidden=vc.get("hidden_size", 768), layers=vc.get("num_hidden_layers", 12),
                heads=vc.get("num_attention_heads", 12), mlp=vc.get("intermediate_size", 3072),
                image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 16),
                act=vc.get("hidden_act", "gelu_pytorch_tanh"), eps=vc.get("layer_norm_eps", 1e-6)),
            text=TextArch(
                hidden=tc.get("hidden_size", 4096), layers=tc.get("num_hidden_layers", 32),
                heads=heads, kv_heads=tc.get("num_key_value_heads") or heads,
                mlp=tc.get("intermediate_size", 22016), vocab=tc.get("vocab_size", 151936),
                tied=tied, rope_theta=rope.get("rope_theta", tc.get("rope_theta", 10000.0)),
                eps=tc.get("rms_norm_eps", 1e-6), act=tc.get("hidden_act", "silu"),
                max_positions=tc.get("max_position_embeddings", 32768)),
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

    def replace(self, **kw) -> Arch:
        return dataclasses.replace(self, **kw)


SIGLIP_SO400M = VisionArch(hidden=1152, layers=26, heads=16, mlp=4304, image_size=384, patch_size=14)

# The architecture numbers of every model m4 knows by name (DESIGN's table).
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
}
