"""One process or many: the process group, FSDP sharding, state dicts, and the memory plan.

Under `torchrun` (WORLD_SIZE > 1) every rank runs the same `m4 train`; the model is sharded
with FSDP2 (`fully_shard`): each decoder and vision layer is a unit, the rest (embeddings,
projector, norms, lm_head) is the root. Parameters, gradients and AdamW state live sharded in
fp32; a unit is gathered in bf16 for its forward and backward. NCCL on GPUs, gloo on CPUs
(the tests run two CPU ranks).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from m4.errors import M4Error


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, x: float) -> float:
        """Sum over ranks."""
        if self.world == 1:
            return float(x)
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def broadcast(self, obj):
        """rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup() -> Dist:
    """The process group torchrun asks for (or none for one process), and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(int(os.environ.get("RANK", "0")), world, device)


def close(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.barrier()  # no rank tears down gloo's connections while a peer still uses them
        dist.destroy_process_group()


def units(llava) -> list[torch.nn.Module]:
    """FSDP units below the root: every decoder and vision layer."""
    return list(llava.model.language_model.layers) + list(llava.model.vision_tower.encoder.layers)


def shard(model: torch.nn.Module, llava, d: Dist, dtype: torch.dtype) -> None:
    """Shard `model` (whose submodule is `llava`) across the ranks, in place. Each unit is cast
    to fp32 just before it is sharded, so a checkpoint read in bf16 is never whole in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if dtype == torch.float16:
        raise M4Error("fp16 under FSDP is not supported (its loss scaling is per rank): use bf16")
    mesh = init_device_mesh(d.device.type, (d.world,))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for unit in units(llava):
        fully_shard(unit.float(), mesh=mesh, mp_policy=policy)
    fully_shard(model.float(), mesh=mesh, mp_policy=policy)


def full_state(model: torch.nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """The whole state dict on rank 0's CPU (empty elsewhere); every rank must call it."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return cast("dict[str, torch.Tensor]", sd) if d.main else {}


def save_optimizer(model, opt, path, d: Dist) -> None:
    """Each rank writes its shard of the AdamW state (torch.distributed.checkpoint)."""
    with warnings.catch_warnings():  # one process: DCP warns that it is one process
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(path), no_dist=d.world == 1)


def load_optimizer(model, opt, path, d: Dist) -> None:
    state: dict[str, Any] = {"optim": get_optimizer_state_dict(model, opt)}
    # A trainable parameter that never had a gradient (the tower's post-layernorm, which sits
    # after the feature layer) has no AdamW state in the checkpoint: it keeps the fresh one.
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state["optim"]["state"] = {k: v for k, v in state["optim"]["state"].items() if f"optim.state.{k}.step" in saved}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=d.world == 1)
    set_optimizer_state_dict(model, opt, state["optim"], options=StateDictOptions(strict=False))


# -- the dry run: what a preset costs per GPU under FSDP ----------------------------------

def memory_plan(llava, gpus: int, batch: int, seq: int, grad_ckpt: bool) -> tuple[int, int, dict[str, float]]:
    """Parameters, trainable parameters, and bytes per GPU by kind, from the (meta-device)
    model's shapes. Model states are exact; activations are the usual estimate for a decoder
    layer in bf16 with SDPA (no seq^2 term): about 34 x tokens x hidden bytes (Korthikanti et
    al. 2022), of which a checkpointed layer keeps only its 2-byte input and recomputes the rest."""
    params = {id(p): p for p in llava.parameters()}.values()  # tied weights once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    sizes = [sum(p.numel() for p in u.parameters()) for u in units(llava)]
    root = total - sum(sizes)
    text = llava.config.text_config
    tokens, hidden, n = batch * seq, text.hidden_size, text.num_hidden_layers
    layer = 34 * tokens * hidden
    rows = {
        "parameters (fp32, sharded)": 4 * total / gpus,
        "gradients (fp32, sharded)": 4 * trainable / gpus,
        "AdamW state (fp32, sharded)": 8 * trainable / gpus,
        "gathered for compute (bf16: root + 2 layers)": 2 * (root + 2 * max(sizes)),
        f"activations ({batch} x {seq} tokens{', checkpointed' if grad_ckpt else ''})":
            n * 2 * tokens * hidden + layer if grad_ckpt else n * layer,
    }
    rows["total"] = sum(rows.values())
    return total, trainable, rows
