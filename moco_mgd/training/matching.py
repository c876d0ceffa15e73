"""MGD's matching pass: both networks run in eval mode over the matching images, and the distiller
accumulates the channel costs that :meth:`~moco_mgd.losses.mgd_distiller.MGDistiller.update_matching` solves.

The one place that runs it: :class:`~moco_mgd.training.distillation.Distillation` on the matching
schedule, and any training loop of your own (README, "Use MGD in your own loop").
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from moco_mgd.losses.mgd_distiller import MGDistiller
from moco_mgd.models.stages import forward_with_stages

__all__ = ["collect_matching_costs"]


@torch.no_grad()
def collect_matching_costs(
    distiller: MGDistiller,
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    max_images: int | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> int:
    """Feed images to both networks in eval mode and accumulate the matching costs.

    Under DDP give each rank its own shard of the images (a ``DistributedSampler``) and
    ``max_images`` divided by the world size: :meth:`MGDistiller.update_matching` sums the
    statistics of all ranks.

    Args:
        batches: iterable of image tensors or of ``(images, ...)`` tuples.
        max_images: stop after this many images on this rank (``None``: all of them).
        device: where to run the networks (default: where the student's weights are).
        autocast_dtype: run the forwards under autocast with this dtype (e.g. bf16 on GPU).

    Returns:
        The number of images this rank accumulated.
    """
    device = torch.device(device) if device is not None else next(student.parameters()).device
    was_training = student.training
    student.eval()
    teacher.eval()
    distiller.reset_costs()
    seen = 0
    try:
        for batch in batches:
            if max_images is not None and seen >= max_images:
                break
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            if max_images is not None:
                images = images[: max_images - seen]
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                student_stages = forward_with_stages(student, images)[1]
                teacher_stages = forward_with_stages(teacher, images)[1]
            distiller.accumulate(student_stages, teacher_stages)
            seen += images.shape[0]
    finally:
        student.train(was_training)
    return seen
