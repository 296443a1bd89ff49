"""`m4 info`: what a model is, from config and presets alone (no weights are loaded)."""

from pathlib import Path

from m4.bundle_format import is_bundle, manifest_arch, read_manifest
from m4.model.config import PRESETS, Arch
from m4.plan import DEFAULT_WINDOW, plan
from m4.resolve import DEMO_BUNDLE, DEMO_DIR, resolve

BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}


def describe(spec: str, window: int = DEFAULT_WINDOW) -> dict:
    """A preset name (except `demo`, which names the demo model) or any MODEL, with the plan:
    what exporting, calibrating and running it needs with `window` video frames."""
    arch, d = describe_model(spec)
    d["plan"] = plan(arch, window)
    return d


def describe_model(spec: str) -> tuple[Arch, dict]:
    if spec in PRESETS and spec != "demo":
        return PRESETS[spec], describe_arch(PRESETS[spec], source=f"preset {spec} (shapes only, no weights)")
    path = resolve(spec)
    if is_bundle(path):
        arch, d = describe_bundle(path)
        if path == DEMO_BUNDLE:
            d["source"] = f"demo model: the demo preset trained on M4-Synth, as its fp16 bundle ({path})"
        return arch, d
    arch = Arch.from_dir(path)
    source = f"checkpoint {path}"
    if path == DEMO_DIR:
        source = f"demo model: the demo preset trained on M4-Synth ({path})"
    d = describe_arch(arch, source)
    d["files_bytes"] = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return arch, d


def describe_bundle(path: Path) -> tuple[Arch, dict]:
    """The architecture from the manifest, and the bundle: format, dtypes, files, quantisation."""
    m = read_manifest(path)
    arch = manifest_arch(m)
    d = describe_arch(arch, f"bundle {path} (exported from {m['source']})")
    keys = ("format_version", "exporter", "template", "dtype", "dtypes", "quantisation", "calibration", "files")
    d["bundle"] = {k: m.get(k) for k in keys}
    d["files_bytes"] = sum(f["bytes"] for f in m["files"].values())
    return arch, d


def describe_arch(arch: Arch, source: str) -> dict:
    v, t = arch.vision, arch.text
    params = arch.params()
    total = sum(params.values())
    return {
        "source": source,
        "params": {**params, "total": total},
        "tokens_per_image": arch.tokens_per_image,
        "image_token_id": arch.image_token_id,
        "vision": {"kind": v.kind, "image_size": v.image_size, "patch_size": v.patch_size, "hidden": v.hidden,
                   "layers_run": arch.vision_layers_run, "layers": v.layers, "heads": v.heads, "mlp": v.mlp,
                   "feature_layer": list(arch.feature_layers), "strategy": arch.strategy},
        "decoder": {"kind": t.kind, "hidden": t.hidden, "layers": t.layers, "heads": t.heads, "kv_heads": t.kv_heads,
                    "head_dim": t.head_dim, "mlp": t.mlp, "vocab": t.vocab, "tied": t.tied,
                    "rope_theta": t.rope_theta, "rope_scaling": "llama3" if t.rope_llama3 else None},
        "weights_bytes": {k: int(total * b) for k, b in BYTES.items()},
        "kv_bytes_per_token_fp16": arch.kv_bytes_per_token(2),
    }


def memory_needs(arch: Arch, frames: int = 8, text_tokens: int = 512) -> dict[str, dict[str, int]]:
    """Bytes a model holds on the device with its decoder in fp16, int8 or int4, as the torch
    backend lays it out: the vision tower, projector and token embedding table stay fp16 (the
    table is read a row at a time); the decoder's linears, lm_head included (a tied one gets
    its own quantised copy), take the precision. Plus an fp16 KV cache for a live window of
    `frames` frames and `text_tokens` of text. The CUDA context and torch itself are extra.
    `decode_bytes`: the weights one decode step reads (every linear once, the table's one row
    counted as nothing), which over memory bandwidth bounds decode speed."""
    p, t = arch.params(), arch.text
    embed = t.vocab * t.hidden
    linears = p["decoder"] - (0 if t.tied else embed)  # tied: lm_head counted in place of the table
    kv = arch.kv_bytes_per_token(2) * (frames * arch.tokens_per_image + text_tokens)
    out = {}
    for name in ("fp16", "int8", "int4"):
        if name == "fp16":
            weights = 2 * sum(p.values())
        else:
            weights = int(2 * (p["vision"] + p["projector"] + embed) + BYTES[name] * linears)
        out[name] = {"weights": weights, "kv_cache": kv, "total": weights + kv,
                     "decode_bytes": int(BYTES[name] * linears)}
    return out
