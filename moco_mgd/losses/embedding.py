"""Embedding-level distillation: the losses on the final embedding that a run turns on.

MGD (:mod:`moco_mgd.losses.mgd_distiller`) distils intermediate feature maps; these distil the MoCo-v2
embedding (the output of the MLP head) and combine with MGD and with each other:

* ``cckd``: correlation congruence (:mod:`moco_mgd.losses.cckd`), over the
  global batch: the student embeddings of every rank are gathered with their gradient;
* ``disco``: embedding regression (:mod:`moco_mgd.losses.disco`), on the query
  view, or on both views (a second forward of the student's query encoder and of the
  teacher on the key view);
* ``seed``: similarity-distribution distillation (:mod:`moco_mgd.losses.seed`),
  against its own queue of teacher embeddings;
* ``bingo``: bag-of-instances distillation (:mod:`moco_mgd.losses.bingo`): the student's
  embeddings of the anchor, of a member of its bag and of their CutMix, each contrasted with the
  teacher's embeddings of anchor and member against its own queue of teacher embeddings.

All of them read the teacher's embedding of the query view from the one teacher forward
that MGD runs anyway (the teacher keeps its MoCo-v2 head for this); only DisCo's second
view and BINGO's member view cost another teacher pass. The student's embedding is the query ``q`` of the MoCo
forward, before normalisation.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from moco_mgd.runtime import distributed
from moco_mgd.losses.cckd import KERNELS, correlation_congruence_loss
from moco_mgd.losses.disco import embedding_regression_loss
from moco_mgd.losses.bingo import bingo_loss
from moco_mgd.losses.seed import TeacherEmbeddingQueue, similarity_distribution_loss

__all__ = ["EMBEDDING_LOSSES", "BagViews", "EmbeddingDistiller"]

EMBEDDING_LOSSES = ("cckd", "disco", "seed", "bingo")


class BagViews(NamedTuple):
    """BINGO's extra views of one batch: the embeddings of each anchor's bag member, by the student (with
    gradient) and the teacher, and the student's of the anchor/member CutMix (None without the mix) with
    the anchor's share of it."""

    student_member: torch.Tensor
    teacher_member: torch.Tensor
    student_mix: torch.Tensor | None = None
    mix_lambda: float | None = None


