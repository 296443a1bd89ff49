"""Documentation the code cannot drift from: docs/architecture.md's table of the graphs'
inputs and outputs against the graphs an export writes, and its table of the code's layers
against pyproject.toml's import contract."""

import re
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest

from m4.bundle_format import DTYPES, manifest_arch, read_manifest

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
GRAPHS = ("vision.onnx", "decoder.onnx", "decoder_ort.onnx")


def table(heading: str) -> list[list[str]]:
    """The rows (cells, stripped) of the first table whose header row starts with `heading`."""
    lines = ARCHITECTURE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {heading} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def documented(graph: str, layers: int) -> dict[str, list[tuple[str, list[str], str]]]:
    """The table's rows of `graph`, by direction: (name, shape, element type); a run of `.i`
    rows is expanded per layer in the graphs' order (each layer's rows, then the next's)."""
    out: dict[str, list] = {"input": [], "output": []}
    run: list = []  # the `.i` rows met since the last other row
    for g, direction, name, shape, kind in table("graph") + [[graph, "", "", "", ""]]:  # the last ends a run
        if g != graph:
            continue
        name = name.strip("`")
        if run and (not name.endswith(".i") or direction != run[0][0]):
            out[run[0][0]] += [(n.replace(".i", f".{i}"), s, t) for i in range(layers) for _, n, s, t in run]
            run = []
        row = (name, [d.strip() for d in shape.strip("()").split(",") if d.strip()], kind)
        if name.endswith(".i"):
            run.append((direction, *row))
        elif name:
            out[direction].append(row)
    return out


def dims(v: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


@pytest.mark.parametrize("graph", GRAPHS)
def test_graph_io_table_matches_the_export(bundles, graph):
    """Names, order, shapes (symbolic dimensions by name, the rest the architecture's numbers)
    and element types of every input and output."""
    bundle = bundles["gqa-tied-last-full"]
    m = read_manifest(bundle)
    a = manifest_arch(m)
    numbers = {"S": a.vision.image_size, "N": a.tokens_per_image, "H": a.text.hidden, "kv": a.text.kv_heads,
               "D": a.text.head_dim, "L": a.text.layers, "V": a.text.vocab}
    kinds = {"float": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(DTYPES[m["dtype"]])),
             "int64": onnx.TensorProto.INT64}
    g = onnx.load(str(bundle / graph), load_external_data=False).graph
    doc = documented(graph, a.text.layers)
    for direction, values in (("input", g.input), ("output", g.output)):
        assert [v.name for v in values] == [n for n, _, _ in doc[direction]], f"{graph} {direction}s"
        for v, (name, shape, kind) in zip(values, doc[direction]):
            want = [numbers.get(d, int(d) if d.isdigit() else d) for d in shape]
            assert dims(v) == want, f"{graph} {name}: the graph's shape {dims(v)}, the table's {shape}"
            assert v.type.tensor_type.elem_type == kinds[kind], f"{graph} {name}: element type"


def test_layers_table_is_the_import_contract():
    """Each row's modules, in order, are a layer of pyproject.toml's `layers` contract;
    `|` (modules independent of each other) where the contract has it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["type"] == "layers")
    want = [(sorted(re.findall(r"[\w]+", layer)), "|" in layer) for layer in contract["layers"]]
    got = [(sorted(re.findall(r"`m4/([\w]+)(?:\.py|/)`", modules)), "\\|" in modules)
           for _, modules, _ in table("layer")]
    assert got == want
