"""`m4 build`: TensorRT engines from a bundle's ONNX graphs, built on the device that runs them.

Networks are strongly typed (TensorRT 10's flag; TensorRT 11 has no other kind): every
tensor's type comes from the graph, INT8 from the explicit Q/DQ that `m4 calibrate` writes,
so no calibrator is involved. `--fp16` converts the graphs' float tensors to fp16 first
(onnxruntime's converter; inputs, outputs and Q/DQ scales stay fp32). Optimisation
profiles: the vision engine takes 1..max_images images; the decoder has a prefill profile
(1..PREFILL_CHUNK tokens, as the runtime chunks prefills) and a decode profile (one token),
both over a cache of 1..max_context positions. Engines go to `engines/*.plan` and m4.json
records them with the TensorRT version and the GPU they were built for (an engine runs only
on that GPU model and TensorRT version).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from m4.atomic import atomic_directory
from m4.bundle_format import MANIFEST, PREFILL_CHUNK, file_record, manifest_arch, past_names, read_manifest
from m4.errors import M4Error
from m4.machine import TENSORRT_INSTALL, gpu_name

NEEDS = f"m4 build needs TensorRT's Python API (tensorrt >= 10.3) and a CUDA GPU: {TENSORRT_INSTALL}"


def profiles(m: dict, max_images: int, max_context: int) -> dict[str, list[dict]]:
    """Per graph, its optimisation profiles: input name -> (min, opt, max) shapes. The
    engines run one context a step (batch 1)."""
    a = manifest_arch(m)
    t, s = a.text, a.vision.image_size
    vision = {"pixel_values": ((1, 3, s, s), (max(1, max_images // 2), 3, s, s), (max_images, 3, s, s))}

    def decoder(tokens: tuple[int, int, int], keep: tuple[int, int, int]) -> dict:
        shapes = {"inputs_embeds": tuple((1, n, t.hidden) for n in tokens), "logits_index": tuple((k,) for k in keep),
                  "past_len": ((1,),) * 3}
        cache = (1, max_context // 2, max_context)
        for name in past_names(t.layers):
            shapes[name] = tuple((1, t.kv_heads, t.head_dim, c) if "key" in name else (1, t.kv_heads, c, t.head_dim)
                                 for c in cache)
        return shapes

    chunk = min(PREFILL_CHUNK, max_context)
    return {"vision.onnx": [vision],
            "decoder.onnx": [decoder((1, chunk // 2, chunk), (1, 1, chunk)), decoder((1, 1, 1), (1, 1, 1))]}


def half_graph(src: Path, dst: Path) -> None:
    """src with float tensors in fp16: inputs, outputs and Q/DQ stay fp32."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True,
                                     op_block_list=DEFAULT_OP_BLOCK_LIST + ["QuantizeLinear", "DequantizeLinear"])
    # the weights beside it, in its own file: a converted graph past protobuf's 2 GB cannot be inline
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")


def build_engine(trt, logger, f: Path, shapes: list[dict], workspace: int, out: Path) -> None:
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(f)):
        first = parser.get_error(0).desc() if parser.num_errors else "no reason given"
        raise M4Error(f"TensorRT cannot parse {f.name}: {first}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    for p in shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise M4Error(f"TensorRT could not build an engine from {f.name} (its log above says why)")
    out.write_bytes(bytes(plan))


def check_graphs(m: dict) -> None:
    for name, q in (m.get("quantisation") or {}).items():
        if q["scheme"].endswith("weight-only"):
            raise M4Error(f"{name} is {q['scheme']} (ONNX Runtime's MatMulNBits, a CPU op TensorRT does not parse): "
                          "build from a bundle calibrated with --decoder w8a8 or none")


def build(bundle: str | Path, fp16: bool = False, workspace_gb: float = 4.0, max_images: int = 16,
          max_context: int = 4096) -> dict:
    """Build engines/*.plan into the bundle; the manifest's engine record."""
    path = Path(bundle)
    if not (path / MANIFEST).is_file():
        raise M4Error(f"{bundle} is not a bundle directory (make one with m4 export)")
    m = read_manifest(path)
    check_graphs(m)
    max_context = min(max_context, manifest_arch(m).text.max_positions)
    try:
        import tensorrt as trt
    except ImportError:
        raise M4Error(NEEDS + "; tensorrt is not installed here") from None
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        trt.Builder(logger)
    except Exception as e:  # no CUDA device or driver: the builder cannot be made
        raise M4Error(f"{NEEDS}; TensorRT {trt.__version__} found no usable GPU ({e})") from None
    shapes = profiles(m, max_images, max_context)
    with atomic_directory(path / "engines") as tmp, tempfile.TemporaryDirectory(dir=path) as half:
        for name, p in shapes.items():
            src = path / name
            if fp16:
                src = Path(half) / name
                half_graph(path / name, src)
            build_engine(trt, logger, src, p, int(workspace_gb * (1 << 30)), tmp / name.replace(".onnx", ".plan"))
    record = {"tensorrt": trt.__version__, "gpu": gpu_name(), "fp16": fp16, "max_images": max_images,
              "max_context": max_context, "profiles": {k: [{n: list(map(list, s)) for n, s in p.items()} for p in v]
                                                       for k, v in shapes.items()}}
    files = {k: v for k, v in m["files"].items() if not k.startswith("engines/")}
    files.update({f"engines/{f.name}": file_record(f) for f in sorted((path / "engines").iterdir())})
    tmp_manifest = path / f".{MANIFEST}.{os.getpid()}"
    tmp_manifest.write_text(json.dumps({**m, "engines": record, "files": files}, indent=2))
    os.replace(tmp_manifest, path / MANIFEST)
    return record
