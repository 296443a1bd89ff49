"""The `m4` command. Thin: parses arguments and calls the modules that do the work."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from m4.errors import M4Error
from m4.serve.settings import Settings as S  # m4 serve's defaults (no [serve] imports)

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Run LLaVA-NeXT-Interleave vision-language models on the edge.")

# Options that take several values (`--images a.png b.png`), which click cannot spell.
MULTI_VALUE = ("--images", "--views", "--video")


def spread_multi_values(argv: list[str]) -> list[str]:
    """`--images a b --prompt q` -> `--images a --images b --prompt q`."""
    out, current = [], None
    for arg in argv:
        if arg.startswith("-"):
            current = arg if arg in MULTI_VALUE else None
            out.append(arg)
        elif current and out[-1] != current:
            out += [current, arg]
        else:
            out.append(arg)
    return out


@app.command()
def run(
    model: str = typer.Option("demo", "--model", "-m", help="demo, a checkpoint or bundle directory, or a hub id"),
    images: Optional[list[str]] = typer.Option(None, "--images", help="images, interleaved at <image> or in front"),
    views: Optional[list[str]] = typer.Option(None, "--views", help="views of one 3D scene"),
    video: Optional[list[str]] = typer.Option(None, "--video", help="camN, a file, an rtsp/http URL, or demo; "
                                              "several run side by side, each answer labelled with its source"),
    patches: bool = typer.Option(False, "--patches", help="anyres: feed each image as a base view and tiles"),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="a question (repeatable)"),
    every: Optional[float] = typer.Option(None, "--every", help="ask every S seconds of video (streams)"),
    window: int = typer.Option(8, "--window", help="video frames in the context (sliding)"),
    fps: float = typer.Option(2.0, "--fps", help="frames per second taken from a stream"),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", help="stop a stream after N frames"),
    duration: Optional[float] = typer.Option(None, "--duration", help="stop a stream after S seconds"),
    approximate: bool = typer.Option(False, "--approximate", help="evict frames by shifting the cache (faster, inexact)"),
    stats: bool = typer.Option(False, "--stats", help="print frames seen/dropped and stage p50/p95 at the end"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    choices: Optional[str] = typer.Option(None, "--choices", help="answers are one of these, comma-separated: yes,no"),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="answers are JSON valid under this schema file"),
    regex: Optional[str] = typer.Option(None, "--regex", help="answers match this regular expression whole"),
    watch: Optional[list[str]] = typer.Option(None, "--watch", help="a standing question about the video (repeatable): "
                                              "told when its answer changes"),
    watch_every: int = typer.Option(1, "--watch-every", help="ask the watches after every N-th frame"),
    backend: str = typer.Option("auto", "--backend", help="auto, torch, onnx or trt (bundles built with m4 build)"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto (bundles: also tensorrt)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per event"),
):
    """Answer questions about images, views, a video file, a camera or a stream.

    With --watch, each question is asked after every --watch-every frames of the video and
    its answer told the first time and whenever it changes. --choices, --json-schema and
    --regex constrain every answer (the prompts' and the watches')."""
    from m4.api import load
    from m4 import run as r
    from m4.media import is_live
    from m4.runtime.sampling import Sampling

    if watch and not video:
        raise M4Error("--watch asks about a video: give it one with --video")
    if watch_every < 1:
        raise M4Error(f"--watch-every is a number of frames, at least 1: got {watch_every}")
    sampling = Sampling(temperature, top_p, seed).constrained(r.read_schema(json_schema), r.split_choices(choices),
                                                              regex)
    r.check_sources(video or [])
    m = load(model, backend=backend, device=device, window=window * max(1, len(video or [])))
    r.check_constraint(m, sampling)
    generation = dict(max_new_tokens=max_new_tokens, sampling=sampling)
    prompts = prompt or []
    if not video:
        r.run_still(m, prompts, {"images": images or None, "views": views or None, "patches": patches},
                    r.SourceOutput(as_json), generation)
    elif any(map(is_live, video)) or every or max_frames or duration or watch:
        r.run_stream(m, video, r.StreamConfig(prompts=prompts, window=window, fps=fps, every=every,
                                              max_frames=max_frames, duration=duration, exact=not approximate,
                                              as_json=as_json, generation=generation, stats=stats,
                                              watches=watch or [], watch_every=watch_every))
    else:
        r.run_clips(m, video, prompts, window, as_json, generation)


@app.command()
def export(model: str = typer.Argument(..., help="demo, a checkpoint directory or a hub id"),
           out: Path = typer.Argument(..., help="the bundle directory to write"),
           dtype: str = typer.Option("fp32", "--dtype",
                                     help="fp32, fp16, or int8 / int4: the decoder weight-only quantised as written")):
    """Export a checkpoint to an ONNX bundle (vision.onnx, decoder.onnx, embeddings, tokenizer)."""
    from m4.plan import check_model

    check_model(model, "export", dtype)
    try:
        from m4.export.bundle import export_bundle
    except ImportError as e:
        raise M4Error(f"m4 export needs {e.name}: pip install 'm4-vlm[export]'") from None
    m = export_bundle(model, out, dtype)
    print(f"{out}: {len(m['files'])} files, {sum(f['bytes'] for f in m['files'].values()) / 1e6:.1f} MB")



@app.command()
def calibrate(bundle: Path = typer.Argument(..., help="a float bundle (m4 export)"),
              out: Path = typer.Argument(..., help="the quantised bundle to write"),
              data: str = typer.Option(..., "--data", help="a folder of images/videos, an M4-Instruct or "
                                       "Mantis-Instruct JSON (bad records skipped, with a warning), or demo"),
              vision: str = typer.Option("int8", "--vision", help="int8 or none"),
              decoder: str = typer.Option("int8", "--decoder", help="int8, int4 (weight-only), w8a8 or none"),
              method: str = typer.Option("minmax", "--method", help="activation ranges: minmax, entropy, percentile"),
              samples: int = typer.Option(32, "--samples", help="calibration prompts (a fifth more are held out)"),
              bench: Optional[Path] = typer.Option(None, "--bench", help="also score both bundles on this bench (m4 eval)"),
              bench_limit: Optional[int] = typer.Option(None, "--bench-limit", help="its first N samples")):
    """Quantise a bundle on calibration data; report.json compares it with the float bundle."""
    from m4.plan import CALIBRATED, check_model

    check_model(str(bundle), "calibrate", CALIBRATED.get(decoder, ""))
    try:
        from m4.calib.bundle import calibrate as run_calibration
    except ImportError as e:
        raise M4Error(f"m4 calibrate needs {e.name}: pip install 'm4-vlm[export]'") from None
    run_calibration(bundle, out, data, vision, decoder, method, samples, bench=bench, bench_limit=bench_limit)


@app.command("build")
def build_cmd(bundle: Path = typer.Argument(..., help="a bundle (float, or calibrated with --decoder w8a8|none)"),
              fp16: bool = typer.Option(False, "--fp16", help="float tensors in fp16 (Q/DQ stay as they are)"),
              workspace: float = typer.Option(4.0, "--workspace", help="builder workspace, GB"),
              max_images: int = typer.Option(16, "--max-images", help="images per vision call, at most"),
              max_context: int = typer.Option(4096, "--max-context", help="decoder context, tokens")):
    """Build TensorRT engines (engines/*.plan) from a bundle, on the GPU that will run them."""
    from m4.export.engines import build

    r = build(bundle, fp16, workspace, max_images, max_context)
    print(f"{bundle}/engines: TensorRT {r['tensorrt']} on {r['gpu']}")

@app.command("verify")
def verify_cmd(bundle: Path = typer.Argument(..., help="a bundle directory (m4 export, calibrate or build)")):
    """Check each file of a bundle against the size and sha256 its m4.json records.

    Loading a bundle checks the hashes too; M4_VERIFY=0 skips that, for fast restarts."""
    from m4.bundle_format import MANIFEST, check_files, is_bundle, load_manifest

    if not bundle.is_dir() or not is_bundle(bundle):
        raise M4Error(f"{bundle} is not a bundle directory (make one with m4 export)")
    results = check_files(bundle, load_manifest(bundle))
    for name, what in results.items():
        print(f"OK        {name}" if what is None else f"MISMATCH  {name}: {what}")
    bad = [name for name, what in results.items() if what]
    if bad:
        raise M4Error(f"{len(bad)} of {len(results)} files of {bundle} do not match its {MANIFEST}: {', '.join(bad)}")


@app.command()
def info(model: str = typer.Argument(..., help="a preset (tiny, 0.5b, 7b, 14b, mantis-8b), demo, a checkpoint or a bundle"),
         window: int = typer.Option(8, "--window", help="video frames in the context the plan runs with"),
         as_json: bool = typer.Option(False, "--json")):
    """Architecture, parameters per part, tokens per image; the plan: memory and disk to
    export, calibrate and run it at each precision, against the memory available."""
    from m4.info import describe

    d = describe(model, window)
    if as_json:
        print(json.dumps(d, indent=2))
    else:
        from m4.report import print_info

        print_info(d)


@app.command("train")
def train_cmd(
    preset: str = typer.Option(..., "--preset", help="tiny, demo, 0.5b, 7b or 14b"),
    data: Optional[Path] = typer.Option(None, "--data", help="M4-Instruct / LLaVA or Mantis-Instruct JSON"),
    out: Optional[Path] = typer.Option(None, "--out", help="checkpoint directory (resumed when it has checkpoints)"),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="default: the JSON's folder"),
    init: Optional[Path] = typer.Option(None, "--init", help="checkpoint to start from (default: a fresh tiny/demo model)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="default: one epoch"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="per device and micro-batch"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    vision_lr: Optional[float] = typer.Option(None, "--vision-lr", help="default: lr / 5"),
    warmup: float = typer.Option(0.03, "--warmup", help="share of the steps"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    tune: str = typer.Option("projector,decoder", "--tune", help="parts trained: projector,decoder[,vision]"),
    in_front_prob: float = typer.Option(0.5, "--in-front-prob", help="share of samples with all images in front"),
    frames: int = typer.Option(8, "--frames", help="frames sampled from each video"),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="longer samples are skipped"),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16"),
    grad_ckpt: Optional[bool] = typer.Option(None, "--grad-ckpt/--no-grad-ckpt", help="gradient checkpointing"),
    save_every: int = typer.Option(500, "--save-every"),
    keep: int = typer.Option(2, "--keep", help="checkpoints kept"),
    log_every: int = typer.Option(1, "--log-every"),
    workers: Optional[int] = typer.Option(None, "--workers", help="data loader processes"),
    seed: int = typer.Option(0, "--seed"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="leave bad records out (counted), not stop at the first"),
    dry_run: bool = typer.Option(False, "--dry-run", help="build on the meta device; print parameters and memory"),
    gpus: int = typer.Option(8, "--gpus", help="GPUs the dry run plans for"),
    gpu_memory: float = typer.Option(40.0, "--gpu-memory", help="GB per GPU the dry run checks against"),
):
    """Instruction-tune a LLaVA checkpoint on M4-Instruct or Mantis-Instruct data (under torchrun: FSDP)."""
    from m4.train.trainer import TrainConfig, dry_run as plan, print_plan, train

    if dry_run:
        print_plan(plan(preset, gpus, tune, batch_size, max_len, grad_ckpt, gpu_memory))
        return
    train(TrainConfig(preset, data, out, image_root, init, steps, batch_size, grad_accum, lr, vision_lr, warmup,
                      weight_decay, tune=tune, in_front_prob=in_front_prob, frames=frames, max_len=max_len,
                      precision=precision, grad_ckpt=grad_ckpt, save_every=save_every, keep=keep,
                      log_every=log_every, workers=workers, seed=seed, skip_bad=skip_bad))


checkpoint_app = typer.Typer(no_args_is_help=True, help="Checkpoints: seeded random ones of a preset's shapes.")
app.add_typer(checkpoint_app, name="checkpoint")


@checkpoint_app.command("random")
def checkpoint_random(preset: str = typer.Argument(..., help="tiny, demo, 0.5b, 7b, 14b, mantis-8b or mantis-8b-clip"),
                      out: Path = typer.Argument(..., help="the checkpoint directory to write (replaced)"),
                      dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16"),
                      std: float = typer.Option(0.02, "--std", help="of the normal weights (transformers: 0.02)"),
                      seed: int = typer.Option(0, "--seed"),
                      shard_gb: float = typer.Option(5.0, "--shard-gb", help="largest shard, GB")):
    """Write a random transformers checkpoint of a preset's shapes, a tensor at a time."""
    from rich.progress import DownloadColumn, Progress, TimeElapsedColumn

    from m4.model.checkpoint import random_checkpoint

    with Progress(*Progress.get_default_columns(), DownloadColumn(), TimeElapsedColumn(), transient=True) as progress:
        task = progress.add_task(f"{preset} ({dtype})", total=None)
        random_checkpoint(preset, out, seed, std, dtype, int(shard_gb * 1e9),
                          lambda done, total: progress.update(task, completed=done, total=total))
    print(f"{out}: {sum(f.stat().st_size for f in out.glob('*.safetensors')) / 1e9:.2f} GB of weights")


data_app = typer.Typer(no_args_is_help=True, help="Data sets: M4-Synth; checking training JSON.")
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(out: Path = typer.Argument(..., help="output folder (replaced)"),
               n: int = typer.Option(2000, "--n", help="training samples (each also gives a caption record)"),
               bench: int = typer.Option(200, "--bench", help="bench samples"),
               seed: int = typer.Option(0, "--seed"),
               size: Optional[int] = typer.Option(None, "--size", help="the model's image size in pixels; default: the demo preset's"),
               workers: Optional[int] = typer.Option(None, "--workers", help="processes; default: all cores")):
    """Generate M4-Synth: train.json, captions.json, scenes.json, bench.json and media/."""
    from m4.train.synth import synth

    counts = synth(out, n, bench, seed, size, workers)
    print(f"{out}: " + ", ".join(f"{k}.json {v} records" for k, v in counts.items()))


@data_app.command("check")
def data_check(data: Path = typer.Argument(..., help="an M4-Instruct / LLaVA or Mantis-Instruct JSON"),
               image_root: Optional[Path] = typer.Option(None, "--image-root", help="default: the JSON's folder")):
    """Check a training JSON as m4 train reads it; exit 1 if any record is bad.

    Prints the records per layout, the good ones' images and turns, the bad ones by kind."""
    from m4.records import check

    c = check(data, image_root)
    print("\n".join(c.lines()))
    if c.bad.total:
        raise typer.Exit(1)


@app.command("eval")
def eval_cmd(model: str = typer.Option("demo", "--model", "-m", help="demo, a checkpoint or bundle directory, or a hub id"),
             bench: Path = typer.Option(..., "--bench", help="LLaVA-Interleave Bench or Mantis-Eval JSON"),
             json_out: Optional[Path] = typer.Option(None, "--json", help="write the scores here"),
             image_root: Optional[Path] = typer.Option(None, "--image-root", help="default: the bench's folder"),
             limit: Optional[int] = typer.Option(None, "--limit", help="first N samples"),
             max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
             backend: str = typer.Option("auto", "--backend"),
             device: str = typer.Option("cpu", "--device")):
    """Accuracy per task and per scenario on a bench."""
    from rich.progress import Progress

    from m4.eval import evaluate, print_scores

    with Progress(transient=True) as progress:
        task = progress.add_task("eval", total=None)
        scores = evaluate(model, bench, image_root, limit, max_new_tokens, backend, device,
                          on_sample=lambda i, n: progress.update(task, completed=i, total=n))
    if json_out:
        json_out.write_text(json.dumps(scores, indent=2))
    print_scores(scores)


@app.command()
def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="a checkpoint (default: demo); a bundle for onnx,trt"),
    preset: Optional[str] = typer.Option(None, "--preset", help="measure a preset's architecture"),
    random_weights: bool = typer.Option(False, "--random-weights", help="with --preset: random weights, no download"),
    backends: str = typer.Option("torch,hf", "--backends", help="any of torch,onnx,trt,hf"),
    workload: str = typer.Option("all", "--workload", help="stream, images, decode or all"),
    frames: int = typer.Option(16, "--frames"),
    window: int = typer.Option(8, "--window"),
    every: int = typer.Option(4, "--every", help="stream workload: a question every N frames"),
    images: int = typer.Option(4, "--images"),
    new_tokens: int = typer.Option(32, "--new-tokens"),
    contexts: str = typer.Option("256,1024", "--contexts", help="decode workload: context lengths"),
    repeats: int = typer.Option(5, "--repeats"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    json_out: Optional[Path] = typer.Option(None, "--json"),
    csv_out: Optional[Path] = typer.Option(None, "--csv"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="a PNG of the stage breakdown"),
):
    """Latency stage by stage, backends side by side, the transformers baseline in the same run."""
    from m4 import bench as b
    from m4.report import plot_bench, print_bench

    names = backends.split(",")
    c = b.BenchConfig(model=b.prepare_model(model, preset, random_weights, tuple(names)), backends=names,
                      workloads=list(b.WORKLOADS) if workload == "all" else workload.split(","),
                      frames=frames, window=window, every=every, images=images, new_tokens=new_tokens,
                      contexts=[int(x) for x in contexts.split(",")], repeats=repeats, device=device)
    from rich.console import Console

    with Console(stderr=True).status("benchmarking") as status:
        result = b.bench(c, lambda s: status.update(f"benchmarking: {s}"))
    print_bench(result)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
    if csv_out:
        import csv

        rows = [b.flat(r) for r in result["records"]]
        with open(csv_out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            w.writeheader()
            w.writerows(rows)
    if plot:
        plot_bench(result, str(plot))


@app.command()
def serve(
    model: str = typer.Option(S.model, "--model", "-m", help="demo, a checkpoint or bundle directory, or a hub id"),
    host: str = typer.Option(S.host, "--host", help="beyond loopback only with --api-key (or --insecure)"),
    port: int = typer.Option(S.port, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="M4_API_KEY",
                                          help="required as 'Authorization: Bearer KEY' on every route but the page"),
    insecure: bool = typer.Option(False, "--insecure", help="listen beyond loopback without a key"),
    max_sessions: int = typer.Option(S.max_sessions, "--max-sessions", help="live sessions open at once (each holds a cache)"),
    session_ttl: float = typer.Option(S.session_ttl, "--session-ttl", help="seconds before an idle session is closed"),
    max_fps: float = typer.Option(S.max_fps, "--max-fps", help="frames per second one session may take"),
    max_body_mb: float = typer.Option(S.max_body_mb, "--max-body-mb", help="largest request body"),
    max_pixels: int = typer.Option(S.max_pixels, "--max-pixels", help="largest image (width x height)"),
    max_images: int = typer.Option(S.max_images, "--max-images", help="images in one chat request"),
    max_tokens: int = typer.Option(S.max_tokens, "--max-tokens", help="answer length where a request gives none"),
    max_queue: int = typer.Option(S.max_queue, "--max-queue", help="requests waiting for the model before 429"),
    video_frames: int = typer.Option(S.video_frames, "--video-frames", help="frames sampled from a video_url"),
    allow_urls: bool = typer.Option(False, "--allow-urls", help="fetch http(s) image/video URLs and open stream URLs"),
    allow_private_urls: bool = typer.Option(False, "--allow-private-urls",
                                            help="with --allow-urls: loopback and private addresses too"),
    backend: str = typer.Option(S.backend, "--backend", help="auto, torch, onnx or trt"),
    device: str = typer.Option(S.device, "--device", help="cpu, cuda or auto"),
    image_cache_mb: float = typer.Option(S.image_cache_mb, "--image-cache-mb", min=0,
                                         help="image embeddings kept: an image seen before is not encoded again"),
    prefix_cache_mb: float = typer.Option(S.prefix_cache_mb, "--prefix-cache-mb", min=0,
                                          help="prompts' keys and values kept: a shared prefix is not prefilled again"),
    no_cache: bool = typer.Option(False, "--no-cache", help="both caches off"),
):
    """Serve the model over HTTP: OpenAI-compatible chat, live sessions, a web page at /, /metrics."""
    from m4.serve.settings import check_bind

    settings = S(model=model, backend=backend, device=device, host=host, port=port, api_key=api_key,
                 insecure=insecure, max_sessions=max_sessions, session_ttl=session_ttl, max_fps=max_fps,
                 max_body_mb=max_body_mb, max_pixels=max_pixels, max_images=max_images, max_tokens=max_tokens,
                 max_queue=max_queue, video_frames=video_frames, allow_urls=allow_urls,
                 allow_private_urls=allow_private_urls, image_cache_mb=image_cache_mb,
                 prefix_cache_mb=prefix_cache_mb, no_cache=no_cache)
    check_bind(host, api_key, insecure)  # before the model loads: a refusal is immediate
    try:
        from m4.serve.app import serve as run_server
    except ImportError as e:
        raise M4Error(f"m4 serve needs {e.name}: pip install 'm4-vlm[serve]'") from None
    print(f"m4: serving {model} on http://{host}:{port} (web page at /, OpenAI API at /v1)", file=sys.stderr)
    run_server(settings)


def main() -> None:
    try:
        app(args=spread_multi_values(sys.argv[1:]), prog_name="m4")
    except M4Error as e:
        print(f"m4: error: {e}", file=sys.stderr)
        sys.exit(2)
