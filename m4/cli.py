"""The `m4` command. Thin: parses arguments and calls the modules that do the work."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from m4.errors import M4Error

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Run LLaVA-NeXT-Interleave vision-language models on the edge.")

# Options that take several values (`--images a.png b.png`), which click cannot spell.
MULTI_VALUE = ("--images", "--views")


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


def questions(prompts: list[str]):
    """The --prompt questions; without any, lines typed on the terminal or piped in."""
    if prompts:
        yield from prompts
        return
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


@app.command()
def run(
    model: str = typer.Option("demo", "--model", "-m", help="demo, a checkpoint or bundle directory, or a hub id"),
    images: Optional[list[str]] = typer.Option(None, "--images", help="images, interleaved at <image> or in front"),
    views: Optional[list[str]] = typer.Option(None, "--views", help="views of one 3D scene"),
    video: Optional[str] = typer.Option(None, "--video", help="camN, a file, an rtsp/http URL, or demo"),
    patches: bool = typer.Option(False, "--patches", help="anyres: feed each image as a base view and tiles"),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="a question (repeatable)"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    max_frames: int = typer.Option(8, "--max-frames", help="video frames in the context"),
    fps: float = typer.Option(2.0, "--fps", help="sampling rate of live video"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    backend: str = typer.Option("auto", "--backend"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per event"),
):
    """Answer questions about images, views, a video file, a camera or a stream."""
    from m4.api import load
    from m4.run import answer_all, collect_video

    m = load(model, backend=backend, device=device)
    inputs = {"images": images or None, "views": views or None, "patches": patches}
    if video:
        inputs["video"] = collect_video(video, max_frames, fps, emit_json=as_json)
    answer_all(m, questions(prompt or []), inputs, as_json,
               dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed))


@app.command()
def info(model: str = typer.Argument(..., help="a preset (tiny, 0.5b, 7b, 14b), demo, a checkpoint or a bundle"),
         as_json: bool = typer.Option(False, "--json")):
    """Architecture, parameters per part, tokens per image, memory at each precision."""
    from m4.info import describe

    d = describe(model)
    if as_json:
        print(json.dumps(d, indent=2))
    else:
        from m4.report import print_info

        print_info(d)


def main() -> None:
    try:
        app(args=spread_multi_values(sys.argv[1:]), prog_name="m4")
    except M4Error as e:
        print(f"m4: error: {e}", file=sys.stderr)
        sys.exit(2)
