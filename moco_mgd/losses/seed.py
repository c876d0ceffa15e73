"""Similarity-distribution distillation (SEED): Fang et al., "SEED: Self-supervised
Distillation for Visual Representation", ICLR 2021, https://arxiv.org/abs/2101.04731.

The student learns to see a queue of teacher embeddings ``D = [d_1 .. d_K]`` the way the
teacher does (Sec. 3, Eq. 2-4): for each image, with its teacher embedding ``t`` put first,

    p_t = softmax([t.t, t.d_1, ..., t.d_K] / tau_t)       (the teacher's similarity distribution)
    p_s = softmax([s.t, s.d_1, ..., s.d_K] / tau_s)       (the student's)
    L_SEED = - sum_j p_t[j] log p_s[j]                    (soft cross-entropy, mean over the batch)

with ``s`` and ``t`` L2-normalised. After each step the teacher embeddings of the global
batch are enqueued (gathered across ranks, as MoCo's keys). The released code's defaults are
``tau_s = 0.2`` and ``tau_t = 1e-4`` with a 65,536 queue; SEED trains on this loss alone,
here it is added to MoCo-v2's InfoNCE with a weight.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_mgd.models.queue import dequeue_and_enqueue_

__all__ = ["similarity_distribution_loss", "TeacherEmbeddingQueue"]


def similarity_distribution_loss(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor,
                                 student_t: float = 0.2, teacher_t: float = 1e-4) -> torch.Tensor:
    """``L_SEED`` of one batch.

    Args:
        student: ``[n, d]`` student embeddings (with gradient).
        teacher: ``[n, d]`` teacher embeddings of the same images; no gradient flows into them.
        queue: ``[d, K]`` L2-normalised teacher embeddings of earlier batches.
        student_t, teacher_t: the softmax temperatures ``tau_s`` and ``tau_t``.

    Returns:
        A scalar: the mean soft cross-entropy. It is minimal (equal to the entropy of the
        teacher's distribution, and with zero gradient) where the student's distribution
        equals the teacher's, e.g. ``student == teacher`` with ``student_t == teacher_t``.
    """
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"need [n, d] embeddings of equal shape, got student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)}: the student's --moco-dim must equal the teacher head's output")
    if queue.dim() != 2 or queue.shape[0] != student.shape[1]:
        raise ValueError(f"the queue must be [d={student.shape[1]}, K], got {tuple(queue.shape)}")
    if not (student_t > 0 and teacher_t > 0):
        raise ValueError(f"temperatures must be positive, got student {student_t}, teacher {teacher_t}")
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.detach().float(), dim=1)
    # A copy: the caller enqueues into ``queue`` in place before backward runs (as MoCo's queue).
    bank = queue.detach().clone().float()
    # similarities: n x (1+K), the image's own teacher embedding in column 0
    student_sim = torch.cat([(s * t).sum(1, keepdim=True), s @ bank], dim=1)
    teacher_sim = torch.cat([(t * t).sum(1, keepdim=True), t @ bank], dim=1)
    target = F.softmax(teacher_sim / teacher_t, dim=1)
    return -(target * F.log_softmax(student_sim / student_t, dim=1)).sum(1).mean()


class TeacherEmbeddingQueue(nn.Module):
    """SEED's queue ``D``: the L2-normalised teacher embeddings of the latest ``size`` images.

    Buffers ``queue`` (``[dim, size]``, random unit columns at start, as MoCo's) and
    ``queue_ptr``; they are checkpointed so that a resumed run continues with the same queue.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"the queue needs a positive dimension and size, got dim {dim}, size {size}")
        self.register_buffer("queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, teacher: torch.Tensor) -> None:
        """Enqueue the normalised ``[n, dim]`` teacher embeddings of every rank (rank order)."""
        dequeue_and_enqueue_(self.queue, self.queue_ptr, F.normalize(teacher.float(), dim=1))
