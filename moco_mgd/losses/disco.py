"""Embedding regression (DisCo): Gao et al., "DisCo: Remedy Self-supervised Learning on
Lightweight Models with Distilled Contrastive Learning", ECCV 2022,
https://arxiv.org/abs/2104.09124.

The student's final embedding (the output of its MoCo-v2 MLP head) regresses the teacher's
embedding of the same view, both L2-normalised (Sec. 3.2):

    L_Dis = || q_s / ||q_s|| - q_t / ||q_t|| ||_2^2      (per image; 2 - 2 cos(q_s, q_t))

DisCo applies it to the query view and, with a second forward of both networks, to the key
view too; and it widens the student's MLP hidden layer (its "bottleneck" finding: a 512-wide
hidden layer limits a ResNet-18), see ``MoCo(mlp_hidden_dim=...)``.

Normalisation here: the mean over the batch. DisCo's released code sums over each GPU's
batch (32 images on 8 GPUs), so its weight 1 is a weight of 32 on this mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["embedding_regression_loss"]


def embedding_regression_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared L2 distance between normalised embeddings.

    Args:
        student: ``[n, d]`` student embeddings (with gradient).
        teacher: ``[n, d]`` teacher embeddings of the same images; no gradient flows into them.

    Returns:
        A scalar in ``[0, 4]``; 0 when every student embedding points where its teacher's does.
    """
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"need [n, d] embeddings of equal shape, got student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)}: DisCo regresses the teacher's embedding, so the student's "
                         f"--moco-dim must equal the teacher head's output size")
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.detach().float(), dim=1)
    return (s - t).pow(2).sum(1).mean()
