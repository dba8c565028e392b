"""torchrun (DDP) plumbing of the trainer: the process group, this rank's place in it, and the collectives the
loop needs (parameter broadcast, gradient sum, the global-batch figures of a step, the readers' positions).

Rank r trains on the r-th contiguous 1/N of each global batch, which its reader draws from its own lanes
(disjoint chunks); the BatchTopK selection, the dead-latent counters and θ are global (sae.train.archs reduces them
over `Dist.group`), so the weights match one process reading the same lanes.

Two groups: `group` (nccl on GPUs) for the tensors of a step, and `cpu_group` (gloo) for the barriers, the stop
flag and the readers' positions. The other ranks wait on gloo while rank 0 validates and writes SAEs and
checkpoints (minutes at large F), where NCCL's watchdog would abort a collective left waiting that long, and the
per-step stop flag is a host value that needs no device sync. Both groups wait at most $SAE_DIST_TIMEOUT seconds
(DIST_TIMEOUT by default)."""

from __future__ import annotations

import os
import time
from datetime import timedelta
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
    """The process group of the step's tensors (None in one process)."""
    cpu_group: Any = None
    """A gloo group of the same ranks for barriers and host values (None in one process)."""

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes logs, checkpoints and SAEs."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (on gloo: a long wait does not trip NCCL's watchdog)."""
        if self.cpu_group is not None:
            dist.barrier(group=self.cpu_group)


SINGLE = Dist(0, 1)
"""One process, no torch.distributed."""

DIST_TIMEOUT = 7200.0
"""Seconds a rank waits in a collective or barrier before giving up, unless $SAE_DIST_TIMEOUT says otherwise:
long enough for rank 0 to validate and write a sweep of large SAEs and their checkpoint while the others wait."""

ENV_TIMEOUT = "SAE_DIST_TIMEOUT"


def dist_timeout() -> timedelta:
    """The collectives' timeout: $SAE_DIST_TIMEOUT seconds, DIST_TIMEOUT by default."""
    raw = os.environ.get(ENV_TIMEOUT, "").strip()
    if not raw:
        return timedelta(seconds=DIST_TIMEOUT)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise SaeError(f"{ENV_TIMEOUT} must be a positive number of seconds, got {raw!r}")
    return timedelta(seconds=seconds)


def init_distributed(cfg: TrainConfig) -> tuple[Dist, torch.device, bool]:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on cuda:LOCAL_RANK); return the
    context, the device and whether this call created the group (and must destroy it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device)
    if world <= 1:
        return SINGLE, device, False
    if cfg.batch_size % world:
        raise SaeError(f"--batch-size {cfg.batch_size} must be divisible by the number of ranks ({world})")
    timeout = dist_timeout()
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        n = torch.cuda.device_count()
        if local >= n:
            raise SaeError(
                f"this is process LOCAL_RANK={local} of a torchrun run, but this node has {n} GPU(s): start one "
                f"process per GPU (torchrun --nproc_per_node={n} or fewer; SLURM manifests: slurm.nproc <= gpus)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    world_group = dist.group.WORLD
    # every rank makes the gloo group (new_group is collective); a gloo world serves as its own
    cpu_group = world_group if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return Dist(dist.get_rank(), dist.get_world_size(), world_group, cpu_group), device, created


def destroy_process_group() -> None:
    """`dist.destroy_process_group()`, after a moment for the backends' worker threads to drop their last references
    to tensors: before torch 2.8 a group's destructor holds the GIL while it joins those threads, and a thread that
    needs the GIL to free a tensor of the last collective then waits forever (pytorch/pytorch#154976)."""
    time.sleep(0.05)  # (releases the GIL)
    dist.destroy_process_group()


def broadcast_state(modules: list[torch.nn.Module], d: Dist) -> None:
    """Make every rank start from rank 0's parameters and buffers (they agree already; this guards it)."""
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            dist.broadcast(t.data, 0, group=d.group)


class GradSync:
    """Sums `module`'s gradients over the ranks (each rank's loss is its share of the global loss), overlapped
    with the backward pass: each parameter's all-reduce starts, asynchronously, as soon as autograd has
    accumulated its gradient (a post-accumulate-grad hook), so W_dec's (the decoder runs backward first) travels
    while the encoder's backward computes; `wait()` after `backward()` finishes them. Only a backward between
    `arm()` and `wait()` is reduced (not, e.g., `choose_decoder`'s timing runs).

    torch's DistributedDataParallel would do the same with buckets, but it averages where the SAE's loss needs a
    sum, wraps a module whose forward runs collectives of its own (the global BatchTopK selection), and buckets a
    handful of parameters of which two hold nearly all the bytes; one collective per parameter is that bucketing."""

    def __init__(self, module: torch.nn.Module, d: Dist) -> None:
        self.d = d
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._pending: dict[int, Any] = {}
        self._armed = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._launch) for p in self.params]

    def _launch(self, p: torch.Tensor) -> None:
        if self._armed:
            self._pending[id(p)] = dist.all_reduce(p.grad, group=self.d.group, async_op=True)

    def arm(self) -> None:
        """Reduce the gradients of the next backward as they appear."""
        self._armed = True

    def wait(self) -> None:
        """Finish every parameter's all-reduce (after `backward()`): the gradients are then the global ones."""
        self._armed = False
        for p in self.params:
            work = self._pending.pop(id(p), None)
            if work is None:
                # no gradient reached it this step (the same on every rank: the graph depends on global values
                # only), so its sum is zero, reduced in parameter order after the hooked ones
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=self.d.group)
            else:
                work.wait()

    def remove(self) -> None:
        """Unregister the hooks."""
        for h in self._hooks:
            h.remove()


def reduce_output(o: Any, d: Dist) -> Any:
    """The global-batch losses and L0 of a step: the sums of the ranks' shares (see SaeOutput)."""
    if d.group is None:
        return o
    keys = ("loss", "recon_loss", "fvu", "mse", "aux_loss", "sparsity_loss", "l0")
    t = torch.stack([getattr(o, k).detach().float().reshape(()) for k in keys])
    dist.all_reduce(t, group=d.group)
    return o._replace(**dict(zip(keys, t.unbind(), strict=True)))


def broadcast_float(value: float | None, d: Dist) -> float | None:
    """Rank 0's `value` on every rank."""
    if d.group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, 0, group=d.cpu_group)
    return box[0]


def any_rank(flag: bool, d: Dist) -> bool:
    """Whether `flag` is set on some rank (every rank gets the same answer): a host value on the gloo group, so
    asking every step costs a small message and no wait for the device."""
    if d.group is None:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.cpu_group)
    return bool(t)


def reader_state(reader: ChunkReader, d: Dist) -> dict[str, Any]:
    """The whole reader's state: each rank knows the positions of the lanes it reads."""
    if d.group is None:
        return reader.state_dict()
    states: list[Any] = [None] * d.world
    dist.all_gather_object(states, reader.state_dict(), group=d.cpu_group)
    return merge_states(states)


__all__ = [
    "DIST_TIMEOUT",
    "SINGLE",
    "Dist",
    "GradSync",
    "any_rank",
    "broadcast_float",
    "broadcast_state",
    "destroy_process_group",
    "dist_timeout",
    "init_distributed",
    "reader_state",
    "reduce_output",
]
