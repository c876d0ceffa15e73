"""Everything that trains in a pretraining run, and what it learns from a frozen teacher.

:class:`PretrainModel` is the one module DDP wraps: MoCo and the :class:`Distillation`, whose forward
returns every loss. :class:`Distillation` holds the teacher (outside the module tree: it does not
train), the losses added to InfoNCE and MGD's matching schedule. With distillation off it has no
teacher, adds no loss, keeps an empty state and never matches, so the training loop has no case of
its own for it.

One training step, as values::

    losses = ddp_model(im_q, im_k)    # teacher targets (no grad), MoCo forward, InfoNCE + MGD + embedding losses
    losses.loss.backward()
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn as nn

from moco_mgd.losses.bingo import cutmix
from moco_mgd.losses.embedding import BagViews, EmbeddingDistiller
from moco_mgd.losses.mgd_distiller import MGDistiller
from moco_mgd.training.matching import collect_matching_costs
from moco_mgd.models.moco import MoCo, MoCoOutput, infonce
from moco_mgd.checkpoints.formats import load_frozen_teacher
from moco_mgd.models.resnet import head_dim, resnet_trunk
from moco_mgd.models.stages import forward_with_stages
from moco_mgd.runtime.logs import MetricsLog

__all__ = ["TeacherTargets", "StepLosses", "Distillation", "PretrainModel", "own_random_stream"]

logger = logging.getLogger("moco_mgd")

# The distillation's streams are seeded from the run's --seed plus these offsets: distinct from
# the global stream's seed, so no draw of the teacher or of random drop repeats one of the student's.
BUILD_SEED_OFFSET = 1_000_003
DRAWS_SEED_OFFSET = 2_000_003
BAG_DRAWS_SEED_OFFSET = 3_000_017


@contextmanager
def own_random_stream(seed: int, device: torch.device):
    """Run the block on torch's global RNG seeded from ``seed``, and leave the global RNG (CPU and
    ``device``) as it was before the block."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed + BUILD_SEED_OFFSET)
        yield


class TeacherTargets(NamedTuple):
    """The frozen teacher's forward on one batch.

    ``output``: its output on the query view (the embedding, when it kept its MoCo-v2 head);
    ``stages``: its four pre-ReLU stage features on the query view, with MGD, else None;
    ``key_view_output``: its output on the key view, for DisCo on both views, else None;
    ``bag_output``: its output on the view of each image's bag member, for BINGO, else None.
    """

    output: torch.Tensor
    stages: list[torch.Tensor] | None = None
    key_view_output: torch.Tensor | None = None
    bag_output: torch.Tensor | None = None


class StepLosses(NamedTuple):
    """What :class:`PretrainModel` computed for one batch (the loss with gradient, the rest as parts)."""

    loss: torch.Tensor
    infonce: torch.Tensor
    moco: MoCoOutput
    mgd: torch.Tensor | None = None            # MGD's loss (with gradient), when on
    mgd_per_stage: dict[str, torch.Tensor] = {}  # its weighted loss per stage, by stage name (detached)
    embedding: dict[str, torch.Tensor] = {}    # each embedding loss unweighted (detached)
    temperature: float | None = None           # MoCo's T, which divided the logits (for the diagnostics)


