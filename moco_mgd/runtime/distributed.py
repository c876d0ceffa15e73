"""Distributed plumbing. Every helper works without a process group (world size 1).

Only this module talks to ``torch.distributed``; the math and the models call these
helpers, so the same code runs in one CPU process, under ``torchrun`` and under SLURM.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "all_reduce_sum",
    "broadcast",
    "all_gather_cat",
    "all_gather_with_grad",
    "barrier",
    "new_host_group",
    "process_places",
]


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it. No-op at world size 1."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Copy rank ``src``'s ``tensor`` to every rank, in place; returns it."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` of every rank along dim 0, in rank order. No gradient.

    All ranks must pass tensors of the same shape.
    """
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather in the forward; in the backward, each rank gets the summed gradient of its slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        # Every rank computes the same loss over the gathered batch, and each rank's loss
        # depends on this rank's rows: their gradient is the sum over ranks. (all_reduce, not
        # reduce_scatter, which gloo lacks.)
        grad = grad_output.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` of every rank along dim 0, in rank order, keeping the gradient.

    For a loss that every rank computes identically over the whole gathered batch (e.g. a
    batch correlation matrix): the backward sums over ranks the gradient of this rank's
    rows, so that after DDP averages the parameter gradients over the ``W`` ranks, they
    equal the gradient of one process that saw the whole batch. Identity at world size 1.
    All ranks must pass tensors of the same shape.
    """
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def shard_indices(length: int, padded: bool = False) -> list[int]:
    """This rank's share of ``range(length)`` for evaluation: ``rank, rank + world, ...`` (all of it in one process).

    ``padded`` gives every rank ``ceil(length / world)`` indices, the tail repeating the first
    ones as ``DistributedSampler`` does, for an ``all_gather`` that needs equal sizes; a
    repeated index must then be written once or counted once by the caller. Without padding
    the shares are disjoint and cover every index once, so counts can simply be summed.
    """
    rank, world = get_rank(), get_world_size()
    indices = list(range(rank, length, world))
    if padded:
        per_rank = -(-length // world)
        indices += list(range(length))[: per_rank - len(indices)]
    return indices


def barrier() -> None:
    if is_distributed():
        dist.barrier()



def new_host_group(timeout_s: float | None = None):
    """A gloo group over all ranks for small CPU messages: the default group when it is gloo already.

    Why: a flag all-reduced over NCCL has to be read back from the GPU, which waits for every
    queued kernel; over gloo it never touches the GPU. Collective: every rank calls it at the
    same point of the run. None without a process group.
    """
    if not is_distributed():
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    # Its own timeout: a new group does not inherit the default group's (torch gives gloo 30 min).
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s) if timeout_s else None)


def process_places() -> list[str]:
    """``host:pid`` of every rank, in rank order (this process's alone without a process group).

    Collective. Logged at the start of a run, so that a rank named in an error (or a pid in the
    kernel's OOM report) can be told apart from the others.
    """
    place = f"{socket.gethostname()}:{os.getpid()}"
    if not is_distributed():
        return [place]
    places = [None] * dist.get_world_size()
    dist.all_gather_object(places, place)
    return places
