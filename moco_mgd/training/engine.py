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

from moco_mgd.losses.embedding import EMBEDDING_LOSSES
from moco_mgd.models.moco import contrastive_diagnostics
from moco_mgd.runtime import distributed
from moco_mgd.runtime.logs import MetricsLog, format_duration
from moco_mgd.runtime.stopping import StopRequest

__all__ = ["NonFiniteLossError", "EpochProgress", "RunStopped", "StepOutput", "diagnostics_text", "training_step",
           "train_one_epoch"]

logger = logging.getLogger("moco_mgd")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last checkpoint on disk is the last good state."""


@dataclass
class EpochProgress:
    """The part of an epoch already trained: what a mid-epoch checkpoint holds to finish it identically."""

    iteration: int = 0                     # iterations (batches) done in the epoch
    names: list[str] | None = None         # the logged values, in the order of ``sums``
    sums: torch.Tensor | None = None       # their float64 sums over those iterations

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "names": self.names,
                "sums": None if self.sums is None else self.sums.cpu()}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device) -> "EpochProgress":
        sums = state["sums"]
        return cls(state["iteration"], state["names"], None if sums is None else sums.to(device))


class RunStopped(Exception):
    """Every rank stopped at the same iteration because a stop signal arrived (see runtime.stopping)."""

    def __init__(self, signals: frozenset[int], epoch: int, progress: EpochProgress):
        super().__init__(f"stopped by a signal at epoch {epoch} iteration {progress.iteration}")
        self.signals, self.epoch, self.progress = signals, epoch, progress


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
    mgd_per_stage: dict[str, torch.Tensor] = field(default_factory=dict)   # by stage name
    embedding: dict[str, torch.Tensor] = field(default_factory=dict)
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)  # see contrastive_diagnostics

    def logged(self) -> dict[str, torch.Tensor]:
        """Every 0-dim value logged for the step, by its name in ``metrics.jsonl`` (still on the device)."""
        values = {"loss": self.loss, "infonce": self.infonce, "acc1": self.acc1}
        if self.mgd is not None:
            values["mgd"] = self.mgd
            values.update({f"mgd_{name}": v for name, v in self.mgd_per_stage.items()})
        return values | self.embedding | self.diagnostics


def _non_finite_error(epoch: int, iteration: int, values: dict[str, float]) -> NonFiniteLossError:
    losses = [("InfoNCE", "infonce"), ("MGD", "mgd"), *[(name, name) for name in EMBEDDING_LOSSES]]
    return NonFiniteLossError(
        f"non-finite loss at epoch {epoch} iteration {iteration}: "
        + ", ".join(f"{shown} {values[name]:.4g}" for shown, name in losses if name in values)
        + ": lower --lr, or lower the distillation weights (raise --mgd-loss-factor); the last checkpoint is intact"
    )


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    im_q: torch.Tensor,
    im_k: torch.Tensor,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    im_bag: torch.Tensor | None = None,
) -> StepOutput:
    """One SGD step of the :class:`~moco_mgd.training.distillation.PretrainModel` (wrapped in DDP or not).

    One forward of the model gives every loss: the teacher's targets (none when distillation is
    off), InfoNCE of the query/key views and the distillation losses. ``im_bag``: BINGO's view of
    each image's bag member.

    Nothing here waits for the device: the loss is not read back, and a non-finite one is
    caught by :func:`train_one_epoch` at its next read (every ``-p`` steps).
    """
    with torch.autocast(im_q.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        losses = model(im_q, im_k, im_bag)
    loss, logits, labels = losses.loss, losses.moco.logits, losses.moco.labels
    out = StepOutput(loss.detach(), losses.infonce.detach(),
                     (logits.detach().argmax(1) == labels).float().mean() * 100,
                     None if losses.mgd is None else losses.mgd.detach(), losses.mgd_per_stage, losses.embedding,
                     contrastive_diagnostics(losses.moco, losses.temperature))
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
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    print_freq: int = 10,
    metrics: MetricsLog | None = None,
    progress: EpochProgress | None = None,
    stop: StopRequest | None = None,
) -> dict[str, float]:
    """Train the PretrainModel (wrapped in DDP or not) for one pass over ``loader`` (:func:`training_step` each batch).

    ``progress``: the part of this epoch trained before a resume (``loader`` then yields only the
    batches after it). ``stop``: polled after every iteration but the epoch's last; when it
    reports a signal, every rank stops there and :class:`RunStopped` carries the progress.

    Returns:
        Epoch means: ``loss``, ``infonce``, ``mgd`` (+ ``mgd_<stage>``), each embedding loss
        by name (unweighted), ``acc1``, the diagnostics of
        :func:`~moco_mgd.models.moco.contrastive_diagnostics` and ``images_per_s``.

    Raises:
        NonFiniteLossError: naming the epoch and the first iteration whose loss was NaN or inf,
            with that step's values. It is noticed at the next read-back: at most ``print_freq``
            steps later, and at the latest at the end of the epoch or at a stop, before any checkpoint.
        RunStopped: a stop signal; the values so far are checked first, as at the end of an epoch.
    """
    model.train()
    done = progress.iteration if progress is not None else 0
    num_batches = done + len(loader) if hasattr(loader, "__len__") else None
    world = distributed.get_world_size()
    # The step's values stay on the device: summed in float64 (as Python floats would be), read
    # back only when printing, at a stop and at the end of the epoch, so a step never waits for the GPU.
    names = progress.names if progress is not None else None
    sums = progress.sums if progress is not None else None
    last = first_bad = bad_values = None
    count = 0   # iterations in this call (the rate); done + count in the epoch
    start = last_time = time.perf_counter()
    data_time = 0.0

    def read_back() -> dict[str, float]:
        """The one host sync: the latest step's values; stops the run if any step so far was non-finite."""
        if int(first_bad) >= 0:
            raise _non_finite_error(epoch, int(first_bad), dict(zip(names, bad_values.tolist())))
        return dict(zip(names, last.tolist()))

    for i, (views, _) in enumerate(loader, start=done):   # views: (im_q, im_k), or with BINGO (im_q, im_k, im_bag)
        data_time += time.perf_counter() - last_time
        im_q, im_k, *im_bag = (_batch_to(view, device, channels_last) for view in views)
        out = training_step(model, optimizer, im_q, im_k, scaler, autocast_dtype, im_bag[0] if im_bag else None)
        logged = out.logged()
        if names is None:
            names = list(logged)
        if first_bad is None:
            first_bad = torch.full((), -1, dtype=torch.long, device=out.loss.device)
        last = torch.stack([v.detach().double() for v in logged.values()])
        sums = last if sums is None else sums + last
        newly_bad = (first_bad < 0) & ~torch.isfinite(out.loss)
        first_bad = torch.where(newly_bad, i, first_bad)
        bad_values = last if bad_values is None else torch.where(newly_bad, last, bad_values)
        count += 1
        if print_freq and (i % print_freq == 0 or i + 1 == num_batches):
            step = read_back()
            elapsed = time.perf_counter() - start
            images_per_s = count * im_q.shape[0] * world / max(elapsed, 1e-9)
            eta = (num_batches - i - 1) * elapsed / count if num_batches else float("nan")
            extra_text = ""
            if out.mgd is not None:
                extra_text = f" MGD {step['mgd']:.4f} (" + " ".join(
                    f"{step[f'mgd_{name}']:.3g}" for name in out.mgd_per_stage) + ")"
            extra_text += "".join(f" {name} {step[name]:.4g}" for name in out.embedding)
            logger.info(
                f"epoch {epoch} [{i + 1}/{num_batches or '?'}] eta {format_duration(eta) if num_batches else '?'} "
                f"{images_per_s:.1f} img/s data {data_time / count:.3f}s InfoNCE {step['infonce']:.4f}{extra_text} "
                f"acc@1 {step['acc1']:.1f} lr {optimizer.param_groups[0]['lr']:.4g} "
                f"{diagnostics_text(step)}"
            )
            if metrics is not None:
                metrics.log("train", epoch=epoch, iteration=i, images_per_s=images_per_s, **step)
        if stop is not None and i + 1 != num_batches and (signals := stop.poll()):
            read_back()  # never a checkpoint of a poisoned state
            raise RunStopped(signals, epoch, EpochProgress(i + 1, names, sums))
        last_time = time.perf_counter()
    if count == 0:
        raise RuntimeError("the training loader yielded no batch: the dataset is smaller than one batch "
                           "(-b/--batch-size) on each process")
    read_back()  # before the caller saves a checkpoint: never one of a poisoned state
    elapsed = time.perf_counter() - start
    means = dict(zip(names, (sums / (done + count)).tolist()))
    means["images_per_s"] = count * im_q.shape[0] * world / max(elapsed, 1e-9)
    return means
