"""One epoch of MoCo-v2 (+ MGD) training, the learning-rate and matching schedules.

Nothing here parses arguments or starts processes: the entry scripts do, and pass
explicit values.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from moco_mgd.runtime import distributed
from moco_mgd.losses.mgd_distiller import MGDistiller, collect_matching_costs
from moco_mgd.losses.embedding import EmbeddingDistiller
from moco_mgd.runtime.logs import MetricsLog, format_duration
from moco_mgd.models.moco import contrastive_diagnostics
from moco_mgd.models.taps import FeatureTaps

__all__ = [
    "AUTHORS_MATCHING_EPOCHS",
    "NonFiniteLossError",
    "Distillation",
    "learning_rate",
    "set_learning_rate",
    "matching_epochs",
    "StepOutput",
    "diagnostics_text",
    "training_step",
    "train_one_epoch",
    "run_matching_update",
]

logger = logging.getLogger("moco_mgd")

# The authors' MoCo-v2 runs re-match before training (0) and after these epochs.
AUTHORS_MATCHING_EPOCHS = (0, 1, 2, 3, 6, 9, 15, 26, 43, 74, 126)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last checkpoint on disk is the last good state."""


@dataclass
class Distillation:
    """What a training step needs to learn from a frozen teacher.

    One teacher forward on the query view serves everything: its stage features (through
    ``teacher_taps``) feed MGD, its output (the embedding, when the teacher kept its head)
    feeds the embedding losses. ``distiller`` (MGD, may be wrapped in DDP) and ``embedding``
    are each optional; the taps are only needed with MGD.
    """

    teacher: nn.Module
    distiller: nn.Module | None = None
    student_taps: FeatureTaps | None = None
    teacher_taps: FeatureTaps | None = None
    embedding: EmbeddingDistiller | None = None

    @property
    def core(self) -> MGDistiller | None:
        """The MGD distiller itself (not its DDP wrapper), or None without MGD."""
        return getattr(self.distiller, "module", self.distiller)

    def clear_taps(self) -> None:
        """Forget features recorded by a forward that is not a training step (kNN, a second view)."""
        for taps in (self.student_taps, self.teacher_taps):
            if taps is not None:
                taps.clear()


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
    distill: Distillation | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> StepOutput:
    """One SGD step of MoCo-v2 (wrapped in DDP or not), plus what ``distill`` adds.

    InfoNCE of the query/key views; with ``distill``, one teacher forward on the query view
    (under ``no_grad``), then MGD's loss on the student's stage features of the same forward
    and the embedding losses on its query embedding, added to InfoNCE.

    Raises:
        NonFiniteLossError: before the step is taken, naming every loss.
    """
    embedding = distill is not None and distill.embedding is not None
    key_view = embedding and distill.embedding.needs_key_view
    mgd_loss = per_stage = None
    embedding_parts: dict[str, torch.Tensor] = {}
    with torch.autocast(im_q.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        output = model(im_q, im_k, query_on_key_view=key_view)
        logits, labels = output.logits, output.labels
        infonce = nn.functional.cross_entropy(logits.float(), labels)
        loss = infonce
        if distill is not None:
            with torch.no_grad():
                teacher_out = distill.teacher(im_q)
            if distill.distiller is not None:
                mgd_loss, per_stage = distill.distiller(distill.student_taps.pop(), distill.teacher_taps.pop())
                loss = loss + mgd_loss
            if embedding:
                teacher_key_view = None
                if key_view:  # DisCo on both views: the one extra teacher pass
                    with torch.no_grad():
                        teacher_key_view = distill.teacher(im_k)
                    distill.clear_taps()
                embedding_loss, embedding_parts = distill.embedding(output.query, teacher_out,
                                                                    output.query_key_view, teacher_key_view)
                loss = loss + embedding_loss
    out = StepOutput(loss.detach(), infonce.detach(), (logits.detach().argmax(1) == labels).float().mean() * 100,
                     None if mgd_loss is None else mgd_loss.detach(), per_stage, embedding_parts,
                     contrastive_diagnostics(output, getattr(model, "module", model).T))
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
    distill: Distillation | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    print_freq: int = 10,
    metrics: MetricsLog | None = None,
) -> dict[str, float]:
    """Train MoCo (wrapped in DDP or not) for one pass over ``loader`` (:func:`training_step` each batch).

    Returns:
        Epoch means: ``loss``, ``infonce``, ``mgd`` (+ ``mgd_<stage>``), each embedding loss
        by name (unweighted), ``acc1``, the diagnostics of
        :func:`~moco_mgd.models.moco.contrastive_diagnostics` and ``images_per_s``.

    Raises:
        NonFiniteLossError: naming the epoch and iteration.
    """
    model.train()
    mgd_core = distill.core if distill is not None else None
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
            out = training_step(model, optimizer, im_q, im_k, distill, scaler, autocast_dtype)
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


def run_matching_update(
    distill: Distillation,
    loader: Iterable,
    max_images: int | None,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    epoch: int,
    metrics: MetricsLog | None = None,
) -> None:
    """One coordinate-descent matching step: statistics on this rank's shard, then solve."""
    start = time.perf_counter()
    mgd = distill.core
    seen = collect_matching_costs(mgd, distill.student_taps, distill.teacher_taps, loader,
                                  max_images=max_images, device=device, autocast_dtype=autocast_dtype)
    reports = mgd.update_matching()
    seconds = time.perf_counter() - start
    logger.info(
        f"matching after {epoch} epoch(s): {reports[0].num_images} images ({seen} on this rank) in {seconds:.1f}s; "
        + "; ".join(f"{r.stage} cost {r.cost:.4f} changed {r.changed}" for r in reports)
    )
    if metrics is not None:  # the whole assignment, for the stability figure (a few KB per update)
        metrics.log("matching", epoch=epoch, seconds=seconds, num_images=reports[0].num_images,
                    cost={r.stage: r.cost for r in reports}, changed={r.stage: r.changed for r in reports},
                    assignment={r.stage: a for r, a in zip(reports, mgd.assignments())})
