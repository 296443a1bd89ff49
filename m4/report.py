"""Terminal rendering (rich tables) of what the tools compute."""

from rich.console import Console
from rich.table import Table


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:g} {unit}".strip()


def print_info(d: dict) -> None:
    console = Console()
    console.print(f"[bold]{d['source']}[/bold]")
    params = Table("part", "parameters", title="parameters")
    for part, n in d["params"].items():
        params.add_row(part, f"{n:,} ({human(n)})")
    console.print(params)
    v, t = d["vision"], d["decoder"]
    shape = Table("", "", title="architecture", show_header=False)
    shape.add_row("tokens per image", str(d["tokens_per_image"]))
    shape.add_row("vision", f"SigLIP {v['image_size']}px/{v['patch_size']}, hidden {v['hidden']}, "
                  f"{v['layers_run']} of {v['layers']} layers run, {v['heads']} heads, mlp {v['mlp']}, "
                  f"feature layer {v['feature_layer']}, strategy {v['strategy']}")
    shape.add_row("decoder", f"Qwen2 hidden {t['hidden']}, {t['layers']} layers, {t['heads']} heads / "
                  f"{t['kv_heads']} kv heads of {t['head_dim']}, mlp {t['mlp']}, vocab {t['vocab']}, "
                  f"{'tied' if t['tied'] else 'untied'} embeddings, rope θ {t['rope_theta']:g}")
    shape.add_row("image token id", str(d["image_token_id"]))
    shape.add_row("weights", ", ".join(f"{k} {human(b, 'B')}" for k, b in d["weights_bytes"].items()))
    shape.add_row("KV cache", f"{human(d['kv_bytes_per_token_fp16'], 'B')} per token (fp16)")
    if "files_bytes" in d:
        shape.add_row("files", human(d["files_bytes"], "B"))
    console.print(shape)
