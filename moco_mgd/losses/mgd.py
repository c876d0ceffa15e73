"""The math of Matching Guided Distillation as small pure functions.

Yue, Deng & Zhou, "Matching Guided Distillation", ECCV 2020 (arXiv:2008.09958),
sections 3.1-3.3. Each function names the equation it implements.

Conventions:
    * Features are ``[B, C, H, W]`` pre-ReLU maps; ``Cs`` student, ``Ct`` teacher channels.
    * An *assignment* is a ``LongTensor[Ct]``: for every teacher channel, the index of
      the student channel it is matched to, or ``-1`` if it is matched to none. This is
      the matching matrix M of Eq. 8 stored by columns (``M[assignment[j], j] = 1``).
    * A *grouping* is a ``LongTensor[Cs, alpha]``: for every student channel, the teacher
      channels matched to it, in ascending order. It is what the reductions consume.
"""
from __future__ import annotations

import math

import lap
import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

__all__ = [
    "DISTANCES",
    "REDUCERS",
    "channel_cost",
    "balanced_assignment",
    "sparse_assignment",
    "fixed_assignment",
    "assignment_groups",
    "reduce",
    "reduce_grouped",
    "reduce_margin",
    "bn_margin",
    "partial_l2",
]

DISTANCES = ("cosine", "euclidean")
REDUCERS = ("amp", "rd", "sm", "max", "avg")

# Below this probability of a negative response, the conditional mean of Eq. 4 rests on
# the far tail of a Gaussian that BN only approximates; Overhaul (Heo et al., ICCV 2019)
# and the MGD authors fall back to -3 sigma there, and so do we.
_MARGIN_MIN_NEGATIVE_PROB = 1e-3


def _check_pair(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> None:
    if student_feat.dim() != 4 or teacher_feat.dim() != 4:
        raise ValueError(
            f"expected [B, C, H, W] features, got student {tuple(student_feat.shape)} "
            f"and teacher {tuple(teacher_feat.shape)}"
        )
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(
            f"student and teacher features come from different batches: "
            f"{student_feat.shape[0]} vs {teacher_feat.shape[0]} images"
        )
    if student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(
            f"student and teacher features have different spatial sizes "
            f"{tuple(student_feat.shape[2:])} vs {tuple(teacher_feat.shape[2:])}: MGD compares "
            f"channels position by position, so tap stages of equal stride (same input size, "
            f"same stem for both networks)"
        )


def channel_cost(
    student_feat: torch.Tensor, teacher_feat: torch.Tensor, distance: str = "cosine"
) -> torch.Tensor:
    """Pairwise student-teacher channel distance of one batch, summed over the batch.

    ``distance="euclidean"`` is Eq. 6, ``d_ij = sum_k (s_ik - t_jk)^2`` over the N = HW
    positions of one image. ``distance="cosine"`` (the default) is ``2 - 2 cos(s_i, t_j)``,
    i.e. Eq. 6 applied to the L2-normalised spatial maps, as the authors' released code
    does. We default to it because raw pre-ReLU maps of teacher and student have very
    different scales per channel: Eq. 6 on raw maps mostly pairs channels by norm, the
    normalised form pairs them by *where* they fire, which is what the student is then
    trained to imitate.

    Summing over the batch (not averaging) makes costs additive: the cost over a
    dataset is the sum of the costs of its batches, on any number of ranks.

    Args:
        student_feat: ``[B, Cs, H, W]``.
        teacher_feat: ``[B, Ct, H, W]``.
        distance: ``"cosine"`` or ``"euclidean"``.

    Returns:
        ``Tensor[Cs, Ct]`` in float32 (the inputs may be half precision).
    """
    _check_pair(student_feat, teacher_feat)
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}: choose one of {DISTANCES}")
    b, cs = student_feat.shape[:2]
    ct = teacher_feat.shape[1]
    s = student_feat.float().reshape(b, cs, -1)  # s: B x Cs x HW
    t = teacher_feat.float().reshape(b, ct, -1)  # t: B x Ct x HW
    if distance == "cosine":
        s = nn.functional.normalize(s, dim=2)
        t = nn.functional.normalize(t, dim=2)
    # The batch sum of the per-image inner products is one GEMM over (image, position):
    # sum_b s_b t_b^T = S T^T with S: Cs x (B*HW). A batched product would build a B x Cs x Ct
    # tensor only to sum it (268 MB per batch of 64 at the last stage; 60x slower on CPU).
    cross = s.transpose(0, 1).reshape(cs, -1) @ t.transpose(0, 1).reshape(ct, -1).T  # cross: Cs x Ct
    if distance == "cosine":
        return 2.0 * b - 2.0 * cross
    # sum_b ||s_bi - t_bj||^2 = sum_b ||s_bi||^2 + sum_b ||t_bj||^2 - 2 cross_ij; clamp the round-off below zero.
    sq = s.pow(2).sum((0, 2)).unsqueeze(1) + t.pow(2).sum((0, 2)).unsqueeze(0)
    return (sq - 2.0 * cross).clamp_min(0.0)


