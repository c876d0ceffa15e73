"""The MGD distiller: matching state, coordinate-descent updates and the training loss.

It owns what MGD adds to a training run (paper section 3.4): per stage, the teacher's
margins, the current assignment, and a BatchNorm on the student feature (as the authors'
code has). It owns neither network: the stage features are what
:func:`moco_mgd.models.stages.forward_with_stages` returns, so the teacher stays out of DDP
and out of the student's checkpoint.

Coordinate descent::

    distiller = MGDistiller.from_models(teacher, student_encoder)
    collect_matching_costs(distiller, student, teacher, loader, max_images)   # moco_mgd.training.matching
    distiller.update_matching()              # solve Eq. 9 on every stage
    ... train: loss = task_loss + distiller(student_stages, teacher_stages)[0] ...
    (re-collect and update on the matching schedule)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from moco_mgd.runtime import distributed

from moco_mgd.losses import mgd
from moco_mgd.models.stages import STAGES, pre_relu_bns, stage_channels

__all__ = ["DEFAULT_STAGE_WEIGHTS", "StageMatching", "MGDistiller"]

# The authors weight the stages 1/8, 1/4, 1/2, 1 from the first to the last: early maps
# are larger, and their summed loss would otherwise dominate.
DEFAULT_STAGE_WEIGHTS = (1 / 8, 1 / 4, 1 / 2, 1.0)


def _no_statistics(method: str) -> RuntimeError:
    return RuntimeError(f"no matching statistics: accumulate() at least one batch (collect_matching_costs) "
                        f"before {method}()")


@dataclass(frozen=True)
class StageMatching:
    """What one matching update did at one stage."""

    stage: str
    cost: float          # mean distance of a matched (student, teacher) pair in one image
    changed: int         # teacher channels whose student changed since the previous matching
    num_images: int


class MGDistiller(nn.Module):
    """Matching Guided Distillation between the four ResNet stages of teacher and student.

    Args:
        student_channels: channels of the student's tapped features, per stage.
        teacher_channels: channels of the teacher's tapped features, per stage.
        margins: the teacher's Eq. 4 margins, ``Tensor[Ct]`` per stage.
        reducer: ``"amp"`` (default), ``"rd"``, ``"sm"``, ``"max"`` or ``"avg"``. ``"sm"``
            uses sparse (one-to-one) matching, the others the balanced matching of Eq. 8.
        loss_factor: the summed loss is divided by ``batch_size * loss_factor``.
        stage_weights: weight of each stage's loss.
        student_bn: put a BatchNorm on each student feature before the loss.
        distance: channel distance for the matching, see :func:`moco_mgd.losses.mgd.channel_cost`.
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        margins: Sequence[torch.Tensor],
        reducer: str = "amp",
        loss_factor: float = 1e4,
        stage_weights: Sequence[float] = DEFAULT_STAGE_WEIGHTS,
        student_bn: bool = True,
        distance: str = "cosine",
    ):
        super().__init__()
        n = len(student_channels)
        if not (len(teacher_channels) == len(margins) == len(stage_weights) == n):
            raise ValueError(
                f"need one entry per stage: {n} student, {len(teacher_channels)} teacher "
                f"channel counts, {len(margins)} margins, {len(stage_weights)} stage weights"
            )
        if reducer not in mgd.REDUCERS:
            raise ValueError(f"unknown reduction method {reducer!r}: choose one of {mgd.REDUCERS}")
        if distance not in mgd.DISTANCES:
            raise ValueError(f"unknown distance {distance!r}: choose one of {mgd.DISTANCES}")
        if not loss_factor > 0:
            raise ValueError(f"loss_factor must be positive, got {loss_factor}")
        self.stage_names = list(STAGES[:n]) if n <= len(STAGES) else [f"stage{i}" for i in range(n)]
        for name, cs, ct, m in zip(self.stage_names, student_channels, teacher_channels, margins):
            if cs > ct:
                raise ValueError(
                    f"stage {name}: the student has more channels than the teacher ({cs} > {ct}); "
                    f"MGD needs a teacher at least as wide as the student at every stage"
                )
            if m.shape != (ct,):
                raise ValueError(f"stage {name}: margin has shape {tuple(m.shape)}, expected ({ct},)")
        self.student_channels = [int(c) for c in student_channels]
        self.teacher_channels = [int(c) for c in teacher_channels]
        self.reducer = reducer
        self.loss_factor = float(loss_factor)
        self.stage_weights = [float(w) for w in stage_weights]
        self.distance = distance
        self.student_bns = nn.ModuleList(
            nn.BatchNorm2d(c) if student_bn else nn.Identity() for c in self.student_channels
        )
        self.register_buffer("num_matchings", torch.zeros((), dtype=torch.long))
        for i, (cs, ct, m) in enumerate(zip(self.student_channels, self.teacher_channels, margins)):
            self.register_buffer(f"margin{i}", m.detach().float().clone())
            self.register_buffer(f"assignment{i}", torch.full((ct,), -1, dtype=torch.long))
            # Derived from the assignment once per matching, so the step does no host sync.
            self.register_buffer(f"_groups{i}", torch.zeros((cs, self._group_width(i)), dtype=torch.long),
                                 persistent=False)
            self.register_buffer(f"_group_margin{i}", torch.zeros(cs), persistent=False)
        # Mirrored on the host, so that the loss never reads num_matchings back from the device.
        self._matched = False
        self.register_load_state_dict_post_hook(lambda module, _keys: module._after_load())
        self.reset_costs()

    @classmethod
    def from_models(cls, teacher: nn.Module, student: nn.Module, **kwargs) -> MGDistiller:
        """Build from a loaded teacher (margins from its trained BNs) and a student ResNet."""
        return cls.from_teacher(teacher, stage_channels(student), **kwargs)

    @classmethod
    def from_teacher(cls, teacher: nn.Module, student_channels: Sequence[int], **kwargs) -> MGDistiller:
        """Build from a loaded teacher and the student's stage widths (no student network needed)."""
        margins = [mgd.bn_margin(bn) for bn in pre_relu_bns(teacher)]
        return cls(student_channels, stage_channels(teacher), margins, **kwargs)

    # --- matching ----------------------------------------------------------------------

    def _group_width(self, i: int) -> int:
        return 1 if self.reducer == "sm" else self.teacher_channels[i] // self.student_channels[i]

    def _solve(self, cost: torch.Tensor) -> torch.Tensor:
        return mgd.sparse_assignment(cost) if self.reducer == "sm" else mgd.balanced_assignment(cost)

    @property
    def is_matched(self) -> bool:
        return self._matched

    def _after_load(self) -> None:
        self._matched = int(self.num_matchings) > 0
        self._derive_groups()

    def assignments(self) -> list[torch.Tensor]:
        return [getattr(self, f"assignment{i}") for i in range(len(self.student_channels))]

    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self.student_channels))]

    def _derive_groups(self) -> None:
        if not self.is_matched:
            return
        for i, (a, m) in enumerate(zip(self.assignments(), self.margins())):
            groups = mgd.assignment_groups(a, self.student_channels[i]).to(a.device)
            getattr(self, f"_groups{i}").copy_(groups)
            getattr(self, f"_group_margin{i}").copy_(mgd.reduce_margin(m, groups))

    def reset_costs(self) -> None:
        """Forget accumulated matching statistics (they are never checkpointed)."""
        self._costs: list[torch.Tensor | None] = [None] * len(self.student_channels)
        self._num_images = 0

    def _check_stages(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> None:
        if len(student_feats) != len(self.student_channels) or len(teacher_feats) != len(self.student_channels):
            raise ValueError(f"expected {len(self.student_channels)} stage features from each network, "
                             f"got {len(student_feats)} student and {len(teacher_feats)} teacher")
        for name, s, t, cs, ct in zip(self.stage_names, student_feats, teacher_feats,
                                      self.student_channels, self.teacher_channels):
            if s.shape[1] != cs or t.shape[1] != ct:
                raise ValueError(f"stage {name}: features have {s.shape[1]}/{t.shape[1]} channels, "
                                 f"the distiller was built for {cs}/{ct} (student/teacher)")
            if s.shape[2:] != t.shape[2:]:
                raise ValueError(
                    f"stage {name}: student features are {tuple(s.shape[2:])} but teacher features "
                    f"are {tuple(t.shape[2:])}; feed both networks the same images and use the same "
                    f"stem (the small-image stem for both, or for neither)"
                )

    @torch.no_grad()
    def accumulate(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> None:
        """Add one batch's :func:`~moco_mgd.losses.mgd.channel_cost` to the running totals of every stage."""
        self._check_stages(student_feats, teacher_feats)
        for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
            # float64: 20k images of summed distances lose ties to float32 round-off.
            cost = mgd.channel_cost(s, t, self.distance).double()
            self._costs[i] = cost if self._costs[i] is None else self._costs[i] + cost
        self._num_images += student_feats[0].shape[0]

    def accumulated_costs(self) -> list[torch.Tensor]:
        """This rank's ``[Cs, Ct]`` float64 cost of every stage, summed over the images
        accumulated since the last reset (not yet over ranks: :meth:`update_matching` does that).

        For analysis, e.g. solving the matching on two halves of the data and comparing.
        """
        if self._num_images == 0:
            raise _no_statistics("accumulated_costs")
        return [c.clone() for c in self._costs]

    @torch.no_grad()
    def set_fixed_matching(self) -> None:
        """Use :func:`~moco_mgd.losses.mgd.fixed_assignment` on every stage instead of solving a matching."""
        for i, (cs, ct) in enumerate(zip(self.student_channels, self.teacher_channels)):
            getattr(self, f"assignment{i}").copy_(mgd.fixed_assignment(ct, cs, sparse=self.reducer == "sm"))
        self.num_matchings += 1
        self._matched = True
        self._derive_groups()

    @torch.no_grad()
    def update_matching(self) -> list[StageMatching]:
        """Solve every stage's matching from the accumulated costs (summed over all ranks).

        Rank 0 solves and broadcasts, so every rank holds the same assignment.

        Returns:
            One :class:`StageMatching` per stage.
        """
        device = self.margin0.device
        count = distributed.all_reduce_sum(torch.tensor([float(self._num_images)], device=device))
        num_images = int(count.item())
        if num_images == 0:
            raise _no_statistics("update_matching")
        reports = []
        for i, name in enumerate(self.stage_names):
            local = self._costs[i]
            cost = local.to(device) if local is not None else torch.zeros(
                self.student_channels[i], self.teacher_channels[i], dtype=torch.float64, device=device)
            distributed.all_reduce_sum(cost)
            if distributed.get_rank() == 0:
                assignment = self._solve(cost).to(device)
            else:
                assignment = torch.empty(self.teacher_channels[i], dtype=torch.long, device=device)
            distributed.broadcast(assignment, src=0)
            previous = getattr(self, f"assignment{i}")
            changed = int((previous != assignment).sum()) if self.is_matched else self.teacher_channels[i]
            matched = assignment >= 0
            total = cost[assignment[matched], torch.nonzero(matched).squeeze(1)].sum()
            previous.copy_(assignment)
            pairs = int(matched.sum())
            reports.append(StageMatching(name, float(total) / (num_images * pairs), changed, num_images))
        self.num_matchings += 1
        self._matched = True
        self._derive_groups()
        self.reset_costs()
        return reports

    # --- loss ----------------------------------------------------------------------------

    def forward(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The MGD loss of one batch.

        Args:
            student_feats: per stage ``[B, Cs, H, W]`` pre-ReLU student features (with grad).
            teacher_feats: per stage ``[B, Ct, H, W]`` pre-ReLU teacher features.
            generator: random source of the ``"rd"`` reducer.

        Returns:
            ``(loss, per_stage)``: the scalar loss to add to the task loss, and the detached
            weighted loss of each stage (they sum to ``loss``).
        """
        if not self.is_matched:
            raise RuntimeError("the distiller has no matching yet: run collect_matching_costs() and "
                               "update_matching() before training (the matching schedule does it at start)")
        self._check_stages(student_feats, teacher_feats)
        batch_size = student_feats[0].shape[0]
        losses = []
        for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
            s = self.student_bns[i](s.float())
            target = mgd.reduce_grouped(t.detach(), getattr(self, f"_groups{i}"), self.reducer, generator)
            losses.append(self.stage_weights[i] * mgd.partial_l2(s, target, getattr(self, f"_group_margin{i}")))
        per_stage = torch.stack(losses) / (batch_size * self.loss_factor)
        return per_stage.sum(), per_stage.detach()
