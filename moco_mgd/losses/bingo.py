"""Bag-of-instances distillation (BINGO): Xu et al., "Bag of Instances Aggregation Boosts
Self-supervised Distillation", ICLR 2022, https://arxiv.org/abs/2107.01691 (code: haohang96/bingo).

Before training, the frozen teacher puts every training image in a *bag* with its ``k`` nearest
neighbours (:mod:`moco_mgd.training.bags`). Each step, every anchor image brings one member of its
bag (``b``), and the student is asked to find, among a queue of teacher embeddings ``Q``, *both* the
teacher's embedding of its anchor (``t_a``) and of the member (``t_b``). With L2-normalised
embeddings, temperature ``tau`` and the InfoNCE term of one query ``s`` against one positive ``t``:

    CE(s, t) = -log( exp(s.t / tau) / (exp(s.t / tau) + sum_j exp(s.Q_j / tau)) )

the released code's loss of one batch is (``main_moco.py``, ``MulposCrossEntropy``; means over the batch)

    L = ( w0 CE(s_a, t_a) + w1 CE(s_a, t_b)              the anchor's query
        + w0 CE(s_b, t_b) + w1 CE(s_b, t_a)              the member's query
        + lam CE(s_m, t_a) + (1 - lam) CE(s_m, t_b) ) / 3     a CutMix of anchor and member

with ``(w0, w1) = (0.5, 0.5)`` after the first 11 epochs and ``(1, 0)`` before them, and ``lam`` the
share of the mixed image that is the anchor's. After each step the anchors' teacher embeddings of
the global batch are enqueued (MoCo's queue, filled with the teacher's keys).

Where this differs from the released code, and why:
* The teacher's embeddings are of the *same* views as the student's (the query view of the
  anchor, the one view of the member), from the teacher forward the step runs anyway; the
  released code gives the teacher second augmentations (its key views). One member view instead
  of two, so BINGO costs one teacher forward and two student forwards (member, mix) per step.
* The teacher runs in eval mode (its BN running statistics), as every teacher here; the released
  code runs it with train-mode BN behind shuffle BN.
* Here BINGO is added, with a weight, to MoCo-v2's InfoNCE (as SEED and DisCo are); the released
  code trains on BINGO's loss alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["contrast_with_positives", "bingo_loss", "cutmix"]


def contrast_with_positives(query: torch.Tensor, positives: list[torch.Tensor], weights: list[float],
                            queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sum_j weights[j] * mean_i CE(query_i, positives[j]_i)``, each against the same ``queue`` negatives.

    Args:
        query: ``[n, d]`` the student's embeddings (with gradient); normalised here.
        positives: ``[n, d]`` teacher embeddings, one positive per image each; normalised here.
        weights: one weight per positive.
        queue: ``[d, K]`` L2-normalised teacher embeddings of earlier batches (the negatives).
        temperature: ``tau``.
    """
    if len(positives) != len(weights):
        raise ValueError(f"{len(positives)} positives but {len(weights)} weights")
    if query.dim() != 2 or any(p.shape != query.shape for p in positives):
        raise ValueError(f"need [n, d] query and positives of the same shape, got {tuple(query.shape)} and "
                         f"{[tuple(p.shape) for p in positives]}: the student's --moco-dim must equal the "
                         f"teacher head's output")
    if queue.dim() != 2 or queue.shape[0] != query.shape[1]:
        raise ValueError(f"the queue must be [d={query.shape[1]}, K], got {tuple(queue.shape)}")
    if not temperature > 0:
        raise ValueError(f"the temperature must be positive, got {temperature}")
    q = F.normalize(query.float(), dim=1)
    # A copy: the caller enqueues into ``queue`` in place before backward runs (as MoCo's queue).
    negatives = q @ queue.detach().clone().float()                                  # n x K
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
    loss = q.new_zeros(())
    for positive, weight in zip(positives, weights):
        if weight:
            t = F.normalize(positive.detach().float(), dim=1)
            logits = torch.cat([(q * t).sum(1, keepdim=True), negatives], dim=1) / temperature
            loss = loss + weight * F.cross_entropy(logits, labels)
    return loss


def bingo_loss(student_anchor: torch.Tensor, student_member: torch.Tensor, teacher_anchor: torch.Tensor,
               teacher_member: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2,
               pair_weights: tuple[float, float] = (0.5, 0.5), student_mix: torch.Tensor | None = None,
               mix_lambda: float | None = None) -> torch.Tensor:
    """``L`` of the module doc: the anchor's and the member's query against both teacher embeddings,
    plus, with ``student_mix``, the CutMix view against both in the share ``mix_lambda`` of the anchor.
    Without the mix view the sum is divided by 2 instead of 3."""
    w_own, w_other = pair_weights
    teachers = [teacher_anchor, teacher_member]
    terms = [contrast_with_positives(student_anchor, teachers, [w_own, w_other], queue, temperature),
             contrast_with_positives(student_member, teachers, [w_other, w_own], queue, temperature)]
    if student_mix is not None:
        if mix_lambda is None or not 0.0 <= mix_lambda <= 1.0:
            raise ValueError(f"the mix view needs the anchor's share of it in [0, 1], got {mix_lambda}")
        terms.append(contrast_with_positives(student_mix, teachers, [mix_lambda, 1.0 - mix_lambda], queue,
                                             temperature))
    return sum(terms) / len(terms)


def cutmix(anchor: torch.Tensor, member: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """CutMix (Yun et al. 2019) of two ``[n, C, H, W]`` batches, as BINGO's released code does it: one
    box for the whole batch, its area share from ``Beta(2, 2)``, its centre uniform, clipped at the
    border. Returns the mixed batch (a new tensor) and the anchor's share of its area.

    Draws six numbers from ``generator`` (a CPU generator: nothing waits for the device).
    """
    if anchor.shape != member.shape or anchor.dim() != 4:
        raise ValueError(f"need two [n, C, H, W] batches of one shape, got {tuple(anchor.shape)} and "
                         f"{tuple(member.shape)}")
    height, width = anchor.shape[-2:]
    u = torch.rand(6, generator=generator, dtype=torch.float64).clamp_min(1e-12).tolist()
    # Beta(2, 2) = X / (X + Y) with X, Y ~ Gamma(2, 1), each a sum of two Exp(1) draws.
    x, y = -math.log(u[0] * u[1]), -math.log(u[2] * u[3])
    cut = math.sqrt(1.0 - x / (x + y))
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(u[4] * height), int(u[5] * width)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = anchor.clone()
    mixed[..., top:bottom, left:right] = member[..., top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)
