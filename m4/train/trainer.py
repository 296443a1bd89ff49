"""`m4 train`: instruction-tune LLaVA on M4-Instruct or Mantis-Instruct data, in one process or
many (torchrun).

The model is transformers' LlavaForConditionalGeneration, so what comes out is a standard
checkpoint. The recipe is LLaVA-NeXT-Interleave's: start from a checkpoint (`--init`), freeze
the vision tower, train projector and decoder with AdamW under a linear warm-up and cosine
decay, and mix the interleaved and in-front image placements per sample.

The loss of a step is the mean over the answer tokens of all its micro-batches on all ranks,
so N ranks with batch b train exactly as one process with batch N x b (tests/test_train.py).

DIR (--out) gets `checkpoint-NNNNNNN/` every --save-every steps and at the end, each written
atomically: model and config (transformers layout), tokenizer and chat template, AdamW state
(torch.distributed.checkpoint, one shard per rank) and `trainer_state.json`. The newest one's
model files are also linked into DIR itself, so DIR is a checkpoint that m4 and transformers
load. A run started on a DIR that has checkpoints resumes from the last: weights, optimizer
state, step and data position. DIR/log.jsonl has one JSON object per logged step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from transformers.utils.logging import disable_progress_bar

from m4.atomic import atomic_directory
from m4.errors import M4Error
from m4.media import ImageProcessing
from m4.model.config import PRESETS, Arch
from m4.prompt import detect_template
from m4.records import BadRecord, Skipped, load_records, texts
from m4.report import human
from m4.tokenizer import TOKENIZER_CORPUS, Tokenizer, build_tokenizer
from m4.train import dist as D
from m4.train.data import IGNORE, Batches, Collate, InstructData, approx_length

# micro-batch, learning rate, max tokens per sample, gradient checkpointing
PRESET_DEFAULTS = {
    "tiny": (4, 3e-3, 2048, False),
    "demo": (8, 1e-3, 2048, False),
    "0.5b": (1, 1e-5, 8192, True),
    "7b": (1, 1e-5, 8192, True),
    "14b": (1, 1e-5, 8192, True),
    "mantis-8b": (1, 1e-5, 8192, True),  # Mantis's recipe: 8,192 tokens, lr 1e-5
    "mantis-8b-clip": (1, 1e-5, 8192, True),
}
FRESH = ("tiny", "demo")  # presets that can start from scratch with a tokenizer built from the data
PARTS = ("projector", "decoder", "vision")
# what a checkpoint's tokenizer and chat template are made of, copied from --init as they are
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
                   "preprocessor_config.json", "processor_config.json")


@dataclass
class TrainConfig:
    preset: str
    data: Path | None = None
    out: Path | None = None
    image_root: Path | None = None  # default: the data file's folder
    init: Path | None = None  # default: a fresh model of the preset (tiny, demo)
    steps: int | None = None  # default: one epoch
    batch_size: int | None = None  # per device and micro-batch; default from the preset
    grad_accum: int = 1
    lr: float | None = None  # default from the preset
    vision_lr: float | None = None  # default lr / 5 (LLaVA-OneVision's 2e-6 against 1e-5)
    warmup: float = 0.03  # share of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    tune: str = "projector,decoder"
    in_front_prob: float = 0.5
    frames: int = 8
    max_len: int | None = None
    precision: str = "auto"  # auto: bf16 on GPUs that have it, fp16 on older ones, fp32 on CPUs
    grad_ckpt: bool | None = None
    save_every: int = 500
    keep: int = 2
    log_every: int = 1
    workers: int | None = None  # data loader processes; default up to 8 on GPUs, 0 on CPUs
    seed: int = 0
    skip_bad: bool = False  # leave bad records out (counted) rather than stop at the first

    def resolved(self) -> TrainConfig:
        if self.preset not in PRESETS:
            raise M4Error(f"unknown preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        batch, lr, max_len, ckpt = PRESET_DEFAULTS[self.preset]
        c = TrainConfig(**vars(self))
        c.batch_size = c.batch_size or batch
        c.lr = c.lr or lr
        c.vision_lr = c.vision_lr or c.lr / 5
        c.max_len = c.max_len or max_len
        c.grad_ckpt = ckpt if c.grad_ckpt is None else c.grad_ckpt
        if min(c.batch_size, c.grad_accum, c.save_every, c.log_every, c.frames) < 1:
            raise M4Error("--batch-size, --grad-accum, --save-every, --log-every and --frames must be >= 1")
        if not 0 <= c.in_front_prob <= 1:
            raise M4Error(f"--in-front-prob must be in [0, 1], got {c.in_front_prob}")
        return c


# -- the model ------------------------------------------------------------------------------

def part_modules(llava) -> dict[str, list[nn.Module]]:
    m = llava.model
    return {"vision": [m.vision_tower], "projector": [m.multi_modal_projector],
            "decoder": [m.language_model, llava.lm_head]}


def set_trainable(llava, tune: str) -> None:
    parts = {p.strip() for p in tune.split(",") if p.strip()}
    if not parts or parts - set(PARTS):
        raise M4Error(f"--tune {tune!r}: name some of {', '.join(PARTS)}")
    llava.requires_grad_(False)
    for p in parts:
        for m in part_modules(llava)[p]:
            m.requires_grad_(True)


def fresh_model(arch: Arch):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration(LlavaConfig(**arch.to_hf()))


def build(preset: str, source: Path | None, records: list[dict], seed: int):
    """(llava, arch, tokenizer): read from `source` (--init or the checkpoint resumed), or a
    fresh model of a small preset whose tokenizer is built from the data's text."""
    from transformers import LlavaForConditionalGeneration

    if source is not None:
        arch = Arch.from_dir(source)
        want = PRESETS[preset]
        if (arch.text.hidden, arch.text.layers, arch.vision.hidden) != (want.text.hidden, want.text.layers,
                                                                        want.vision.hidden):
            raise M4Error(f"{source} is not a {preset} model (decoder {arch.text.hidden} x {arch.text.layers}, "
                          f"vision {arch.vision.hidden}): pass the --preset it was made with")
        return LlavaForConditionalGeneration.from_pretrained(source), arch, Tokenizer.from_dir(source)
    if preset not in FRESH:
        raise M4Error(f"the {preset} preset starts from a checkpoint: pass --init CKPT (its tokenizer comes from it)")
    base = PRESETS[preset]
    tokenizer = build_tokenizer(TOKENIZER_CORPUS + texts(records), base.text.vocab)
    arch = base.replace(image_token_id=tokenizer.token_id("<image>"))
    torch.manual_seed(seed)
    return fresh_model(arch), arch, tokenizer


