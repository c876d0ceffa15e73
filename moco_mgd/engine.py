"""One epoch of MoCo-v2 (+ MGD) training, the learning-rate and matching schedules.

Nothing here parses arguments or starts processes: the entry scripts do, and pass
explicit values.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from moco_mgd import distributed
from moco_mgd.distiller import MGDistiller, collect_matching_costs
from moco_mgd.logs import MetricsLog, format_duration
from moco_mgd.taps import FeatureTaps

__all__ = [
    "AUTHORS_MATCHING_EPOCHS",
    "NonFiniteLossError",
    "MGDTraining",
    "learning_rate",
    "set_learning_rate",
    "matching_epochs",
    "train_one_epoch",
    "run_matching_update",
]

logger = logging.getLogger("moco_mgd")

# The authors' MoCo-v2 runs re-match before training (0) and after these epochs.
AUTHORS_MATCHING_EPOCHS = (0, 1, 2, 3, 6, 9, 15, 26, 43, 74, 126)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last checkpoint on disk is the last good state."""


@dataclass
class MGDTraining:
    """What a training step needs for MGD. ``distiller`` may be wrapped in DDP."""

    distiller: nn.Module
    student_taps: FeatureTaps
    teacher: nn.Module
    teacher_taps: FeatureTaps

    @property
    def core(self) -> MGDistiller:
        return getattr(self.distiller, "module", self.distiller)


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


def _batch_to(images, device: torch.device, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    return images.to(device, non_blocking=True, memory_format=memory_format)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    epoch: int,
    device: torch.device,
    mgd: MGDTraining | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    print_freq: int = 10,
    metrics: MetricsLog | None = None,
) -> dict[str, float]:
    """Train MoCo (wrapped in DDP or not) for one pass over ``loader``.

    Each step: InfoNCE of the query/key views; with ``mgd``, the teacher's features of
    the query view (under ``no_grad``) and the distiller's loss on the student's features
    of the same forward, added to InfoNCE.

    Returns:
        Epoch means: ``loss``, ``infonce``, ``mgd`` (+ ``mgd_<stage>``), ``acc1``, and
        ``images_per_s``.

    Raises:
        NonFiniteLossError: naming the epoch and iteration.
    """
    model.train()
    criterion = nn.CrossEntropyLoss()
    num_batches = len(loader) if hasattr(loader, "__len__") else None
    world = distributed.get_world_size()
    sums: dict[str, float] = {}
    count = 0
    start = last = time.perf_counter()
    data_time = 0.0
    for i, ((im_q, im_k), _) in enumerate(loader):
        data_time += time.perf_counter() - last
        im_q = _batch_to(im_q, device, channels_last)
        im_k = _batch_to(im_k, device, channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, labels = model(im_q, im_k)
            infonce = criterion(logits.float(), labels)
            loss = infonce
            if mgd is not None:
                with torch.no_grad():
                    teacher_feats = mgd.teacher_taps(im_q)
                mgd_loss, per_stage = mgd.distiller(mgd.student_taps.pop(), teacher_feats)
                loss = loss + mgd_loss
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch} iteration {i}: InfoNCE {float(infonce.detach()):.4g}"
                + (f", MGD {float(mgd_loss.detach()):.4g}" if mgd is not None else "")
                + ": lower --lr or raise --mgd-loss-factor; the last checkpoint is intact"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

        step = {"loss": float(loss.detach()), "infonce": float(infonce.detach()),
                "acc1": float((logits.argmax(1) == labels).float().mean() * 100)}
        if mgd is not None:
            step["mgd"] = float(mgd_loss.detach())
            step.update({f"mgd_{name}": float(v) for name, v in zip(mgd.core.stage_names, per_stage)})
        for k, v in step.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        now = time.perf_counter()
        if print_freq and (i % print_freq == 0 or i + 1 == num_batches):
            elapsed = now - start
            images_per_s = count * im_q.shape[0] * world / max(elapsed, 1e-9)
            eta = (num_batches - i - 1) * elapsed / count if num_batches else float("nan")
            mgd_text = ""
            if mgd is not None:
                mgd_text = f" MGD {step['mgd']:.4f} (" + " ".join(
                    f"{v:.3g}" for v in per_stage.tolist()) + ")"
            logger.info(
                f"epoch {epoch} [{i + 1}/{num_batches or '?'}] eta {format_duration(eta) if num_batches else '?'} "
                f"{images_per_s:.1f} img/s data {data_time / count:.3f}s InfoNCE {step['infonce']:.4f}{mgd_text} "
                f"acc@1 {step['acc1']:.1f} lr {optimizer.param_groups[0]['lr']:.4g}"
            )
            if metrics is not None:
                metrics.log("train", epoch=epoch, iteration=i, images_per_s=images_per_s, **step)
        last = time.perf_counter()
    if count == 0:
        raise RuntimeError("the training loader yielded no batch: the dataset is smaller than one batch "
                           "(-b/--batch-size) on each process")
    elapsed = time.perf_counter() - start
    means = {k: v / count for k, v in sums.items()}
    means["images_per_s"] = count * im_q.shape[0] * world / max(elapsed, 1e-9)
    return means


def run_matching_update(
    mgd: MGDTraining,
    loader: Iterable,
    max_images: int | None,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    epoch: int,
    metrics: MetricsLog | None = None,
) -> None:
    """One coordinate-descent matching step: statistics on this rank's shard, then solve."""
    start = time.perf_counter()
    seen = collect_matching_costs(mgd.core, mgd.student_taps, mgd.teacher_taps, loader,
                                  max_images=max_images, device=device, autocast_dtype=autocast_dtype)
    reports = mgd.core.update_matching()
    seconds = time.perf_counter() - start
    logger.info(
        f"matching after {epoch} epoch(s): {reports[0].num_images} images ({seen} on this rank) in {seconds:.1f}s; "
        + "; ".join(f"{r.stage} cost {r.cost:.4f} changed {r.changed}" for r in reports)
    )
    if metrics is not None:  # the whole assignment, for the stability figure (a few KB per update)
        metrics.log("matching", epoch=epoch, seconds=seconds, num_images=reports[0].num_images,
                    cost={r.stage: r.cost for r in reports}, changed={r.stage: r.changed for r in reports},
                    assignment={r.stage: a for r, a in zip(reports, mgd.core.assignments())})
