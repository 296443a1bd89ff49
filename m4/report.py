"""Terminal rendering (rich tables) of what the tools compute."""

from rich.console import Console
from rich.table import Table

NAMES = {"siglip": "SigLIP", "clip": "CLIP", "qwen2": "Qwen2", "llama": "Llama"}


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
    shape.add_row("vision", f"{NAMES[v['kind']]} {v['image_size']}px/{v['patch_size']}, hidden {v['hidden']}, "
                  f"{v['layers_run']} of {v['layers']} layers run, {v['heads']} heads, mlp {v['mlp']}, "
                  f"feature layer {v['feature_layer']}, strategy {v['strategy']}")
    shape.add_row("decoder", f"{NAMES[t['kind']]} hidden {t['hidden']}, {t['layers']} layers, {t['heads']} heads / "
                  f"{t['kv_heads']} kv heads of {t['head_dim']}, mlp {t['mlp']}, vocab {t['vocab']}, "
                  f"{'tied' if t['tied'] else 'untied'} embeddings, rope θ {t['rope_theta']:g}"
                  + (f", {t['rope_scaling']} scaling" if t["rope_scaling"] else ""))
    shape.add_row("image token id", str(d["image_token_id"]))
    shape.add_row("weights", ", ".join(f"{k} {human(b, 'B')}" for k, b in d["weights_bytes"].items()))
    shape.add_row("KV cache", f"{human(d['kv_bytes_per_token_fp16'], 'B')} per token (fp16)")
    if "files_bytes" in d:
        shape.add_row("files", human(d["files_bytes"], "B"))
    console.print(shape)
    if "bundle" in d:
        print_bundle(d["bundle"], console)
    print_plan(d["plan"], console)


def print_plan(p: dict, console: Console) -> None:
    """Each step's peak memory and the bytes it writes, against the memory available."""
    have = p["available"]
    title = (f"plan: peak memory with a window of {p['window']} frames ({p['kv_tokens']:,} cached tokens); "
             + (f"{human(have, 'B')} available" if have is not None else "available memory unknown"))
    table = Table("step", "precision", "memory", "weights", "KV cache", "writes", "fits", title=title)
    for s in p["steps"]:
        cells = [human(s[k], "B") if k in s else "-" for k in ("memory", "weights", "kv_cache", "disk")]
        fits = "-" if have is None else ("yes" if s["memory"] <= have else "[red]no[/red]")
        table.add_row(s["step"], s["precision"], *cells, fits)
    console.print(table)


def print_bundle(b: dict, console: Console) -> None:
    files = Table("file", "bytes", "sha256", title=f"bundle v{b['format_version']}, {b['dtype']}, "
                  f"template {b['template']}, quantisation "
                  + (", ".join(f"{g} {q['scheme']}" for g, q in b["quantisation"].items()) if b["quantisation"] else "none"))
    for name, f in b["files"].items():
        files.add_row(name, human(f["bytes"], "B"), f["sha256"][:16])
    console.print(files)
    console.print("dtypes: " + ", ".join(f"{k} {v}" for k, v in b["dtypes"].items()))


def short(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def print_bench(result: dict) -> None:
    """One row per backend and workload: stage p50/p95 in ms, rates, peak memory."""
    console = Console()
    m = result["machine"]
    console.print(f"[bold]{m['cpu']}[/bold], {m['cores']} cores" + (f", {m['gpu']}" if "gpu" in m else ""))
    stages = ["ingest_ms", "prefill_ms", "ttft_ms"]  # the rest are in --json
    table = Table("workload", "backend", *[s.removesuffix("_ms") + " ms" for s in stages], "tok/s",
                  "prefill tok/s", "frames/s", "peak memory", title="p50/p95 of each stage; decode tok/s; peak memory")
    for r in result["records"]:
        cells = [f"{short(r['stages'][s]['p50'])}/{short(r['stages'][s]['p95'])}" if s in r["stages"] else "-"
                 for s in stages]
        workload = r["workload"] + (f" {r['context']}" if "context" in r else "")
        table.add_row(workload, f"{r['backend']} {r['dtype']}", *cells, short(r["decode_tok_s"]),
                      short(r["prefill_tok_s"]) if "prefill_tok_s" in r else "-",
                      short(r["frames_per_s"]) if "frames_per_s" in r else "-",
                      human(r["peak_rss_bytes"], "B") + (f", GPU {human(r['peak_gpu_bytes'], 'B')}"
                                                         if r.get("peak_gpu_bytes") else ""))
    console.print(table)
    for backend, why in result["skipped"].items():
        console.print(f"skipped {backend}: {why}")


def plot_bench(result: dict, path: str) -> None:
    """A PNG: per workload, each backend's stage medians side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in result["records"]))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        rows = [r for r in result["records"] if r["workload"] == w]
        labels = [r["backend"] + (f"\n{r['context']} tok" if "context" in r else "") for r in rows]
        stages = list(dict.fromkeys(k for r in rows for k in r["stages"] if k.endswith("_ms")))
        values = {s: [r["stages"].get(s, {}).get("p50", 0) for r in rows] for s in stages}
        values["decode ms/token"] = [1e3 / r["decode_tok_s"] if r["decode_tok_s"] else 0 for r in rows]
        width = 0.8 / len(values)
        for i, (s, v) in enumerate(values.items()):
            ax.bar([x + i * width for x in range(len(rows))], v, width, label=s.removesuffix("_ms"))
        ax.set_xticks([x + width * (len(values) - 1) / 2 for x in range(len(rows))], labels)
        ax.set_yscale("log")
        ax.set_title(w)
        ax.set_ylabel("ms (p50, log scale)")
        ax.legend(fontsize=7)
    fig.suptitle(f"m4 bench on {result['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
