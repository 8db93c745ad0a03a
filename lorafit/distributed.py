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
once. Backend: nccl on CUDA, gloo on CPU.

Sharded (training_config.fsdp): FSDP2 (`torch.distributed.fsdp.fully_shard`) instead of DDP, for a
base that does not fit on one device. Each decoder layer (the classes in the model's
`_no_split_modules`) is one group, the loss module with the rest (embeddings, final norm, head) the
root group; every parameter is a DTensor holding 1/N of its rows on each rank, and a group is
all-gathered just for its forward and backward:

    rank r holds:  layer 0 [rows r/N] | layer 1 [rows r/N] | ... | embed, norm, head [rows r/N]
    forward of layer k:  all-gather layer k -> compute -> free the gathered copy
    backward of layer k: all-gather again -> grads -> reduce-scatter (mean) -> rank r keeps its rows

The frozen base is sharded and never reduced; the LoRA factors train sharded, and AdamW's state is
sharded with them. The reduce-scatter averages like DDP, so the loss is multiplied by the world size
here too; `set_requires_gradient_sync(False)` plays `no_sync`'s part. What must leave the ranks whole
(the adapter, the optimizer state of a checkpoint) is gathered by `full_values` and
`full_optimizer_state`, collectives that every rank calls; rank 0 writes. A checkpoint has the same
format as an unsharded run's: resuming puts the adapter onto the model before it is sharded and
re-shards the optimizer state (`shard_optimizer_state`), so it resumes sharded or not (tested: 2 ranks
and 1 process).
The forward of a sharded model is a collective too: evaluation runs as many batches on every rank
(`lorafit.evaluation.eval_loss`).
"""

from __future__ import annotations

import contextlib
import logging
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


def env_rank() -> int:
    """This process's global rank as torchrun announces it (RANK), before the process group exists: 0 for
    one process. What only one process should say (config warnings) is said where it is 0."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def env_world_size() -> int:
    """The number of processes torchrun launched (WORLD_SIZE), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1


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


def group_device(group=None) -> torch.device:
    """The device a process group's tensor collectives run on: nccl has no CPU backend, so its
    tensors must live on this process's GPU (cuda:LOCAL_RANK, the device `init` selected); gloo
    (and a CPU-only run) works on the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def collective(op, tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Run the in-place tensor collective `op` (e.g. `dist.all_reduce`) on `tensor` moved to the group's
    device (`group_device`; `tensor` itself when it is already there); return the result on `tensor`'s
    device.

    Every tensor collective of lorafit goes through here, so none hands a CPU tensor to nccl.
    """
    on_group = tensor.to(group_device(group))
    op(on_group, group=group)
    return on_group.to(tensor.device)


def all_sum(d: Dist, *values: float) -> list[float]:
    """Sum numbers over ranks (float64 on the wire, so token counts stay exact)."""
    if not d.enabled:
        return list(values)
    return collective(dist.all_reduce, torch.tensor(values, dtype=torch.float64)).tolist()


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

    def forward(self, input_ids, position_ids, labels, segments=None, target_index=None):
        batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "segments": segments,
                 "target_index": target_index}  # fmt: skip
        return loss_sum(self.model, batch, self.compute_dtype)


def wrap(d: Dist, model: nn.Module, compute_dtype, *, device: torch.device, fsdp: bool = False):
    """(loss_module, scale): the module to call per micro-batch and the factor its loss is multiplied by.

    With `fsdp` (and several processes) the model's parameters are replaced by their shards in place:
    create the optimizer from `model.parameters()` after this call.
    """
    module = LossModule(model, compute_dtype)
    if not d.enabled:
        return module, 1.0
    if fsdp:
        shard(module, device)
        return module, float(d.world_size)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, broadcast_buffers=False), float(d.world_size)


def shard(module: LossModule, device: torch.device) -> list[str]:
    """FSDP2 over all ranks: one group per decoder layer, then the root; returns the layer class names.

    Parameters still on the CPU move to `device` shard by shard (so a GPU never holds the whole base).
    The output head stays in the root group on purpose: lorafit's loss reads `head.weight` without
    calling the head module (`lorafit.loss`), so a group of its own would never be gathered.

    No MixedPrecisionPolicy, on purpose: the frozen base is already stored in the compute dtype (bf16
    under bf16 autocast, `lorafit.model.weight_dtype`) and the LoRA factors stay fp32 master weights
    that autocast casts per matmul, exactly as in one process. FSDP2 all-gathers a group of mixed
    dtypes through one byte buffer, requires only the TRAINABLE parameters to share a dtype (all LoRA
    factors are fp32), and reduce-scatters their gradients in that dtype, fp32. A policy with
    param_dtype=bf16 would instead hand the LoRA factors to the forward in bf16, so their gradients
    would be bf16 before the reduction and a sharded run would no longer match a single process.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    names = set(getattr(module.model, "_no_split_modules", None) or ())
    layers = [m for m in module.model.modules() if type(m).__name__ in names]
    if not layers:
        logging.getLogger("lorafit").warning(
            "warning: the model names no decoder layer classes (_no_split_modules), so FSDP shards it as one "
            "group: every rank gathers the whole model for each forward and backward"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return sorted({type(m).__name__ for m in layers})


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def _no_gradient_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def sync_context(module, sync: bool):
    """No gradient all-reduce (DDP) or reduce-scatter (FSDP) on micro-batches that are not the last of a step."""
    if sync:
        return contextlib.nullcontext()
    if is_sharded(module):
        return _no_gradient_sync(module)
    if hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor gathered whole (collective), or the tensor itself; detached, on the CPU."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()


def full_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as whole CPU tensors, by name (for saving the adapter).

    Under FSDP this is a collective: every rank calls it, in the same order, and every rank gets them.
    """
    return {n: _whole(p) for n, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with sharded state tensors gathered whole (collective under FSDP).

    The result is what an unsharded run saves: state keyed by parameter index, so a checkpoint does not
    depend on how many processes wrote it. LoRA state is small; every rank holds it whole for a moment.
    """
    sd = optimizer.state_dict()
    state = {i: {k: _whole(v) if torch.is_tensor(v) else v for k, v in sorted(sd["state"][i].items())}
             for i in sorted(sd["state"])}  # fmt: skip
    return {**sd, "state": state}


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `optimizer.load_state_dict(whole state)` on sharded parameters: keep each rank's rows.

    Every rank read the same whole tensors, so each takes its own shard locally (no communication).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if not isinstance(p, DTensor):
                continue
            for k, v in state.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    state[k] = distribute_tensor(
                        v.to(p.device), p.device_mesh, p.placements, src_data_rank=None
                    )


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float; with sharded gradients it is a DTensor, made whole first."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