class EmbeddingDistiller(nn.Module):
    """The weighted sum of the embedding losses whose weight is positive.

    Args:
        student_dim: size of the student's embedding (``--moco-dim``).
        teacher_dim: size of the teacher's embedding (its head's output).
        cckd_weight, cckd_kernel, cckd_gamma, cckd_order: CCKD's weight and kernel.
        disco_weight: DisCo's weight (on the batch mean; DisCo's own code is 32 on this scale).
        disco_both_views: DisCo on the key view too (a second student and teacher forward).
        seed_weight, seed_queue, seed_t, seed_teacher_t: SEED's weight, queue size and
            student / teacher temperatures.
        bingo_weight, bingo_queue, bingo_t: BINGO's weight, queue of teacher embeddings and temperature.
        bingo_pair_weights: the weights of a query's own and its pair's teacher embedding (BINGO: 0.5, 0.5),
            used from epoch ``bingo_warmup_epochs`` on; before it, (1, 0).
        bingo_mix: BINGO's third query, the CutMix of anchor and member.

    Raises:
        ValueError: a negative weight, no loss turned on, or DisCo / SEED between embeddings
            of different sizes.
    """

    def __init__(self, student_dim: int, teacher_dim: int, cckd_weight: float = 0.0, cckd_kernel: str = "rbf-taylor",
                 cckd_gamma: float = 0.4, cckd_order: int = 2, disco_weight: float = 0.0,
                 disco_both_views: bool = False, seed_weight: float = 0.0, seed_queue: int = 65536,
                 seed_t: float = 0.2, seed_teacher_t: float = 1e-4, bingo_weight: float = 0.0,
                 bingo_queue: int = 65536, bingo_t: float = 0.2, bingo_pair_weights: tuple[float, float] = (0.5, 0.5),
                 bingo_warmup_epochs: int = 11, bingo_mix: bool = True):
        super().__init__()
        self.weights = {"cckd": float(cckd_weight), "disco": float(disco_weight), "seed": float(seed_weight),
                        "bingo": float(bingo_weight)}
        for name, weight in self.weights.items():
            if not weight >= 0:
                raise ValueError(f"--{name}-weight {weight}: a loss weight must be >= 0 (0 turns the loss off)")
        if not any(self.weights.values()):
            raise ValueError("no embedding loss is on: give --cckd-weight, --disco-weight, --seed-weight or "
                             "--bingo-weight a positive value")
        if cckd_kernel not in KERNELS:
            raise ValueError(f"unknown --cckd-kernel {cckd_kernel!r}: choose one of {', '.join(KERNELS)}")
        for name in ("disco", "seed", "bingo"):
            if self.weights[name] and student_dim != teacher_dim:
                raise ValueError(f"--{name}-weight compares embeddings, but the student's has {student_dim} "
                                 f"dimensions (--moco-dim) and the teacher's {teacher_dim}: set --moco-dim "
                                 f"{teacher_dim}")
        self.cckd_kernel, self.cckd_gamma, self.cckd_order = cckd_kernel, float(cckd_gamma), int(cckd_order)
        self.disco_both_views = bool(disco_both_views)
        self.seed_t, self.seed_teacher_t = float(seed_t), float(seed_teacher_t)
        self.seed_queue = TeacherEmbeddingQueue(teacher_dim, seed_queue) if self.weights["seed"] else None
        if len(bingo_pair_weights) != 2 or min(bingo_pair_weights) < 0 or bingo_warmup_epochs < 0 or not bingo_t > 0:
            raise ValueError(f"BINGO needs two weights >= 0 (--bingo-pair-weights, got {list(bingo_pair_weights)}), "
                             f"--bingo-warmup-epochs >= 0 (got {bingo_warmup_epochs}) and --bingo-t > 0 (got {bingo_t})")
        self.bingo_t, self.bingo_mix = float(bingo_t), bool(bingo_mix)
        self.bingo_pair_weights = tuple(float(w) for w in bingo_pair_weights)
        self.bingo_warmup_epochs = int(bingo_warmup_epochs)
        self.bingo_queue = TeacherEmbeddingQueue(teacher_dim, bingo_queue) if self.weights["bingo"] else None
        self.epoch = 0   # set by the training loop at each epoch's start (BINGO's warm-up)

    @property
    def active(self) -> list[str]:
        """The losses that are on, in :data:`EMBEDDING_LOSSES` order."""
        return [name for name in EMBEDDING_LOSSES if self.weights[name]]

    @property
    def needs_key_view(self) -> bool:
        """Whether a step must also encode the key view with the student and the teacher."""
        return bool(self.weights["disco"]) and self.disco_both_views

    @property
    def needs_bag_view(self) -> bool:
        """Whether a step needs BINGO's view of a bag member (and, with the mix, the CutMix view)."""
        return bool(self.weights["bingo"])

    def bingo_weights_now(self) -> tuple[float, float]:
        """The own / pair weights of this epoch: (1, 0) in the warm-up, as the released code."""
        return (1.0, 0.0) if self.epoch < self.bingo_warmup_epochs else self.bingo_pair_weights

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, student_key_view: torch.Tensor | None = None,
                teacher_key_view: torch.Tensor | None = None, bag: BagViews | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The combined loss of one batch (this rank's images).

        Args:
            student: ``[n, student_dim]`` the student's query embeddings (with gradient).
            teacher: ``[n, teacher_dim]`` the teacher's embeddings of the same query views.
            student_key_view, teacher_key_view: the same for the key views; needed when
                :attr:`needs_key_view`.
            bag: BINGO's views; needed when :attr:`needs_bag_view`.

        Returns:
            ``(loss, parts)``: the weighted sum, and each active loss unweighted (detached).
            SEED's and BINGO's queues receive this step's teacher embeddings (of every rank).
        """
        if self.needs_key_view and (student_key_view is None or teacher_key_view is None):
            raise ValueError("DisCo on both views needs the student's and the teacher's embeddings of the key view")
        if self.needs_bag_view and bag is None:
            raise ValueError("BINGO needs the embeddings of each anchor's bag member (BagViews)")
        parts: dict[str, torch.Tensor] = {}
        if self.weights["cckd"]:
            # The correlation is over the global batch: every rank builds the same n x n matrices.
            parts["cckd"] = correlation_congruence_loss(
                distributed.all_gather_with_grad(student), distributed.all_gather_cat(teacher.detach()),
                self.cckd_kernel, self.cckd_gamma, self.cckd_order)
        if self.weights["disco"]:
            parts["disco"] = embedding_regression_loss(student, teacher)
            if self.needs_key_view:
                parts["disco"] = parts["disco"] + embedding_regression_loss(student_key_view, teacher_key_view)
        if self.weights["seed"]:
            parts["seed"] = similarity_distribution_loss(student, teacher, self.seed_queue.queue, self.seed_t,
                                                         self.seed_teacher_t)
            self.seed_queue.enqueue(teacher.detach())
        if self.weights["bingo"]:
            parts["bingo"] = bingo_loss(student, bag.student_member, teacher, bag.teacher_member,
                                        self.bingo_queue.queue, self.bingo_t, self.bingo_weights_now(),
                                        bag.student_mix, bag.mix_lambda)
            self.bingo_queue.enqueue(teacher.detach())
        loss = sum(self.weights[name] * value for name, value in parts.items())
        return loss, {name: value.detach() for name, value in parts.items()}
