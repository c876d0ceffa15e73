"""One training step and one epoch of MoCo-v2 (+ distillation).

Nothing here parses arguments or starts processes: the entry scripts do, and pass
explicit values. The schedules are in :mod:`moco_mgd.training.schedules`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from moco_mgd.models.moco import contrastive_diagnostics
from moco_mgd.runtime import distributed
from moco_mgd.runtime.logs import MetricsLog, format_duration
from moco_mgd.training.distillation import Distillation

__all__ = ["NonFiniteLossError", "StepOutput", "diagnostics_text", "training_step", "train_one_epoch"]

logger = logging.getLogger("moco_mgd")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last checkpoint on disk is the last good state."""


def _batch_to(images, device: torch.device, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    return images.to(device, non_blocking=True, memory_format=memory_format)


@dataclass
class StepOutput:
    """What one training step computed (tensors detached)."""

    loss: torch.Tensor
    infonce: torch.Tensor
    acc1: torch.Tensor
    mgd: torch.Tensor | None = None
    mgd_per_stage: torch.Tensor | None = None
    embedding: dict[str, torch.Tensor] = field(default_factory=dict)
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)  # see contrastive_diagnostics

    def named_losses(self) -> dict[str, torch.Tensor]:
        """The losses added to InfoNCE, by the name they are logged under."""
        return ({"MGD": self.mgd} if self.mgd is not None else {}) | self.embedding


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    im_q: torch.Tensor,
    im_k: torch.Tensor,
    distillation: Distillation,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> StepOutput:
    """One SGD step of the :class:`~moco_mgd.training.distillation.PretrainModel` (wrapped in DDP or not).

    The teacher's forward on the batch (none when distillation is off), then InfoNCE of the
    query/key views plus the distillation losses, in the one DDP-wrapped forward.

    Raises:
        NonFiniteLossError: before the step is taken, naming every loss.
    """
    with torch.autocast(im_q.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        targets = distillation.teacher_targets(im_q, im_k)
        losses = model(im_q, im_k, targets)
    loss, logits, labels = losses.loss, losses.moco.logits, losses.moco.labels
    moco_module = getattr(model, "module", model).moco
    out = StepOutput(loss.detach(), losses.infonce.detach(),
                     (logits.detach().argmax(1) == labels).float().mean() * 100,
                     None if losses.mgd is None else losses.mgd.detach(), losses.mgd_per_stage, losses.embedding,
                     contrastive_diagnostics(losses.moco, moco_module.T))
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"non-finite loss: InfoNCE {float(out.infonce):.4g}"
            + "".join(f", {name} {float(value):.4g}" for name, value in out.named_losses().items())
            + ": lower --lr, or lower the distillation weights (raise --mgd-loss-factor); "
              "the last checkpoint is intact"
        )
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return out


def diagnostics_text(values: dict[str, float]) -> str:
    """The contrastive diagnostics in a log line (their meaning: moco.contrastive_diagnostics)."""
    return (f"cos(q,k+) {values['pos_sim']:.3f} cos(q,queue) {values['neg_sim']:.3f} "
            f"cos(q,q') {values['query_cos']:.3f} inst-acc {values['inst_acc']:.1f}")


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    epoch: int,
    device: torch.device,
    distillation: Distillation,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    print_freq: int = 10,
    metrics: MetricsLog | None = None,
) -> dict[str, float]:
    """Train the PretrainModel (wrapped in DDP or not) for one pass over ``loader`` (:func:`training_step` each batch).

    Returns:
        Epoch means: ``loss``, ``infonce``, ``mgd`` (+ ``mgd_<stage>``), each embedding loss
        by name (unweighted), ``acc1``, the diagnostics of
        :func:`~moco_mgd.models.moco.contrastive_diagnostics` and ``images_per_s``.

    Raises:
        NonFiniteLossError: naming the epoch and iteration.
    """
    model.train()
    mgd_core = distillation.mgd
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
        try:
            out = training_step(model, optimizer, im_q, im_k, distillation, scaler, autocast_dtype)
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(str(exc).replace("non-finite loss", f"non-finite loss at epoch {epoch} "
                                                                        f"iteration {i}", 1)) from None

        step = {"loss": float(out.loss), "infonce": float(out.infonce), "acc1": float(out.acc1)}
        if mgd_core is not None:
            step["mgd"] = float(out.mgd)
            step.update({f"mgd_{name}": float(v) for name, v in zip(mgd_core.stage_names, out.mgd_per_stage)})
        step.update({name: float(value) for name, value in out.embedding.items()})
        step.update({name: float(value) for name, value in out.diagnostics.items()})
        for k, v in step.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        now = time.perf_counter()
        if print_freq and (i % print_freq == 0 or i + 1 == num_batches):
            elapsed = now - start
            images_per_s = count * im_q.shape[0] * world / max(elapsed, 1e-9)
            eta = (num_batches - i - 1) * elapsed / count if num_batches else float("nan")
            extra_text = ""
            if mgd_core is not None:
                extra_text = f" MGD {step['mgd']:.4f} (" + " ".join(
                    f"{v:.3g}" for v in out.mgd_per_stage.tolist()) + ")"
            extra_text += "".join(f" {name} {step[name]:.4g}" for name in out.embedding)
            logger.info(
                f"epoch {epoch} [{i + 1}/{num_batches or '?'}] eta {format_duration(eta) if num_batches else '?'} "
                f"{images_per_s:.1f} img/s data {data_time / count:.3f}s InfoNCE {step['infonce']:.4f}{extra_text} "
                f"acc@1 {step['acc1']:.1f} lr {optimizer.param_groups[0]['lr']:.4g} "
                f"{diagnostics_text(step)}"
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
