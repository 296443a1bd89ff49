"""Rotary position embeddings: the one table of angles, in numpy.

The torch decoder, decoder_ort.onnx's rotary caches and the bundle runtimes' key shifting
all read this table, so it is computed once, here, without torch (bundle runtimes have
none). Values follow transformers: inverse frequencies and angles in float32.
"""

import numpy as np

from m4.model.config import TextArch


def inverse_frequencies(a: TextArch) -> np.ndarray:
    """theta^(-2i/D) for i < D/2, float32, with Llama 3.1's scaling where the config has it."""
    exponents = np.arange(0, a.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(a.head_dim)
    inv = (np.float32(1.0) / np.float32(a.rope_theta) ** exponents).astype(np.float32)
    return inv if a.rope_llama3 is None else llama3_scaled(inv, *a.rope_llama3)


def llama3_scaled(inv: np.ndarray, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """Llama 3.1: long wavelengths (beyond original / low) slowed by `factor`, short ones
    (below original / high) kept, and those between blended smoothly."""
    f32 = np.float32
    wavelen = f32(2 * np.pi) / inv
    scaled = np.where(wavelen > f32(original / low), inv / f32(factor), inv)
    smooth = (f32(original) / wavelen - f32(low)) / f32(high - low)
    blended = (1 - smooth) * scaled / f32(factor) + smooth * scaled
    medium = (wavelen >= f32(original / high)) & (wavelen <= f32(original / low))
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_table(a: TextArch, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, (len(positions), head_dim) float32, for `positions` (default: every
    position the model has). Each angle is repeated over both halves of a head, the layout
    `rotate` pairs."""
    positions = np.arange(a.max_positions) if positions is None else np.asarray(positions)
    angles = np.outer(positions.astype(np.float32), inverse_frequencies(a)).astype(np.float32)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x (..., D) rotated by the angles whose cos and sin are given: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    out: np.ndarray = x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin
    return out
