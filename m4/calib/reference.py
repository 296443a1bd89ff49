"""The float bundle's decoder as calibration's reference, run one layer at a time.

The report compares a quantised decoder with its float bundle at every position of the
held-out prompts. Run whole, the float decoder is the largest thing calibration would hold
(a 7B's in fp16 is 15 GB, and ONNX Runtime casts it to float32 on a CPU without fp16
MatMuls); here m4's own decoder definition (m4.model.decoder) runs it instead, layer by
layer: each layer's weights are read from the float bundle's weights file (memory-mapped,
the bytes both its graphs read), cast to float32, run over every held-out sequence at once
and dropped before the next layer is read. Memory is one layer, the sequences' hidden
states and a slice of the head's rows, whatever the model's size; the weights are read once.

The bundle's qkv weights carry softmax's query scale (m4.export.graphs.query_scale), which
is divided out here, so the decoder definition runs as it stands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from m4.bundle_format import ORT_DECODER, manifest_arch, read_manifest
from m4.calib.decoder import mapped
from m4.errors import M4Error
from m4.export.graphs import query_scale
from m4.model.decoder import Decoder
from m4.model.rope import rope_table

HEAD_ROWS = 16384  # rows of the head (vocabulary entries) cast to float32 at a time


class Whole:
    """The Cache of a whole sequence read at once: causal attention of its tokens over each
    other, nothing kept."""

    def mask(self, input_pos: torch.Tensor, groups: int) -> None:
        return None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
               mask: Any) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class Reference:
    def __init__(self, bundle: Path):
        self.bundle = Path(bundle)
        m = read_manifest(self.bundle)
        self.arch = manifest_arch(m).text
        self.inits: dict[str, onnx.TensorProto] = {}
        for g in ("decoder.onnx", ORT_DECODER):  # both name the float weights by their keys
            if g in m["files"]:
                graph = onnx.load(str(self.bundle / g), load_external_data=False).graph
                self.inits.update((t.name, t) for t in graph.initializer)
        with torch.device("meta"):
            self.text = Decoder(self.arch)
        cos, sin = rope_table(self.arch)
        self.text.cos, self.text.sin = torch.from_numpy(cos), torch.from_numpy(sin)
        self.scale = query_scale(self.text)
        self.table = np.load(self.bundle / "embed_tokens.npy", mmap_mode="r")

    def embed(self, ids: list[int]) -> np.ndarray:
        return np.asarray(self.table[ids], np.float32).reshape(len(ids), -1)

    def read(self, name: str) -> torch.Tensor:
        """A float32 copy of the model tensor `name` (a linear's weight as nn.Linear holds it)."""
        t = self.inits.get(f"{name}.T")
        if t is None and (t := self.inits.get(name)) is None:
            raise M4Error(f"{self.bundle} has no weight {name}: export the bundle again with this m4")
        x = torch.from_numpy(np.array(mapped(self.bundle, t), np.float32))
        x = x.T.contiguous() if t.name.endswith(".T") else x
        if name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
            x = x / self.scale.reshape(-1, *[1] * (x.dim() - 1))
        return x

    def materialise(self, prefix: str, module: nn.Module) -> None:
        """Give `module` (named `prefix` in the decoder) its weights from the bundle."""
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(self.read(f"text.{prefix}.{name}"))

    def hidden(self, sequences: list[np.ndarray]) -> list[torch.Tensor]:
        """Each sequence of embeddings (T, H) -> the final norm's output (T, H), float32."""
        xs = [torch.from_numpy(np.asarray(s, np.float32))[None] for s in sequences]
        positions = [torch.arange(x.shape[1]) for x in xs]
        angles = [(self.text.cos[pos], self.text.sin[pos]) for pos in positions]
        with torch.no_grad():
            for i, layer in enumerate(self.text.layers):
                self.materialise(f"layers.{i}", layer)
                for k, (x, pos, (cos, sin)) in enumerate(zip(xs, positions, angles)):
                    xs[k] = layer(x, cos, sin, Whole(), pos, None)
                layer.to("meta")  # its weights dropped before the next layer's are read
            self.materialise("norm", self.text.norm)
            return [cast(torch.Tensor, self.text.norm(x)[0]) for x in xs]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head's logits (T, vocab) of hidden states h (T, H), float32; the head cast
        HEAD_ROWS vocabulary entries at a time (whole in float32 it would be 3 GB at 14B)."""
        if self.arch.tied:
            head = self.table  # (vocab, H): the head is the token embedding table
        else:
            head = mapped(self.bundle, self.inits["text.lm_head.weight.T"]).T
        return torch.cat([h @ torch.from_numpy(np.array(head[i:i + HEAD_ROWS], np.float32)).T
                          for i in range(0, head.shape[0], HEAD_ROWS)], -1)