def _as_numpy_cost(cost: torch.Tensor) -> np.ndarray:
    if cost.dim() != 2:
        raise ValueError(f"cost must be a [Cs, Ct] matrix, got shape {tuple(cost.shape)}")
    cs, ct = cost.shape
    if cs > ct:
        raise ValueError(
            f"the student has more channels than the teacher at this stage ({cs} > {ct}): "
            f"MGD matches teacher channels to student channels and needs Ct >= Cs; "
            f"choose a wider teacher or a narrower student"
        )
    c = cost.detach().double().cpu().numpy()
    if not np.isfinite(c).all():
        raise ValueError("the matching cost contains NaN or inf: check the features fed to it")
    return c


def balanced_assignment(cost: torch.Tensor) -> torch.Tensor:
    """Many-to-one balanced matching, Eq. 8-11, solved exactly.

    Every student channel gets exactly ``alpha = floor(Ct / Cs)`` teacher channels, every
    teacher channel at most one student; the ``Ct - alpha * Cs`` left-over teacher
    channels stay unmatched. Following Eq. 10, the cost matrix is stacked ``alpha`` times
    (row ``r`` of the stack is student ``r mod Cs``) and one linear assignment is solved.
    When ``Cs`` does not divide ``Ct`` the stack is ``alpha*Cs x Ct``: a rectangular
    assignment, which is still optimal for Eq. 9 with the left-over channels free to be
    any of the teacher's (the paper fixes them as dummies, which it notes is not optimal).

    Args:
        cost: ``Tensor[Cs, Ct]``, e.g. :func:`channel_cost` summed over a dataset.

    Returns:
        ``LongTensor[Ct]``: student index for each teacher channel, ``-1`` if unmatched.
    """
    c = _as_numpy_cost(cost)
    cs, ct = c.shape
    alpha = ct // cs
    # Jonker-Volgenant (lap.lapjv) rather than scipy: on the stacked matrix, whose alpha copies
    # of every row tie, scipy's solver was 1.5x (channel costs) to 5x (uniform costs) slower,
    # and the authors' OR-Tools loop 23x (benchmarks/bench_matching_solve.py). Both are exact;
    # extend_cost pads the rectangular case with free dummy rows.
    _, _, row_of_col = lap.lapjv(np.tile(c, (alpha, 1)), extend_cost=True)
    matched = torch.from_numpy(row_of_col.astype(np.int64))
    assignment = torch.where(matched >= 0, matched % cs, torch.full_like(matched, -1))
    return assignment


def sparse_assignment(cost: torch.Tensor) -> torch.Tensor:
    """Sparse matching (section 3.3, Eq. 12): a one-to-one matching of minimal cost.

    Every student channel gets exactly one distinct teacher channel; all other teacher
    channels are unmatched. This is the paper's construction with ``Ct - Cs`` dummy
    student rows of infinite cost, solved directly as a rectangular assignment.

    Args:
        cost: ``Tensor[Cs, Ct]``.

    Returns:
        ``LongTensor[Ct]`` in the encoding of :func:`balanced_assignment`.
    """
    c = _as_numpy_cost(cost)
    rows, cols = linear_sum_assignment(c)
    assignment = torch.full((c.shape[1],), -1, dtype=torch.long)
    assignment[torch.from_numpy(cols)] = torch.from_numpy(rows).long()
    return assignment


