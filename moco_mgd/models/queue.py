"""A queue of embeddings filled by every rank in rank order: MoCo's negative keys and SEED's teacher bank."""
from __future__ import annotations

import torch

from moco_mgd.runtime import distributed

__all__ = ["dequeue_and_enqueue_"]


@torch.no_grad()
def dequeue_and_enqueue_(queue: torch.Tensor, queue_ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write ``keys`` of every rank (in rank order) over the oldest columns of ``queue``, in place.

    Args:
        queue: ``[C, K]`` keys as columns.
        queue_ptr: ``LongTensor[1]``, the column where the next batch goes; advanced here.
        keys: ``[N, C]`` this rank's keys (every rank passes the same N).
    """
    keys = distributed.all_gather_cat(keys)  # keys: (world*N)xC, identical on every rank
    batch_size, size = keys.shape[0], queue.shape[1]
    if size % batch_size:
        raise ValueError(f"the queue size K={size} must be divisible by the global batch size "
                         f"{batch_size}: the queue is filled in whole batches")
    # The columns are computed on the device (not int(queue_ptr)), so a step never waits for it.
    # Whole batches and K % batch == 0, so a batch never straddles the end of the queue.
    columns = queue_ptr + torch.arange(batch_size, device=queue.device)  # columns: B
    queue.index_copy_(1, columns, keys.T.to(queue.dtype))  # queue[:, ptr:ptr+B] = keys.T
    queue_ptr.add_(batch_size).remainder_(size)