class Distillation(nn.Module):
    """What a run learns from a frozen teacher: the teacher, the losses added to InfoNCE, MGD's
    matching schedule and the random source of its per-step draws, in one object.

    Args:
        teacher: the frozen teacher, or None (distillation off).
        mgd: MGD on the stage features, or None.
        embedding: the embedding losses on the query embedding, or None.
        match_epochs: epochs after which MGD's matching is re-solved (0: before training).
        fixed_matching: MGD without matching (``--mgd-schedule none``): channels assigned in order.
        generator: the random source of the per-step draws (random drop), on the training device;
            checkpointed with the run.
        bag_generator: the CPU random source of BINGO's CutMix boxes, the same on every rank;
            checkpointed with the run.

    ``mgd`` and ``embedding`` are submodules (MGD's student BNs and the embedding heads train, inside
    the one DDP-wrapped :class:`PretrainModel`). The teacher is not: it never trains, so ``train()``,
    ``state_dict()`` and DDP's buffer broadcast must not reach it.

    Exact pairing: nothing here draws from the global random stream, which the student's
    initial weights and MoCo's shuffle-BN permutations come from. A baseline and a distilled run
    of one seed therefore see the same images, augmentations, initial weights and shuffle-BN
    draws; the teacher, the embedding heads and random drop each draw from a stream of their own.
    """

    def __init__(self, teacher: nn.Module | None = None, mgd: MGDistiller | None = None,
                 embedding: EmbeddingDistiller | None = None, match_epochs: Iterable[int] = (),
                 fixed_matching: bool = False, generator: torch.Generator | None = None,
                 bag_generator: torch.Generator | None = None):
        super().__init__()
        if teacher is None and (mgd is not None or embedding is not None):
            raise ValueError("distillation losses need a teacher")
        object.__setattr__(self, "teacher", teacher)   # outside the module tree (see the class doc)
        self.mgd = mgd
        self.embedding = embedding
        self.match_epochs = list(match_epochs)
        self.fixed_matching = fixed_matching
        self.generator = generator
        self.bag_generator = bag_generator if bag_generator is not None else torch.Generator()
        self.bags_sha256: str | None = None   # BINGO's bag file, recorded in the checkpoint

    @classmethod
    def build(cls, student: nn.Module, device: torch.device, *, teacher_arch: str, teacher_checkpoint: str,
              stem: str, mgd: dict | None, embedding: dict | None, embedding_dim: int, match_epochs: Iterable[int],
              fixed_matching: bool, memory_format: torch.memory_format = torch.contiguous_format,
              seed: int = 0) -> Distillation:
        """The distillation toward ``student`` (MoCo's query encoder); off without ``teacher_checkpoint``.

        Args:
            teacher_arch, teacher_checkpoint, stem: the frozen teacher ("" checkpoint: no distillation).
            mgd: :class:`MGDistiller`'s options, or None for no MGD.
            embedding: :class:`EmbeddingDistiller`'s options, or None for no embedding losses (the teacher
                then loses its head).
            embedding_dim: the student's embedding size.
            match_epochs, fixed_matching: as the class's.
            seed: everything built here draws from streams seeded by it alone (see the class doc):
                the global stream leaves this call as it came in.
        """
        if not teacher_checkpoint:
            return cls()
        with own_random_stream(seed, device):
            # The teacher's architecture is initialised before its weights are loaded, and the
            # embedding heads and SEED's queue are drawn: none of it may move the student's stream.
            teacher = load_frozen_teacher(teacher_arch, teacher_checkpoint, stem=stem, with_head=embedding is not None)
            teacher = teacher.to(device, memory_format=memory_format)
            mgd_loss = embedding_loss = None
            if mgd is not None:
                mgd_loss = MGDistiller.from_models(teacher, student, **mgd).to(device)
            if embedding is not None:
                embedding_loss = EmbeddingDistiller(embedding_dim, head_dim(teacher), **embedding).to(device)
        generator = torch.Generator(device=device).manual_seed(seed + DRAWS_SEED_OFFSET)
        return cls(teacher, mgd_loss, embedding_loss, match_epochs, fixed_matching=fixed_matching, generator=generator,
                   bag_generator=torch.Generator().manual_seed(seed + BAG_DRAWS_SEED_OFFSET))

    @property
    def needs_stages(self) -> bool:
        return self.mgd is not None

    @property
    def needs_key_view(self) -> bool:
        return self.embedding is not None and self.embedding.needs_key_view

    @property
    def needs_bag_view(self) -> bool:
        return self.embedding is not None and self.embedding.needs_bag_view

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch (BINGO's warm-up depends on it)."""
        if self.embedding is not None:
            self.embedding.epoch = epoch

    def mixed_view(self, im_q: torch.Tensor, im_bag: torch.Tensor) -> tuple[torch.Tensor | None, float | None]:
        """BINGO's CutMix of the anchors' query view and their members' view, or (None, None) without it."""
        if not self.embedding.bingo_mix:
            return None, None
        return cutmix(im_q, im_bag, self.bag_generator)

    def describe(self, teacher_arch: str) -> str:
        """For the run's first log line."""
        mgd = f"from {teacher_arch} {self.mgd.reducer}" if self.mgd is not None else "off"
        embedding = ", ".join(self.embedding.active) if self.embedding is not None else "off"
        return f"MGD {mgd}; embedding losses {embedding}"

    @torch.no_grad()
    def teacher_targets(self, im_q: torch.Tensor, im_k: torch.Tensor,
                        im_bag: torch.Tensor | None = None) -> TeacherTargets | None:
        """The teacher's forward on this batch: what the losses compare the student with (None when off)."""
        if self.teacher is None:
            return None
        if self.needs_stages:
            output, stages = forward_with_stages(self.teacher, im_q)
        else:
            output, stages = self.teacher(im_q), None
        key_view_output = self.teacher(im_k) if self.needs_key_view else None  # DisCo's extra pass
        bag_output = self.teacher(im_bag) if self.needs_bag_view else None     # BINGO's extra pass
        return TeacherTargets(output, stages, key_view_output, bag_output)

    def forward(self, moco: MoCoOutput, targets: TeacherTargets | None, infonce: torch.Tensor,
                bag: BagViews | None = None) -> StepLosses:
        """InfoNCE plus the losses of what the student computed (``moco``, and ``bag`` for BINGO)
        against the teacher's ``targets``."""
        loss, mgd_loss, per_stage, parts = infonce, None, {}, {}
        if self.mgd is not None:
            mgd_loss, stage_losses = self.mgd(moco.query_stages, targets.stages, self.generator)
            per_stage = dict(zip(self.mgd.stage_names, stage_losses.unbind()))
            loss = loss + mgd_loss
        if self.embedding is not None:
            embedding_loss, parts = self.embedding(moco.query, targets.output, moco.query_key_view,
                                                   targets.key_view_output, bag)
            loss = loss + embedding_loss
        return StepLosses(loss, infonce, moco, mgd_loss, per_stage, parts)

    def teacher_trunk(self) -> nn.Module | None:
        """The teacher without its head, for the kNN reference line (None when off)."""
        return resnet_trunk(self.teacher) if self.teacher is not None else None

    # ---- checkpointed state: the checkpoint's "mgd", "embedding" and "distillation_rng" entries --
    def checkpoint_entries(self) -> dict:
        return {"mgd": self.mgd.state_dict() if self.mgd is not None else None,
                "embedding": self.embedding.state_dict() if self.embedding is not None else None,
                "distillation_rng": self.generator.get_state() if self.generator is not None else None,
                **({"bag_rng": self.bag_generator.get_state(), "bingo_bags_sha256": self.bags_sha256}
                   if self.needs_bag_view else {})}

    def load_checkpoint_entries(self, state: dict) -> None:
        if self.mgd is not None:
            self.mgd.load_state_dict(state["mgd"])
        if self.embedding is not None and state.get("embedding"):
            self.embedding.load_state_dict(state["embedding"])
        if self.generator is not None and state.get("distillation_rng") is not None:
            self.generator.set_state(state["distillation_rng"].cpu())
        if state.get("bag_rng") is not None:
            self.bag_generator.set_state(state["bag_rng"].cpu())

    # ---- MGD's matching schedule: coordinate descent between training epochs -------------
    def prepare(self, student: nn.Module, loader: Iterable | None, device: torch.device,
                autocast_dtype: torch.dtype | None, metrics: MetricsLog | None = None) -> None:
        """Before the first epoch of a new run: the first matching (or the fixed one)."""
        if self.mgd is None or self.mgd.is_matched:
            return
        if self.fixed_matching:
            self.mgd.set_fixed_matching()
            logger.info("--mgd-schedule none: teacher channels assigned in order, never matched")
        else:
            self._update_matching(student, loader, device, autocast_dtype, 0, metrics)

    def after_epoch(self, epochs_done: int, student: nn.Module, loader: Iterable | None, device: torch.device,
                    autocast_dtype: torch.dtype | None, metrics: MetricsLog | None = None) -> None:
        """Re-solve the matching when the schedule says so after ``epochs_done`` epochs."""
        if self.mgd is not None and epochs_done in self.match_epochs:
            self._update_matching(student, loader, device, autocast_dtype, epochs_done, metrics)

    def _update_matching(self, student: nn.Module, loader: Iterable, device: torch.device,
                         autocast_dtype: torch.dtype | None, epoch: int, metrics: MetricsLog | None) -> None:
        """One coordinate-descent matching step: statistics on this rank's shard, then solve."""
        start = time.perf_counter()
        mgd = self.mgd
        seen = collect_matching_costs(mgd, student, self.teacher, loader, device=device,
                                      autocast_dtype=autocast_dtype)
        reports = mgd.update_matching()
        seconds = time.perf_counter() - start
        logger.info(
            f"matching after {epoch} epoch(s): {reports[0].num_images} images ({seen} on this rank) in "
            f"{seconds:.1f}s; " + "; ".join(f"{r.stage} cost {r.cost:.4f} changed {r.changed}" for r in reports)
        )
        if metrics is not None:  # the whole assignment, for the stability figure (a few KB per update)
            metrics.log("matching", epoch=epoch, seconds=seconds, num_images=reports[0].num_images,
                        cost={r.stage: r.cost for r in reports}, changed={r.stage: r.changed for r in reports},
                        assignment={r.stage: a for r, a in zip(reports, mgd.assignments())})


class PretrainModel(nn.Module):
    """Everything that trains, in one module for one DDP wrapper: MoCo and the distillation.

    ``forward(im_q, im_k)`` runs the teacher on the batch (no gradient; nothing when distillation is
    off), MoCo (with the query view's stage features when MGD is on, and the query encoder on the
    key view when DisCo needs it), InfoNCE and the distillation losses, and returns
    :class:`StepLosses`. The checkpoint keeps MoCo's layout: save ``moco.state_dict()`` and
    ``distillation.checkpoint_entries()``, not this module's state.
    """

    def __init__(self, moco: MoCo, distillation: Distillation | None = None):
        super().__init__()
        self.moco = moco
        self.distillation = distillation if distillation is not None else Distillation()

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, im_bag: torch.Tensor | None = None) -> StepLosses:
        distillation = self.distillation
        if distillation.needs_bag_view and im_bag is None:
            raise ValueError("BINGO needs each anchor's bag-member view: the loader must yield (im_q, im_k, im_bag)")
        targets = distillation.teacher_targets(im_q, im_k, im_bag)
        moco = self.moco(im_q, im_k, query_on_key_view=distillation.needs_key_view,
                         with_stages=distillation.needs_stages)
        bag = None
        if distillation.needs_bag_view:   # BINGO: the student on the member's view and on the CutMix
            mixed, share = distillation.mixed_view(im_q, im_bag)
            bag = BagViews(self.moco.encoder_q(im_bag), targets.bag_output,
                           self.moco.encoder_q(mixed) if mixed is not None else None, share)
        return distillation(moco, targets, infonce(moco), bag)._replace(temperature=self.moco.T)
