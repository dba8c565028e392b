"""torchrun (DDP) plumbing of the trainer: the process group, this rank's place in it, and the collectives the
loop needs (parameter broadcast, gradient sum, the global-batch figures of a step, the readers' positions).

Rank r trains on the r-th contiguous 1/N of each global batch, which its reader draws from its own lanes
(disjoint chunks); the BatchTopK selection, the dead-latent counters and θ are global (sae.train.sae reduces them
over `Dist.group`), so the weights match one process reading the same lanes."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from sae.config import TrainConfig
from sae.device import resolve_device
from sae.errors import SaeError

from .reader import ChunkReader, merge_states


class Dist(NamedTuple):
    """This process's place in a torchrun (DDP) run. Rank r trains on the r-th contiguous 1/N of each global batch,
    which its reader draws from its own lanes (disjoint chunks); the global batches, and so the BatchTopK selection
    and the weights, are those of one process reading the same lanes."""

    rank: int
    """This process's rank."""
    world: int
    """Number of ranks (1: no torch.distributed)."""
    group: Any = None
    """The process group (None in one process)."""

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes logs, checkpoints and SAEs."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)


SINGLE = Dist(0, 1)
"""One process, no torch.distributed."""


def init_distributed(cfg: TrainConfig) -> tuple[Dist, torch.device, bool]:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on cuda:LOCAL_RANK); return the
    context, the device and whether this call created the group (and must destroy it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device)
    if world <= 1:
        return SINGLE, device, False
    if cfg.batch_size % world:
        raise SaeError(f"--batch-size {cfg.batch_size} must be divisible by the number of ranks ({world})")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dist.group.WORLD), device, created


def broadcast_state(modules: list[torch.nn.Module], d: Dist) -> None:
    """Make every rank start from rank 0's parameters and buffers (they agree already; this guards it)."""
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            dist.broadcast(t.data, 0, group=d.group)


def all_reduce_grads(module: torch.nn.Module, d: Dist) -> None:
    """Sum the gradients over the ranks (each rank's loss is its share of the global loss), one collective."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=d.group)
    off = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[off : off + n].view_as(g).to(g.dtype)
        off += n


def reduce_output(o: Any, d: Dist) -> Any:
    """The global-batch losses and L0 of a step: the sums of the ranks' shares (see SaeOutput)."""
    if d.group is None:
        return o
    keys = ("loss", "fvu", "mse", "aux_loss", "sparsity_loss", "l0")
    t = torch.stack([getattr(o, k).detach().float().reshape(()) for k in keys])
    dist.all_reduce(t, group=d.group)
    return o._replace(**dict(zip(keys, t.unbind(), strict=True)))


def broadcast_float(value: float, d: Dist, device: torch.device) -> float:
    """Rank 0's `value` on every rank."""
    if d.group is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, 0, group=d.group)
    return float(t)


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """Whether `flag` is set on some rank (every rank gets the same answer)."""
    if d.group is None:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.group)
    return bool(t)


def reader_state(reader: ChunkReader, d: Dist) -> dict[str, Any]:
    """The whole reader's state: each rank knows the positions of the lanes it reads."""
    if d.group is None:
        return reader.state_dict()
    states: list[Any] = [None] * d.world
    dist.all_gather_object(states, reader.state_dict(), group=d.group)
    return merge_states(states)


__all__ = [
    "SINGLE",
    "Dist",
    "all_reduce_grads",
    "any_rank",
    "broadcast_float",
    "broadcast_state",
    "init_distributed",
    "reader_state",
    "reduce_output",
]