def fixed_assignment(num_teacher_channels: int, num_student_channels: int, sparse: bool = False) -> torch.Tensor:
    """The assignment of MGD *without matching* (the paper's "with vs. without matching" ablation).

    Teacher channels are handed out in order, with no regard to cost: balanced, student ``i``
    gets teacher channels ``i*alpha .. i*alpha + alpha - 1``; sparse, it gets channel ``i*alpha``
    alone (``alpha = floor(Ct / Cs)``). Left-over teacher channels stay unmatched.

    Returns:
        ``LongTensor[Ct]`` in the encoding of :func:`balanced_assignment`.
    """
    ct, cs = int(num_teacher_channels), int(num_student_channels)
    if not 0 < cs <= ct:
        raise ValueError(f"need 0 < student channels <= teacher channels, got {cs} and {ct}")
    alpha = ct // cs
    teacher = torch.arange(ct)
    assignment = torch.where(teacher < alpha * cs, teacher // alpha, -1)
    if sparse:
        assignment[teacher % alpha != 0] = -1
    return assignment


def assignment_groups(assignment: torch.Tensor, num_student_channels: int) -> torch.Tensor:
    """Turn an assignment into the teacher channels of each student channel.

    Args:
        assignment: ``LongTensor[Ct]`` with values in ``[-1, Cs)``.
        num_student_channels: ``Cs``.

    Returns:
        ``LongTensor[Cs, alpha]``, teacher indices ascending within each row.

    Raises:
        ValueError: if some student channel has no match or the students have unequal
            numbers of matches (not an assignment made by this module).
    """
    cs = num_student_channels
    a = assignment.long()
    if a.dim() != 1:
        raise ValueError(f"assignment must be a LongTensor[Ct], got shape {tuple(a.shape)}")
    if a.numel() and (a.min() < -1 or a.max() >= cs):
        raise ValueError(f"assignment values must lie in [-1, {cs}), got [{a.min()}, {a.max()}]")
    counts = torch.bincount(a[a >= 0], minlength=cs)
    if counts.numel() == 0 or counts.min() == 0 or counts.min() != counts.max():
        raise ValueError(
            f"every student channel must be matched to the same number (>= 1) of teacher "
            f"channels, got between {int(counts.min()) if counts.numel() else 0} and "
            f"{int(counts.max()) if counts.numel() else 0}: build it with "
            f"balanced_assignment or sparse_assignment"
        )
    matched = torch.nonzero(a >= 0).squeeze(1)
    # A stable sort by student keeps teacher indices ascending within each group.
    order = torch.sort(a[matched], stable=True).indices
    return matched[order].reshape(cs, int(counts[0]))


def reduce_grouped(
    teacher_feat: torch.Tensor,
    groups: torch.Tensor,
    method: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The reduction rho(T, M) of section 3.3, with M given as groups.

    Methods, at every position (b, h, w) and for each student channel i with matched
    teacher channels ``groups[i]``:
        * ``"amp"``: absolute max pooling, Eq. 14-15: the matched value of largest
          magnitude, sign kept (on an exact tie between +v and -v, +v).
        * ``"rd"``: random drop, Eq. 13: the value of one matched channel drawn uniformly
          and independently for each image, channel and position.
        * ``"sm"``: sparse matching, Eq. 12: the single matched channel (needs groups of
          width 1, i.e. :func:`sparse_assignment`).
        * ``"max"`` / ``"avg"``: plain max / mean over the matched channels (Table 5).

    Args:
        teacher_feat: ``[B, Ct, H, W]``.
        groups: ``LongTensor[Cs, alpha]`` from :func:`assignment_groups`.
        method: one of :data:`REDUCERS`.
        generator: random source for ``"rd"``.

    Returns:
        ``Tensor[B, Cs, H, W]``, same dtype and device as ``teacher_feat``.
    """
    if method not in REDUCERS:
        raise ValueError(f"unknown reduction method {method!r}: choose one of {REDUCERS}")
    if teacher_feat.dim() != 4:
        raise ValueError(f"teacher_feat must be [B, Ct, H, W], got {tuple(teacher_feat.shape)}")
    cs, alpha = groups.shape
    if method == "sm" and alpha != 1:
        raise ValueError(
            f"sparse matching reduces a one-to-one matching, but each student channel has "
            f"{alpha} teacher channels: build the assignment with sparse_assignment, or use "
            f"amp/rd/max/avg"
        )
    b, _, h, w = teacher_feat.shape
    groups = groups.to(teacher_feat.device)
    if alpha == 1:
        return teacher_feat.index_select(1, groups.reshape(-1))
    if method in ("amp", "max"):
        # The value of largest magnitude is the group's max or its min. Column by column (the
        # j-th channel of every group, one index_select each) a running max and min need no
        # B x Cs x alpha x H x W copy: measured faster than reducing that copy (amax/amin or
        # aminmax over dim 2), and the same values, since max and min only select.
        columns = groups.t().contiguous()
        high = low = teacher_feat.index_select(1, columns[0])
        for column in columns[1:]:
            part = teacher_feat.index_select(1, column)
            high = torch.maximum(high, part)
            if method == "amp":
                low = torch.minimum(low, part)
        return torch.where(high >= -low, high, low) if method == "amp" else high
    # One index_select of the channels in group order, then a view: the same values as
    # teacher_feat[:, groups] at a fraction of advanced indexing's cost.
    grouped = teacher_feat.index_select(1, groups.reshape(-1)).view(b, cs, alpha, h, w)  # B x Cs x alpha x H x W
    if method == "rd":
        # Draw on the generator's device (a CPU generator may drive a GPU feature).
        draw_device = generator.device if generator is not None else grouped.device
        pick = torch.randint(alpha, (b, cs, 1, h, w), generator=generator, device=draw_device)
        return grouped.gather(2, pick.to(grouped.device)).squeeze(2)
    return grouped.mean(dim=2)


def reduce(
    teacher_feat: torch.Tensor,
    assignment: torch.Tensor,
    num_student_channels: int,
    method: str = "amp",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """rho(T, M): reduce the teacher's channels onto the student's (section 3.3).

    See :func:`reduce_grouped` for the methods. In a training loop, compute
    :func:`assignment_groups` once per matching update and call :func:`reduce_grouped`.

    Args:
        teacher_feat: ``[B, Ct, H, W]``.
        assignment: ``LongTensor[Ct]`` from :func:`balanced_assignment` or
            :func:`sparse_assignment`.
        num_student_channels: ``Cs``.
        method: ``"amp"``, ``"rd"``, ``"sm"``, ``"max"`` or ``"avg"``.
        generator: random source for ``"rd"``.

    Returns:
        ``Tensor[B, Cs, H, W]``.
    """
    if method not in REDUCERS:
        raise ValueError(f"unknown reduction method {method!r}: choose one of {REDUCERS}")
    if assignment.numel() != teacher_feat.shape[1]:
        raise ValueError(
            f"assignment covers {assignment.numel()} teacher channels but the feature has "
            f"{teacher_feat.shape[1]}"
        )
    groups = assignment_groups(assignment, num_student_channels)
    return reduce_grouped(teacher_feat, groups, method, generator)


def reduce_margin(margin: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The margin of each reduced channel: the mean margin of its matched teacher channels.

    The paper defines the margin per teacher channel (Eq. 4) but applies sigma_T after
    the reduction (Eq. 3); like the authors' code we give each student channel the mean
    margin of its group (for sparse matching, exactly its teacher channel's margin).

    Args:
        margin: ``Tensor[Ct]`` from :func:`bn_margin`.
        groups: ``LongTensor[Cs, alpha]``.

    Returns:
        ``Tensor[Cs]``.
    """
    return margin[groups.to(margin.device)].mean(dim=1)


def bn_margin(bn: nn.BatchNorm2d | nn.Module) -> torch.Tensor:
    """The margin m of Eq. 4 from the BatchNorm that feeds a pre-ReLU feature.

    A BN output in channel c is taken as Gaussian with mean ``beta_c`` (bias) and standard
    deviation ``|gamma_c|`` (weight). The margin is the expected response given that it
    is negative, ``E[x | x < 0] = mu - sigma * phi(mu/sigma) / Phi(-mu/sigma)``.
    Where a negative response has probability below 1e-3 the estimate rests on the far
    tail only, and -3 sigma is used instead (as Overhaul and the MGD authors do).

    Compute it from the teacher **after** its trained weights are loaded.

    Args:
        bn: a module with ``weight`` and ``bias`` of shape ``[C]``.

    Returns:
        ``Tensor[C]`` float32, every entry ``<= 0``.
    """
    if getattr(bn, "weight", None) is None or getattr(bn, "bias", None) is None:
        raise ValueError(f"bn_margin needs an affine BatchNorm (weight and bias), got {bn!r}")
    sigma = bn.weight.detach().double().abs()
    mu = bn.bias.detach().double()
    safe_sigma = sigma.clamp_min(1e-12)
    a = mu / safe_sigma
    neg_prob = torch.special.ndtr(-a)
    # phi(a) / Phi(-a) in log space: stays finite where both factors underflow.
    log_phi = -0.5 * a * a - 0.5 * math.log(2.0 * math.pi)
    mills = torch.exp(log_phi - torch.special.log_ndtr(-a))
    conditional_mean = mu - sigma * mills
    margin = torch.where(neg_prob > _MARGIN_MIN_NEGATIVE_PROB, conditional_mean, -3.0 * sigma)
    return margin.clamp_max(0.0).float().to(bn.weight.device)


def partial_l2(
    student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor
) -> torch.Tensor:
    """Partial L2 distance of Eq. 5 after the teacher transform of Eq. 4.

    The target is ``t = max(teacher, m)`` (Eq. 4, margin per channel). Each element
    contributes ``(t - s)^2``, except where ``s <= t <= 0``: the teacher's response is
    negative (ReLU would zero it) and the student is already at or below it, so there is
    nothing to correct.

    Args:
        student: ``[B, C, ...]``.
        teacher: ``[B, C, ...]``, the reduced teacher feature (gradients are not
            propagated to it).
        margin: ``Tensor[C]``, one margin per channel.

    Returns:
        Scalar float32 tensor: the **sum** over all elements (the caller normalises).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape"
        )
    if margin.dim() != 1 or margin.numel() != student.shape[1]:
        raise ValueError(
            f"margin must be a Tensor[C] with C={student.shape[1]}, got {tuple(margin.shape)}"
        )
    view = [1, -1] + [1] * (student.dim() - 2)
    target = torch.maximum(teacher.detach().float(), margin.float().reshape(view))
    return _PartialL2Sum.apply(student.float(), target)


class _PartialL2Sum(torch.autograd.Function):
    """``sum(((s - t) * kept)^2)`` with ``kept = max(s - t, t) > 0``, and its gradient ``2 (s - t) kept``.

    Kept unless ``s <= t <= 0``, i.e. where ``s > t`` or ``t > 0``, i.e. where ``max(s - t, t) > 0``.
    One saved tensor and one multiply in the backward, where autograd through ``pow`` and the
    mask keeps three tensors and runs four passes; bitwise the same loss and gradient (masking
    by 0/1 and doubling are exact, so each element is the same single rounding of ``2 g (s - t)``).
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = student - target
        kept = diff * (torch.maximum(diff, target) > 0)
        ctx.save_for_backward(kept)
        return (kept * kept).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (kept,) = ctx.saved_tensors
        return kept * (2 * grad), None
