"""The Python API: `m4.load(...)` -> Model with `ask`, `prompt` and `tokens`.

Flow: images -> preprocess -> backend.encode_images -> prompt parts (text runs and image
slots) -> one prefill over a fresh context -> decode -> text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from m4.bundle_format import is_bundle, manifest_arch, read_manifest, verify as verify_bundle, verifying
from m4.constraint import Constraint
from m4.errors import M4Error
from m4.media import ImageProcessing, load_image, preprocess, sample_uniform, tile
from m4.model.config import Arch
from m4.plan import DEFAULT_WINDOW, TORCH_PRECISIONS, bundle_precision, check_fits
from m4.prompt import IMAGE, TEMPLATES, Prompt, Template, build, detect_template, expand_placeholders
from m4.resolve import DEMO_BUNDLE, resolve
from m4.runtime.answer import Answer, Batch, guide_for
from m4.runtime.backend import Backend, embed_parts
from m4.runtime.bundle_backend import BundleBackend
from m4.runtime.context import Context
from m4.runtime.live import LiveContext
from m4.runtime.reuse import Reuse
from m4.runtime.sampling import Sampling
from m4.tokenizer import Tokenizer

VIDEO_FRAMES = 8  # frames taken from a video file passed by path


def load(model: str = "demo", backend: str = "auto", device: str = "cpu", dtype: str | None = None,
         template: str | None = None, threads: int | None = None, verify: bool | None = None,
         window: int = DEFAULT_WINDOW, cache_mb: float = 0, reserve_mb: float = 0) -> Model:
    """Load `demo`, a checkpoint directory, a bundle directory or a hub id. A bundle runs its
    TensorRT engines where `m4 build` made them for this machine (backend auto or trt; they
    run on the GPU whatever `device` says), else ONNX Runtime (`device`; `threads`: its
    intra-op threads, default all cores); a checkpoint runs on torch.

    A bundle's files are checked against the sha256 its m4.json records before it loads
    (an M4Error names a file that changed). `verify=False`, or M4_VERIFY=0 in the
    environment (which every m4 command honours), skips the hashing for fast restarts of a
    bundle already verified; sizes are checked either way.

    `demo` is the shipped checkpoint under backend torch, the bundle exported from it (shipped
    beside it) under onnx or trt, and under auto the checkpoint where torch is installed, else
    the bundle.

    On the CPU, a model whose weights and the cache of a `window` of video frames cannot fit
    in the memory available (m4.plan) is an M4Error before any weight is read.

    `cache_mb` (0: off) bounds the caches through which `ask` reuses earlier work
    (m4.runtime.reuse): a third for image embeddings, the rest for prompts' keys and values.
    `reserve_mb`: memory the caller keeps beside the model (the server's caches); the fit
    check counts it, with cache_mb."""
    if model == "demo" and backend == "trt":
        raise M4Error(f"the demo bundle ships without TensorRT engines, which are built on the device that runs "
                      f"them: copy it (cp -r {DEMO_BUNDLE} DIR), build them (m4 build DIR), then run DIR")
    path = resolve(str(model), bundle={"torch": False, "onnx": True}.get(backend))
    held = int((cache_mb + reserve_mb) * 2**20)
    if verify is None:
        verify = verifying()
    if is_bundle(path):
        if device == "cpu" and backend != "trt":
            m = read_manifest(path)
            check_fits(manifest_arch(m), "run", bundle_precision(m), window, str(model), held)
        if verify:
            verify_bundle(path)
        return bundle_model(path, bundle_backend(str(model), path, backend, device, threads), template, cache_mb)
    if backend in ("onnx", "trt"):
        then = ", then m4 build OUT" if backend == "trt" else ""
        raise M4Error(f"{model} is a checkpoint: export it first (m4 export {model} OUT{then}), then run OUT")
    if backend not in ("auto", "torch"):
        raise M4Error(f"unknown backend {backend!r}: use auto, torch, onnx or trt")
    arch = Arch.from_dir(path)
    if device == "cpu":
        check_fits(arch, "torch", TORCH_PRECISIONS.get(dtype, "fp32"), window, str(model), held)
    tokenizer = Tokenizer.from_dir(path)
    try:
        from m4.runtime.torch_backend import TorchBackend
    except ImportError as e:
        raise M4Error(f"{model} is a checkpoint, which needs {e.name}: pip install 'm4-vlm[torch]', "
                      "or run an exported bundle") from None

    return Model(TorchBackend(path, arch, device, dtype), tokenizer, arch,
                 TEMPLATES[template] if template else detect_template(tokenizer), path, Reuse.split(cache_mb))


def bundle_backend(model: str, path: Path, backend: str, device: str, threads: int | None) -> BundleBackend:
    """TensorRT where asked, or under auto where the bundle's engines run here; else ONNX Runtime."""
    if backend not in ("auto", "onnx", "trt"):
        raise M4Error(f"{model} is an ONNX bundle: use backend auto, onnx or trt")
    if backend != "onnx":
        from m4.runtime import trt_backend

        if backend == "trt" or trt_backend.unavailable(path) is None:
            return trt_backend.TrtBackend(path)  # says why not in one line
    try:
        from m4.runtime.onnx_backend import OnnxBackend
    except ImportError as e:
        raise M4Error(f"{model} is an ONNX bundle, which needs {e.name}: pip install 'm4-vlm[onnx]'") from None
    return OnnxBackend(path, device, threads)


def bundle_model(path: Path, b: BundleBackend, template: str | None = None, cache_mb: float = 0) -> Model:
    return Model(b, Tokenizer.from_dir(path), b.arch, TEMPLATES[template or b.manifest["template"]], path,
                 Reuse.split(cache_mb))


def as_images(x) -> list:
    """A list of images (paths, PIL, arrays) or a video file path -> a list."""
    if isinstance(x, (str, Path)):
        return [f.image for f in sample_uniform(str(x), VIDEO_FRAMES)]
    return list(x)


class Model:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, arch: Arch, template: Template, path: Path,
                 reuse: Reuse | None = None):
        self.backend, self.tokenizer, self.arch, self.template, self.path = backend, tokenizer, arch, template, path
        self.reuse = reuse or Reuse()  # the caches its answers and streams use (off: 0 bytes)
        self.stop_ids = template.stop_ids(tokenizer)
        self.processing = ImageProcessing.from_dir(path, arch.vision.image_size, arch.vision.kind)
        self.stats: dict[str, float] = {}

    def prompt(self, text: str, images: Sequence | None = None, video=None, views: Sequence | None = None,
               patches: bool = False) -> Prompt:
        """Exactly what the decoder will see: `.text` and `.ids`."""
        return self.prepare(text, images, video, views, patches)[0]

    def prepare(self, text: str, images: Sequence | None = None, video=None, views: Sequence | None = None,
                patches: bool = False) -> tuple[Prompt, list]:
        """The prompt and its pictures (decoded, and tiled with `patches`), not yet encoded:
        `embed(*model.prepare(...))` is the decoder's input."""
        given = [x for x in (images, video, views) if x is not None and len(x)]
        if len(given) > 1:
            raise M4Error("pass images, video or views, not several at once")
        if (video is not None or views is not None) and IMAGE in text:
            raise M4Error("video frames and views go in front of the question: remove its <image> placeholders")
        pictures = [load_image(x) for x in (as_images(given[0]) if given else [])]
        if patches:  # anyres: each image becomes its base view and tiles, fed as images
            tiles = [tile(p, self.arch.vision.image_size) for p in pictures]
            text = expand_placeholders(text, [len(t) for t in tiles])
            pictures = [t for ts in tiles for t in ts]
        assert self.arch.image_token_id is not None  # a loaded model's config names it
        p = build(self.template, self.tokenizer, self.arch.image_token_id, self.arch.tokens_per_image,
                  text, len(pictures))
        return p, pictures

    def encode(self, pictures: list):
        """Images -> each one's (tokens_per_image, H) embeddings in the backend's arrays,
        through the encoder cache where it is on."""
        return self.reuse.encode(self.backend, preprocess(pictures, self.processing))

    def embed(self, p: Prompt, pictures: list):
        return embed_parts(self.backend, p.parts, self.encode(pictures) if pictures else None)

    def stream(self, window: int = 8, exact: bool = True, max_new_tokens: int = 128, reuse: Reuse | None = None):
        """A live video context over this model (several may share it); its frames go through
        the encoder cache of `reuse` (default: the model's)."""
        return LiveContext(self.backend, self.tokenizer, self.template, window, exact, max_new_tokens,
                           self.processing, reuse or self.reuse)

    def tokens(self, text: str, images: Sequence | None = None, video=None, views: Sequence | None = None,
               patches: bool = False, max_new_tokens: int = 128, sampling: Sampling = Sampling()) -> Iterator[int]:
        """The answer's token ids, yielded as they are decoded; timings land in `stats`. The
        answer ends where the model's positions do, if max_new_tokens would pass them."""
        p, pictures = self.prepare(text, images, video, views, patches)
        yield from self.generate(p, pictures, max_new_tokens, sampling)

    def generate(self, p: Prompt, pictures: list, max_new_tokens: int = 128,
                 sampling: Sampling = Sampling()) -> Iterator[int]:
        """The answer's token ids to a prompt built elsewhere (m4.prompt.build_chat: several
        turns) over its decoded pictures, as `tokens` answers its own."""
        self.stats.clear()  # in place: callers may hold this dict
        yield from self.start(p, pictures, max_new_tokens, sampling, self.stats).alone()

    def start(self, p: Prompt, pictures: list, max_new_tokens: int = 128, sampling: Sampling = Sampling(),
              stats: dict | None = None, reuse: Reuse | None = None) -> Answer:
        """The prompt encoded and prefilled in a context of its own, its first token chosen:
        an Answer to decode alone or in a Batch with others (m4.runtime.answer). Through the
        caches of `reuse` (default: the model's), the longest prefix they hold is loaded and
        only the rest encoded and prefilled (`cached_tokens` says how many were loaded). Its
        timings land in `stats` (default: a dict of its own, `answer.stats`)."""
        max_new_tokens = self.room(len(p.ids), max_new_tokens)
        guide = guide_for(sampling, self.tokenizer, self.backend, self.stop_ids)
        reuse = reuse or self.reuse
        t0 = time.perf_counter()
        ctx = Context(self.backend, len(p.ids) + max_new_tokens)
        embeds, pending = reuse.resume(ctx, p.parts, preprocess(pictures, self.processing) if pictures else None)
        cached = ctx.length
        t1 = time.perf_counter()
        logits = ctx.append("prompt", embeds)
        t2 = time.perf_counter()
        stats = {} if stats is None else stats
        stats.update(images=len(pictures), vision_ms=(t1 - t0) * 1e3, prefill_tokens=len(p.ids) - cached,
                     prefill_ms=(t2 - t1) * 1e3, cached_tokens=cached)
        answer = Answer(ctx, logits, max_new_tokens, self.stop_ids, sampling, stats, t0, guide=guide)
        reuse.keep(ctx, pending)  # after the first token is chosen, before it is given: the copy is in its ttft
        return answer

    def room(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """max_new_tokens, cut to the positions the prompt leaves: it is a bound, and a long
        prompt with the default one still answers. A prompt that leaves none is an error."""
        limit = self.arch.text.max_positions
        if prompt_tokens >= limit:
            raise M4Error(f"the prompt is {prompt_tokens} tokens and this model's context holds {limit} positions, "
                          "answer included: shorten the text or pass fewer images")
        return min(max_new_tokens, limit - prompt_tokens)

    def ask(self, text: str, images: Sequence | None = None, video=None, views: Sequence | None = None,
            patches: bool = False, max_new_tokens: int = 128, sampling: Sampling = Sampling(),
            stream: bool = False, schema=None, choices: list[str] | None = None, regex: str | None = None):
        """The answer as a string, or with stream=True an iterator of text pieces. At most one
        constraint: `schema` (a JSON schema dict or a pydantic model: the answer is JSON that
        validates), `choices` (exactly one of them) or `regex` (matched whole). Where
        max_new_tokens runs out first, the answer is its valid beginning."""
        ids = self.tokens(text, images, video, views, patches, max_new_tokens,
                          sampling.constrained(schema, choices, regex))
        pieces = self.tokenizer.detokenize(ids)
        return pieces if stream else "".join(pieces)


def ask_together(asked: Sequence[tuple[LiveContext, str] | tuple[LiveContext, str, Constraint | None]],
                 max_new_tokens: int | None = None, sampling: Sampling = Sampling()) -> list[str]:
    """Questions to several live contexts (several cameras), answered together: one batched
    decode step carries the next token of every answer, so N answers read the weights once a
    token, not N times. A question may carry its own constraint (a third item, an
    m4.Constraint). Each answer is the one its context gives alone; each context's `stats`
    get its own timings. For tokens as they come, drive an m4.runtime.answer.Batch over
    `live.start(...)` answers as this does."""
    batch, answers = Batch(), []
    try:
        for live, q, *c in asked:
            s = replace(sampling, constraint=c[0]) if c and c[0] is not None else sampling
            answers.append(batch.join(live.start(q, max_new_tokens, s)))
        tokens: dict[int, list[int]] = {id(a): [] for a in answers}
        while len(batch):
            for a, token in batch.step():
                tokens[id(a)].append(token)
    finally:
        for a in list(batch.answers):  # an error mid-way: every question rolled back
            batch.leave(a)
    return ["".join(live.tokenizer.detokenize(tokens[id(a)])) for (live, *_), a in zip(asked, answers)]
