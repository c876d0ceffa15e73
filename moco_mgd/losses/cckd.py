"""Correlation congruence (CCKD): Peng et al., "Correlation Congruence for Knowledge
Distillation", ICCV 2019, https://arxiv.org/abs/1904.01802.

Instead of matching each student embedding to its teacher embedding, CCKD matches how the
instances of a batch relate to each other: the ``n x n`` correlation matrices of student
and teacher embeddings (Sec. 3.3) must agree,

    L_CC = 1/n^2 * || psi(F_s) - psi(F_t) ||_F^2,    psi(F)_ij = k(F_i, F_j)    (Eq. 6-7)

with a kernel ``k`` (Sec. 3.4). Because only ``n x n`` matrices are compared, student and
teacher embeddings may have different dimensions. Every kernel here acts on L2-normalised
embeddings, which is what the paper's Taylor expansion of the Gaussian RBF kernel assumes
(``||F_i - F_j||^2 = 2 - 2 F_i.F_j`` for unit vectors):

    rbf:        exp(-gamma ||F_i - F_j||^2) = exp(-2 gamma) exp(2 gamma F_i.F_j)
    rbf-taylor: sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! (F_i.F_j)^p      (Eq. 10)
    cosine:     F_i.F_j                                                       (bilinear pool)

The paper uses the P=2 expansion with gamma=0.4. The batch of a distributed run is the
global batch: gather the embeddings of every rank first
(:func:`moco_mgd.runtime.distributed.all_gather_with_grad`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["KERNELS", "correlation_matrix", "correlation_congruence_loss"]

KERNELS = ("rbf-taylor", "rbf", "cosine")


def correlation_matrix(embeddings: torch.Tensor, kernel: str = "rbf-taylor", gamma: float = 0.4,
                       order: int = 2) -> torch.Tensor:
    """``psi(F)``: the kernel between every pair of L2-normalised rows of ``embeddings``.

    Args:
        embeddings: ``[n, d]``.
        kernel: one of :data:`KERNELS`.
        gamma: the RBF kernel's ``gamma``.
        order: the highest power ``P`` of the Taylor expansion (``rbf-taylor`` only).

    Returns:
        ``[n, n]`` in float32.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"expected embeddings of shape [n, d], got {tuple(embeddings.shape)}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: choose one of {KERNELS}")
    if kernel != "cosine" and not gamma > 0:
        raise ValueError(f"the RBF kernel needs gamma > 0, got {gamma}")
    if kernel == "rbf-taylor" and order < 0:
        raise ValueError(f"the Taylor order must be >= 0, got {order}")
    z = F.normalize(embeddings.float(), dim=1)
    cos = z @ z.T  # cos: n x n
    if kernel == "cosine":
        return cos
    if kernel == "rbf":
        return torch.exp(-2.0 * gamma * (1.0 - cos))
    scale = math.exp(-2.0 * gamma)
    out = torch.full_like(cos, scale)  # p = 0
    power = torch.ones_like(cos)
    for p in range(1, order + 1):
        power = power * cos
        out = out + scale * (2.0 * gamma) ** p / math.factorial(p) * power
    return out


def correlation_congruence_loss(student: torch.Tensor, teacher: torch.Tensor, kernel: str = "rbf-taylor",
                                gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """``L_CC``: the mean squared difference of the two correlation matrices (Eq. 7).

    Args:
        student: ``[n, d_s]`` student embeddings (with gradient).
        teacher: ``[n, d_t]`` teacher embeddings of the same images in the same order; no
            gradient flows into them.

    Returns:
        A scalar, 0 when the two batches are related identically (e.g. equal embeddings).
    """
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"need [n, d] embeddings of the same n images, got student {tuple(student.shape)} "
                         f"and teacher {tuple(teacher.shape)}")
    c_s = correlation_matrix(student, kernel, gamma, order)
    c_t = correlation_matrix(teacher.detach(), kernel, gamma, order)
    return (c_s - c_t).pow(2).mean()
