"""Several processes with torch.distributed, launched by torchrun: data parallel and FSDP2.

    torchrun --nproc_per_node 2 -m lorafit train ...      (or: lorafit train --nproc 2 ...)

Each rank reads a disjoint shard of the packed rows (`lorafit.packing.Batches` deals whole
micro-batches round-robin), so a step of N ranks sees the same rows as one process with N times
the per-device batch. The loss stays the GLOBAL token-weighted mean: before backward the ranks
sum their target counts, every rank divides its loss sum by that global count, and the gradient
all-reduce adds the ranks' parts up.

    rank 0:  rows 0-1 | 4-5 | ...      loss_0 / T_global --+
    rank 1:  rows 2-3 | 6-7 | ...      loss_1 / T_global --+--> all-reduce (sum) = global mean

Data parallel uses DistributedDataParallel over a small module that computes the loss (so the
decoder-only fast loss head still runs inside DDP's forward); gradients are only synchronised on
the last micro-batch of a step (`no_sync`). DDP averages over ranks, so the loss is multiplied by
the world size to make that average a sum. Only rank 0 writes files; the progress bar shows
once. Backend: nccl on CUDA, gloo on CPU. (Sharding the base with FSDP2 is not wired in yet.)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lorafit.loss import loss_sum


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_type: str) -> Dist:
    """Join the process group torchrun set up (env:// rendezvous); a no-op for one process."""
    if not launched_by_torchrun():
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def device_for(d: Dist, device: torch.device) -> torch.device:
    """One GPU per process: cuda -> cuda:LOCAL_RANK."""
    if d.enabled and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device


def shutdown(clean: bool = True) -> None:
    """Leave the process group (a no-op for one process).

    What still holds the group (DDP's reducer, its pending work) is freed first, while the
    interpreter is fully alive: gloo work destroyed during interpreter teardown aborts the process
    ("terminate called without an active exception"). After a clean run the ranks also meet at a
    barrier, so none tears its connections down while rank 0 is still writing files.
    """
    if not dist.is_initialized():
        return
    import gc

    gc.collect()
    if clean:
        with contextlib.suppress(Exception):  # a rank that failed has left; do not wait for it
            dist.barrier()
    dist.destroy_process_group()


def all_sum(d: Dist, *values: float, device: torch.device | None = None) -> list[float]:
    """Sum numbers over ranks (float64 on the wire, so token counts stay exact)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device or torch.device("cpu"))
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(d: Dist, obj):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(d: Dist, obj) -> list:
    """Every rank's `obj`, on every rank (small things: RNG states, flags)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


class LossModule(nn.Module):
    """model + batch -> summed target cross-entropy; the unit DDP wraps."""

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype | None):
        super().__init__()
        self.model = model
        self.compute_dtype = compute_dtype

    def forward(self, input_ids, position_ids, labels, segments=None):
        batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "segments": segments}
        return loss_sum(self.model, batch, self.compute_dtype)


def wrap(d: Dist, model: nn.Module, compute_dtype, *, device: torch.device):
    """(loss_module, scale): the module to call per micro-batch and the factor its loss is multiplied by."""
    module = LossModule(model, compute_dtype)
    if not d.enabled:
        return module, 1.0
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, broadcast_buffers=False), float(d.world_size)


def sync_context(module, sync: bool):
    """No gradient all-reduce on micro-batches that are not the last of a step."""
    if not sync and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()
