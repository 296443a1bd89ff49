"""Sharded safetensors checkpoints written a tensor at a time.

safetensors' `save_file` takes every tensor of a file at once and copies each into bytes, so
a 5 GB shard costs 10 GB of memory. Here the shapes and dtypes, known before any value is,
make each file's header first; then every tensor's bytes are written as they are made, piece
by piece, so memory holds one piece of one tensor whatever the checkpoint's size. The files
are safetensors' format (an 8-byte little-endian header length, the JSON header, the data)
and the index beside several of them is the one transformers writes and reads.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: Iterable[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Tensors in order, a new shard where the next would pass `shard_bytes` (a tensor larger
    than that is a shard of its own), as transformers' save_pretrained splits."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def header(specs: list[TensorSpec]) -> bytes:
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        meta[s.name] = {"dtype": SAFETENSORS_DTYPES[s.dtype], "shape": list(s.shape),
                        "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def write_shards(path: Path, specs: list[TensorSpec], pieces: Callable[[TensorSpec], Iterator[torch.Tensor]],
                 shard_bytes: int, progress: Callable[[int], None] = lambda n: None) -> list[str]:
    """Write `specs` into `path` as model.safetensors, or as numbered shards with their index
    where they pass `shard_bytes`. `pieces(spec)` yields the tensor's values in row order, in
    any float dtype (each piece is cast to the spec's); `progress(n)` hears of each n bytes
    written. Returns the files written."""
    shards = plan_shards(specs, shard_bytes)
    names = shard_names(len(shards))
    for name, shard in zip(names, shards):
        with open(path / name, "wb") as f:
            f.write(header(shard))
            for s in shard:
                written = 0
                for piece in pieces(s):
                    data = piece.to(s.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
                    f.write(data.data)
                    written += data.nbytes
                    progress(data.nbytes)
                if written != s.nbytes:
                    raise RuntimeError(f"{s.name}: {written} bytes made, its shape takes {s.nbytes}")
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: name for name, shard in zip(names, shards) for s in shard}}
        (path / INDEX).write_text(json.dumps(index, indent=2))
    return names + ([INDEX] if len(shards) > 1 else [])
