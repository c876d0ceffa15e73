"""MoCo's learning-rate schedule and MGD's matching schedule: pure functions of the epoch."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["AUTHORS_MATCHING_EPOCHS", "learning_rate", "set_learning_rate", "matching_epochs"]

# The authors' MoCo-v2 runs re-match before training (0) and after these epochs.
AUTHORS_MATCHING_EPOCHS = (0, 1, 2, 3, 6, 9, 15, 26, 43, 74, 126)


def learning_rate(base_lr: float, epoch: int, epochs: int, cos: bool, schedule: Sequence[int]) -> float:
    """MoCo's schedule: half-cosine over the epochs, or x0.1 at each milestone of ``schedule``."""
    if cos:
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return base_lr * 0.1 ** sum(epoch >= milestone for milestone in schedule)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def matching_epochs(spec: str, epochs: int) -> list[int]:
    """Parse ``--mgd-schedule``: the epochs after which the matching is re-solved.

    ``"authors"`` is :data:`AUTHORS_MATCHING_EPOCHS`; ``"every:N"`` is 0, N, 2N, ...
    (the paper's "every N epochs"); ``"none"`` is no matching at all (a fixed assignment,
    the paper's without-matching ablation: no epochs); otherwise a comma-separated list.
    Epoch 0 means before training. Epochs past the end are dropped.

    Raises:
        ValueError: the spec is none of these, with examples of valid ones.
    """
    spec = spec.strip()
    try:
        if spec == "authors":
            chosen = list(AUTHORS_MATCHING_EPOCHS)
        elif spec == "none":
            return []
        elif spec.startswith("every:"):
            step = int(spec.split(":", 1)[1])
            if step <= 0:
                raise ValueError
            chosen = list(range(0, epochs, step))
        else:
            chosen = [int(e) for e in spec.split(",") if e.strip()]
            if not chosen or min(chosen) < 0:
                raise ValueError
    except ValueError:
        raise ValueError(
            f"--mgd-schedule {spec!r} is not a schedule: use 'authors', 'every:N' (e.g. every:1), 'none', "
            f"or a comma-separated list of epochs such as 0,1,2,3,6"
        ) from None
    return sorted({e for e in chosen if e < epochs})
