"""Time to first token of a question over an 8-frame window: m4's live context against
transformers `generate` on the same prompt, the way its users call it today (the processor
and every frame again for every question). Side by side in one run; prints the ratio.

    python benchmarks/stream.py [--model demo] [--window 8] [--repeats 10] [--json out.json]
"""

import argparse
import json

import torch
import transformers

import m4
from m4.bench import p, timed
from m4.machine import machine
from m4.media import DemoScene

QUESTION = "What is moving in the scene?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()

    model = m4.load(args.model, backend="torch")
    a = model.arch
    scene = DemoScene(seed=0)
    frames = [scene.frame(i) for i in range(0, scene.num_frames, scene.num_frames // args.window)][:args.window]

    live = model.stream(window=args.window)
    ingest = []
    for f in frames * 2:  # the second pass evicts: every ingest after it refills the window
        live.add_frame(f)
        ingest.append(live.stats["ingest_ms"])
    m4_ttft = timed(lambda: live.ask(QUESTION, max_new_tokens=1), args.repeats)
    cold = timed(lambda: model.ask(QUESTION, video=frames, max_new_tokens=1), args.repeats)

    hf = transformers.LlavaForConditionalGeneration.from_pretrained(model.path).eval()
    processor = transformers.LlavaProcessor(
        image_processor=transformers.SiglipImageProcessorPil(size={"height": a.vision.image_size, "width": a.vision.image_size}),
        tokenizer=transformers.AutoTokenizer.from_pretrained(model.path), patch_size=a.vision.patch_size,
        vision_feature_select_strategy=a.strategy, num_additional_image_tokens=0, image_token="<image>")
    text = model.prompt(QUESTION, video=frames).text

    @torch.inference_mode()
    def hf_first_token():
        inputs = processor(text=text, images=frames, return_tensors="pt")
        hf.generate(**inputs, max_new_tokens=1, do_sample=False)

    hf_ttft = timed(hf_first_token, args.repeats)
    rows = {
        "m4 live context (frames already in the window)": m4_ttft,
        "m4 model.ask, cold (all frames encoded)": cold,
        "transformers generate (processor + all frames)": hf_ttft,
    }
    ratio = p(hf_ttft, 50) / p(m4_ttft, 50)
    print(f"ttft of a question over {args.window} frames, {args.model} ({sum(a.params().values()) / 1e6:.1f} M params), "
          f"{len(model.prompt(QUESTION, video=frames).ids)} prompt tokens, {args.repeats} repeats")
    for name, ms in rows.items():
        print(f"  {name:50s} p50 {p(ms, 50):8.2f} ms   p95 {p(ms, 95):8.2f} ms")
    print(f"  m4 per-frame ingest into a full window           p50 {p(ingest[args.window:], 50):8.2f} ms")
    print(f"transformers / m4 live ttft: {ratio:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "window": args.window, "model": args.model,
                       "ttft_ms": {k: {"p50": p(v, 50), "p95": p(v, 95)} for k, v in rows.items()},
                       "ingest_ms_p50": p(ingest[args.window:], 50), "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