class Objective(nn.Module):
    """LLaVA and its loss as one module, so that FSDP's root wraps the whole step. Returns
    the summed cross-entropy of the answer tokens."""

    def __init__(self, llava, image_size: int):
        super().__init__()
        self.llava, self.image_size = llava, image_size

    def forward(self, input_ids, attention_mask, labels, pixel_values=None):
        core, extra = self.llava.model, 0.0
        if pixel_values is None:
            # a text-only batch still runs the vision tower on a blank image, for nothing:
            # under FSDP every rank must gather the same units in the same order
            blank = torch.zeros(1, 3, self.image_size, self.image_size, device=input_ids.device)
            extra = 0.0 * sum(f.sum() for f in core.get_image_features(pixel_values=blank).pooler_output)
        h = core(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                 use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        # logits of the answer tokens only: over the whole sequence (mostly image tokens)
        # they would be the largest tensor of the step
        logits = self.llava.lm_head(h[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum") + extra


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    cuda = device.type == "cuda"
    if precision == "auto":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise M4Error(f"--precision {precision!r}: use auto, fp32, bf16 or fp16")
    if precision == "fp16" and not cuda:
        raise M4Error("fp16 training needs a GPU: use fp32 or bf16 on the CPU")
    return dtypes[precision]


def lr_scale(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over `warmup` of the steps, then cosine decay to zero."""
    w = math.ceil(warmup * total)
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


# -- checkpoints ----------------------------------------------------------------------------

def last_checkpoint(out: Path) -> Path | None:
    done = sorted(Path(out).glob("checkpoint-*/trainer_state.json"))
    return done[-1].parent if done else None


def save_tokenizer(tokenizer: Tokenizer, source: Path | None, dest: Path) -> None:
    files = [source / f for f in TOKENIZER_FILES if (source / f).is_file()] if source else []
    for f in files:
        shutil.copy2(f, dest / f.name)
    if not files:
        tokenizer.save(dest)


def save(model, llava, opt, tokenizer, source, out: Path, step: int, d: D.Dist, keep: int, tied: bool) -> Path:
    path = out / f"checkpoint-{step:07d}"
    state = {k.removeprefix("llava."): v for k, v in D.full_state(model, d).items()}
    if tied:  # gathered, the tied lm_head is a copy of the embeddings; the checkpoint holds one
        state.pop("lm_head.weight", None)
    with atomic_directory(path) if d.main else nullcontext() as tmp:
        tmp = Path(d.broadcast(str(tmp) if d.main else None))
        D.save_optimizer(model, opt, tmp / "optimizer", d)
        if d.main:
            llava.save_pretrained(tmp, state_dict=state)
            save_tokenizer(tokenizer, source, tmp)
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        d.barrier()  # every rank's optimizer shard is written before the directory goes live
    if d.main:
        publish(path, out)
        for old in sorted(out.glob("checkpoint-*"))[:-max(1, keep)]:
            shutil.rmtree(old)
    d.barrier()
    return path


def publish(ckpt: Path, out: Path) -> None:
    """Make the checkpoint's model files DIR's own: hard links, each swapped in atomically,
    config.json last so that a reader never sees a config without its weights."""
    for f in sorted((f for f in ckpt.iterdir() if f.is_file() and f.name != "trainer_state.json"),
                    key=lambda f: f.name == "config.json"):
        tmp = out / f".{f.name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(f, tmp)
        except OSError:  # a file system without hard links
            shutil.copy2(f, tmp)
        os.replace(tmp, out / f.name)


# -- the loop -------------------------------------------------------------------------------

def train(cfg: TrainConfig, d: D.Dist | None = None) -> Objective:
    """Train as `cfg` says; returns the (possibly sharded) model. Without `d`, joins the
    process group torchrun set up and leaves it at the end."""
    own = d is None
    d = d or D.setup()
    try:
        return run(cfg.resolved(), d)
    finally:
        if own:
            D.close(d)


def run(cfg: TrainConfig, d: D.Dist) -> Objective:
    if cfg.data is None or cfg.out is None:
        raise M4Error("m4 train needs --data JSON and --out DIR")
    assert cfg.batch_size is not None  # resolved()
    console = Console(stderr=True, quiet=not d.main, soft_wrap=True, markup=False, highlight=False)
    disable_progress_bar()  # transformers' loading and saving bars would break into ours
    out, data = Path(cfg.out), Path(cfg.data)
    root = Path(cfg.image_root or data.parent)
    skipped = Skipped()
    try:
        records = load_records(data, root, skipped if cfg.skip_bad else None)
    except BadRecord as e:
        raise M4Error(f"{e} (m4 data check {data} lists them all; --skip-bad trains past such records)") from None
    if skipped.total:
        console.print(f"{data}: {skipped.summary()}")
    if not records:
        raise M4Error(f"no trainable records in {data}")
    system = sum("system" in r for r in records)
    if system:
        console.print(f"{data}: the leading system message of {system} records left out (trained under the "
                      "model's own system prompt)")
    resume = last_checkpoint(out)
    source = resume or (Path(cfg.init) if cfg.init else None)
    llava, arch, tokenizer = build(cfg.preset, source, records, cfg.seed)
    dtype = compute_dtype(cfg.precision, d.device)
    if d.device.type == "cpu":
        # The backward pass of a trained model makes subnormal floats, which x86 cores handle
        # in microcode: from a trained demo checkpoint, fp32 steps ran 2.4x slower without this
        torch.set_flush_denormal(True)
    model, opt = prepare(llava, arch, cfg, d, dtype)
    step = 0
    if resume:
        D.load_optimizer(model, opt, resume / "optimizer", d)
        step = json.loads((resume / "trainer_state.json").read_text())["step"]
        console.print(f"resuming from {resume} at step {step}")
    per_step = cfg.batch_size * cfg.grad_accum * d.world
    total = cfg.steps or math.ceil(len(records) / per_step)
    # the images as the checkpoint's processor makes them (a fresh model: its tower's own)
    processing = ImageProcessing.from_dir(source, arch.vision.image_size, arch.vision.kind) if source else \
        ImageProcessing.for_tower(arch.vision.kind, arch.vision.image_size)
    batches = iter(loader(records, root, tokenizer, arch, processing, cfg, d, start=step * cfg.grad_accum))
    params = {id(p): p for p in llava.parameters()}.values()
    console.print(f"m4 train: {cfg.preset}, {len(records)} records, {d.world} process(es) on {d.device.type}, "
                  f"{step}/{total} steps of {per_step} samples, {human(sum(p.numel() for p in params))} "
                  f"parameters ({human(sum(p.numel() for p in params if p.requires_grad))} trainable: "
                  f"{cfg.tune}), {dtype}")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "a") if d.main else None
    progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeRemainingColumn(), console=console, disable=not d.main)
    step_fn = Stepper(model, opt, cfg, d, dtype)
    with progress:
        task = progress.add_task("train", total=total, completed=step, info="")
        while step < total:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            for b in micro:
                for kind, reason in b.pop("skipped"):
                    skipped.add(kind, reason)
            loss, norm, tokens = step_fn(micro, lr_scale(step, total, cfg.warmup))
            step += 1
            seconds, lr = time.perf_counter() - t0, opt.param_groups[0]["lr"]
            if log and (step % cfg.log_every == 0 or step == total):
                log.write(json.dumps({"step": step, "loss": round(loss, 6), "lr": lr,
                                      "tokens_per_s": round(tokens / seconds, 1), "grad_norm": round(norm, 4),
                                      "skipped": skipped.total, "step_s": round(seconds, 4)}) + "\n")
                log.flush()
            progress.update(task, completed=step, info=f"loss {loss:.4f}  lr {lr:.2e}  {tokens / seconds:,.0f} tok/s")
            if step % cfg.save_every == 0 or step == total:
                save(model, llava, opt, tokenizer, source, out, step, d, cfg.keep, arch.text.tied)
    if log:
        log.close()
    if skipped.total:
        console.print(skipped.summary())
    console.print(f"saved {out}")
    return model


def prepare(llava, arch: Arch, cfg: TrainConfig, d: D.Dist, dtype: torch.dtype):
    """The parts to train, gradient checkpointing, FSDP or one device, and AdamW with the
    vision tower in its own group (its own learning rate)."""
    set_trainable(llava, cfg.tune)
    if cfg.grad_ckpt:
        llava.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = Objective(llava, arch.vision.image_size)
    if d.world > 1:
        D.shard(model, llava, d, dtype)
    else:
        model.float().to(d.device)
    vision = {id(p) for p in llava.model.vision_tower.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in vision], "lr": cfg.lr},
              {"params": [p for p in trainable if id(p) in vision], "lr": cfg.vision_lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return model, opt


def loader(records, root: Path, tokenizer: Tokenizer, arch: Arch, processing: ImageProcessing, cfg: TrainConfig,
           d: D.Dist, start: int):
    assert cfg.batch_size is not None and cfg.max_len is not None and arch.image_token_id is not None  # resolved
    dataset = InstructData(records, root, tokenizer, detect_template(tokenizer), arch.image_token_id,
                           processing, cfg.frames, cfg.in_front_prob, cfg.max_len,
                           arch.tokens_per_image, cfg.seed)
    lengths = [approx_length(r, arch.tokens_per_image, cfg.frames) for r in records]
    workers = cfg.workers if cfg.workers is not None else (min(8, os.cpu_count() or 1) if d.device.type == "cuda" else 0)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=Batches(len(records), cfg.batch_size, d.rank, d.world, cfg.seed, start, lengths),
        collate_fn=Collate(arch.image_token_id, arch.tokens_per_image, tokenizer.token_id("<|endoftext|>") or 0),
        num_workers=workers, persistent_workers=workers > 0, pin_memory=d.device.type == "cuda")


class Stepper:
    """One optimizer step over a list of micro-batches: (loss, gradient norm, tokens)."""

    def __init__(self, model, opt, cfg: TrainConfig, d: D.Dist, dtype: torch.dtype):
        self.model, self.opt, self.cfg, self.d = model, opt, cfg, d
        self.params = [p for g in opt.param_groups for p in g["params"]]
        # FSDP casts through its mixed-precision policy; one device through autocast
        self.autocast = torch.autocast(d.device.type, dtype=dtype, enabled=d.world == 1 and dtype != torch.float32)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
        model.train()

    def __call__(self, micro: list[dict], lr_scale: float) -> tuple[float, float, float]:
        d = self.d
        count = max(1.0, d.sum(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)))
        tokens = d.sum(sum(int(b["attention_mask"].sum()) for b in micro))
        loss = 0.0
        for b in micro:
            b = {k: v.to(d.device, non_blocking=True) if v is not None else None for k, v in b.items()}
            with self.autocast:
                s = self.model(**b)
            # FSDP averages gradients over ranks: times world, the step's gradient is that of
            # the mean over its answer tokens on all ranks
            self.scaler.scale(s * d.world / count).backward()
            loss += float(s.detach())
        self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * lr_scale
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return d.sum(loss) / count, grad_norm, tokens


# -- the dry run ----------------------------------------------------------------------------

def dry_run(preset: str, gpus: int, tune: str, batch: int | None, max_len: int | None,
            grad_ckpt: bool | None, gpu_memory_gb: float = 40.0) -> dict:
    """The preset built on the meta device (no memory): parameters, trainable parameters,
    an estimate of the memory per GPU under FSDP, whether it fits GPUs of `gpu_memory_gb`
    and, where it does not, the fewest such GPUs it fits (None: no count of them does, as
    what each GPU holds whole, gathered layers and activations, is already too much)."""
    c = TrainConfig(preset, batch_size=batch, max_len=max_len, grad_ckpt=grad_ckpt, tune=tune).resolved()
    assert c.batch_size is not None and c.max_len is not None and c.grad_ckpt is not None  # resolved()
    if gpus < 1:
        raise M4Error(f"--gpus must be >= 1, got {gpus}")
    arch = PRESETS[preset]
    arch = arch.replace(image_token_id=arch.image_token_id or arch.text.vocab - 1)
    with torch.device("meta"):
        llava = fresh_model(arch)
    set_trainable(llava, tune)
    params, trainable, memory = D.memory_plan(llava, gpus, c.batch_size, c.max_len, c.grad_ckpt)
    limit = gpu_memory_gb * 1e9
    needed = next((g for g in range(gpus, 4097)
                   if D.memory_plan(llava, g, c.batch_size, c.max_len, c.grad_ckpt)[2]["total"] <= limit), None)
    return {"preset": preset, "gpus": gpus, "params": params, "trainable": trainable, "tune": tune,
            "memory_per_gpu_bytes": memory, "gpu_memory_bytes": limit, "fits": memory["total"] <= limit,
            "gpus_needed": needed, "batch_size": c.batch_size, "max_len": c.max_len, "grad_ckpt": c.grad_ckpt}


def print_plan(plan: dict) -> None:
    from rich.table import Table

    t = Table("", "", title=f"m4 train --preset {plan['preset']} on {plan['gpus']} GPUs (FSDP)", show_header=False)
    t.add_row("parameters", f"{plan['params']:,} ({human(plan['params'])})")
    t.add_row(f"trainable ({plan['tune']})", f"{plan['trainable']:,} ({human(plan['trainable'])})")
    t.add_section()
    for k, v in plan["memory_per_gpu_bytes"].items():
        t.add_row(f"memory per GPU: {k}", f"{v / 2**30:.2f} GiB")
    t.add_section()
    limit = f"{plan['gpu_memory_bytes'] / 1e9:g} GB GPUs"
    if plan["fits"]:
        verdict = f"fits {plan['gpus']} x {limit}"
    elif plan["gpus_needed"]:
        verdict = f"does not fit {plan['gpus']} x {limit}: it takes {plan['gpus_needed']} of them"
    else:
        verdict = (f"does not fit {limit} at any count: lower --max-len ({plan['max_len']}) or --batch-size "
                   f"({plan['batch_size']})" + ("" if plan["grad_ckpt"] else ", or add --grad-ckpt"))
    t.add_row("plan", verdict)
    Console().print(t)
