"""MoCo (He et al., CVPR 2020) with the MoCo-v2 head: the query/key encoders and the queue.

The algorithm and the state-dict layout are those of facebookresearch/moco ``moco/builder.py``
(``encoder_q.*``, ``encoder_k.*``, ``queue``, ``queue_ptr``; ``module.``-prefixed under DDP),
but nothing here assumes a GPU or a process group: tensors follow the inputs' device, and
every collective goes through :mod:`moco_mgd.runtime.distributed`, which no-ops at world size 1.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_mgd.models.queue import dequeue_and_enqueue_
from moco_mgd.models.resnet import apply_small_stem, build_resnet
from moco_mgd.models.stages import forward_with_stages
from moco_mgd.runtime import distributed

__all__ = ["MoCo", "MoCoOutput", "apply_small_stem", "infonce", "contrastive_diagnostics"]


def _mlp_head(fc: nn.Linear, hidden_dim: int | None = None, embedding_bn: bool = False) -> nn.Sequential:
    """MoCo-v2's projection head: ``fc.0`` (d x hidden), ReLU, ``fc.2`` (hidden x dim).

    ``hidden_dim`` None is MoCo's ``d`` (``fc.2`` is then the original ``fc``); a wider one is
    DisCo's remedy for a small student's bottleneck. The keys stay ``fc.0.*`` / ``fc.2.*``.
    ``embedding_bn`` appends ``fc.3``, a BN without affine parameters over the embedding: it
    removes the batch's common direction, the one a collapsing or drifting embedding lives in
    (only running statistics are added to the state dict).
    """
    d = fc.in_features
    if hidden_dim is None or hidden_dim == d:
        layers = [nn.Linear(d, d), nn.ReLU(), fc]
    else:
        layers = [nn.Linear(d, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, fc.out_features)]
    if embedding_bn:
        layers.append(nn.BatchNorm1d(fc.out_features, affine=False))
    return nn.Sequential(*layers)


class MoCoOutput(NamedTuple):
    """What one MoCo forward computed, for the losses and the diagnostics of the step.

    ``logits``: Nx(1+K), already divided by ``T`` (the positive in column 0); ``labels``: N
    zeros; ``query``: the query encoder's output on ``im_q`` (NxC, before normalisation,
    with gradient); ``key``: the normalised keys of this rank's images (NxC, no gradient);
    ``query_key_view``: the query encoder's output on ``im_k`` (with gradient) when asked
    for, else None; ``query_stages``: the query encoder's four pre-ReLU stage features on
    ``im_q`` (:func:`moco_mgd.models.stages.forward_with_stages`, with gradient) when asked
    for, else None.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor
    query_key_view: torch.Tensor | None = None
    query_stages: list[torch.Tensor] | None = None


class MoCo(nn.Module):
    """Momentum Contrast: a query encoder, a momentum key encoder and a queue of negative keys.

    ``forward(im_q, im_k)`` returns a :class:`MoCoOutput`: the InfoNCE logits of one batch
    (the positive logit of each query in column 0, then its logits against the ``K`` queued
    keys), their labels, the queries and the keys.

    Shuffle BN. A key encoder that sees the same batch as the query encoder lets BatchNorm
    statistics leak which key is the positive ("cheating" through intra-batch communication,
    MoCo Sec. 3.3). Under a process group with more than one rank, the key batch is shuffled
    across ranks as the official code does; each rank's BN then sees a random sub-batch of
    the global batch, and every rank needs the same per-rank batch size. In ONE process (no
    group, or world size 1) the substitute is split BN, as MoCo's single-GPU CIFAR demo: the
    key batch is shuffled by a random permutation, ``encoder_k`` runs on ``shuffle_bn_splits``
    chunks separately (each computes its own BN statistics, like one GPU of an 8-GPU run),
    and the keys are put back in order. The number of chunks is clipped so that each holds
    at least 2 images (train-mode BN needs more than one value per channel): fewer than 4
    images means one chunk. ``encoder_k``'s BN running statistics are then updated once per
    chunk; they are never used in training (the key encoder always runs in train mode there).
    ``shuffle_bn_splits`` is ignored under a process group (there each rank is one split).

    Randomness: one ``torch.randperm`` per forward (on every rank, on the images' device), so
    the same seed gives bitwise-identical runs on CPU.

    Args:
        arch: a torchvision ResNet name (see :data:`moco_mgd.models.resnet.RESNET_ARCHS`).
        dim: feature dimension of the keys and queries (``fc`` outputs).
        K: queue size (negative keys); must be a multiple of the global batch size.
        m: momentum of the key encoder's moving average.
        T: softmax temperature.
        mlp: MoCo-v2's 2-layer MLP head (``fc.0``/``fc.2``) instead of a linear ``fc``.
        mlp_hidden_dim: width of the MLP's hidden layer (None: the backbone's, as MoCo-v2;
            DisCo widens a ResNet-18's 512 to 2048).
        shuffle_bn_splits: BN splits of the key batch in one process (see above).
        stem: ``"imagenet"`` (torchvision's stem) or ``"small"`` (:func:`apply_small_stem`,
            for 28-64 px images).
    """

    def __init__(self, arch: str = "resnet50", dim: int = 128, K: int = 65536, m: float = 0.999,
                 T: float = 0.07, mlp: bool = False, shuffle_bn_splits: int = 8, stem: str = "imagenet",
                 mlp_hidden_dim: int | None = None, zero_init_residual: bool = False,
                 embedding_bn: bool = False):
        super().__init__()
        if K < 1 or dim < 1:
            raise ValueError(f"K ({K}) and dim ({dim}) must be positive")
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum m must be in [0, 1], got {m}")
        if T <= 0:
            raise ValueError(f"temperature T must be positive, got {T}")
        if shuffle_bn_splits < 1:
            raise ValueError(f"shuffle_bn_splits must be >= 1, got {shuffle_bn_splits}")
        self.K, self.m, self.T = K, m, T
        self.shuffle_bn_splits = shuffle_bn_splits

        # Both encoders are built (as the official code does) so the RNG is consumed the same way.
        self.encoder_q = build_resnet(arch, num_classes=dim, stem=stem, zero_init_residual=zero_init_residual)
        self.encoder_k = build_resnet(arch, num_classes=dim, stem=stem, zero_init_residual=zero_init_residual)
        if mlp_hidden_dim is not None and (not mlp or mlp_hidden_dim < 1):
            raise ValueError(f"mlp_hidden_dim={mlp_hidden_dim} needs mlp=True and a positive width")
        if embedding_bn and not mlp:
            raise ValueError("embedding_bn is a layer of the MoCo-v2 MLP head: it needs mlp=True")
        if mlp:
            self.encoder_q.fc = _mlp_head(self.encoder_q.fc, mlp_hidden_dim, embedding_bn)
            self.encoder_k.fc = _mlp_head(self.encoder_k.fc, mlp_hidden_dim, embedding_bn)
        # The key encoder starts as the query encoder and is only ever updated by momentum.
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.encoder_k.requires_grad_(False)

        # The queue holds L2-normalised keys as columns: queue: CxK.
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # ---- the key encoder is a moving average of the query encoder -----------------------
    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """param_k = m * param_k + (1 - m) * param_q, over parameters (BN buffers are not averaged)."""
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            # Not add_(alpha=...): that may fuse into one FMA and differ from the formula in the last bit.
            param_k.mul_(self.m).add_(param_q.detach() * (1.0 - self.m))

    # ---- the dictionary is a queue of the most recent keys of all ranks ----------------
    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest ``global batch`` keys by ``keys`` of every rank, in rank order."""
        dequeue_and_enqueue_(self.queue, self.queue_ptr, keys)

    # ---- shuffle BN across ranks (the official code) ------------------------------------
    @torch.no_grad()
    def _batch_shuffle_ddp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Give this rank a random slice of the global batch. Returns ``(x_slice, idx_unshuffle)``.

        Every rank must pass the same number of images.
        """
        batch_size_this = x.shape[0]
        x_gather = distributed.all_gather_cat(x)  # x_gather: (world*N)x...
        batch_size_all = x_gather.shape[0]
        num_ranks = batch_size_all // batch_size_this

        # Every rank draws (keeping the RNG streams of all ranks in step); rank 0's draw wins.
        idx_shuffle = torch.randperm(batch_size_all, device=x.device)
        distributed.broadcast(idx_shuffle, src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)

        idx_this = idx_shuffle.view(num_ranks, -1)[distributed.get_rank()]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`_batch_shuffle_ddp`: this rank gets back the rows of its own images."""
        batch_size_this = x.shape[0]
        x_gather = distributed.all_gather_cat(x)  # x_gather: (world*N)xC, in shuffled order
        num_ranks = x_gather.shape[0] // batch_size_this
        idx_this = idx_unshuffle.view(num_ranks, -1)[distributed.get_rank()]
        return x_gather[idx_this]

    # ---- its one-process substitute: split BN on a shuffled batch -----------------------
    def _num_bn_splits(self, batch_size: int) -> int:
        """``shuffle_bn_splits`` clipped so that every chunk has at least 2 images."""
        return max(1, min(self.shuffle_bn_splits, batch_size // 2))

    @torch.no_grad()
    def _batch_shuffle_single(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shuffle the batch so that each BN split is a random subset. Returns ``(x, idx_unshuffle)``."""
        idx_shuffle = torch.randperm(x.shape[0], device=x.device)
        return x[idx_shuffle], torch.argsort(idx_shuffle)

    @torch.no_grad()
    def _batch_unshuffle_single(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        return x[idx_unshuffle]

    @torch.no_grad()
    def _split_bn_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``encoder_k`` on chunks of the batch, each with its own BN statistics."""
        # tensor_split (not chunk): exactly n chunks whose sizes differ by at most one, so
        # every chunk has >= batch // n >= 2 images.
        chunks = x.tensor_split(self._num_bn_splits(x.shape[0]))
        return torch.cat([self.encoder_k(c) for c in chunks])  # NxC

    @torch.no_grad()
    def _compute_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Normalised keys of ``im_k`` under shuffle BN (or its one-process substitute): NxC."""
        if distributed.is_distributed():
            im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)  # k: NxC, rows in shuffled order
            return self._batch_unshuffle_ddp(k, idx_unshuffle)
        im_k, idx_unshuffle = self._batch_shuffle_single(im_k)
        k = F.normalize(self._split_bn_forward(im_k), dim=1)  # k: NxC, rows in shuffled order
        return self._batch_unshuffle_single(k, idx_unshuffle)

    # ---- InfoNCE logits -----------------------------------------------------------------
    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, query_on_key_view: bool = False,
                with_stages: bool = False) -> MoCoOutput:
        """Args: two augmented views (NxCxHxW each). Returns a :class:`MoCoOutput`.

        Also updates the key encoder and the queue. ``query_on_key_view`` adds a second
        query-encoder forward with gradient on ``im_k`` (DisCo's two-view loss);
        ``with_stages`` returns the query view's stage features (MGD). Going through this
        forward (not calling ``encoder_q`` from outside) keeps DDP's gradient
        synchronisation in charge.
        """
        q_key_view = None
        if query_on_key_view:
            # Before the query view: the order of the two forwards decides the BN running
            # statistics of encoder_q, and this is the order every checkpoint so far was made with.
            q_key_view = self.encoder_q(im_k)
        if with_stages:
            q_raw, q_stages = forward_with_stages(self.encoder_q, im_q)  # q_raw: NxC
        else:
            q_raw, q_stages = self.encoder_q(im_q), None
        q = F.normalize(q_raw, dim=1)

        with torch.no_grad():  # no gradient to the keys: the key encoder is not trained by SGD
            # Update before computing keys (as the official code): this step's keys come from
            # the slowly moving encoder that already includes the last SGD step.
            self._momentum_update_key_encoder()
            k = self._compute_keys(im_k)  # k: NxC

        # positive logits: Nx1
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        # negative logits: NxK. The clone keeps autograd from saving the queue buffer itself,
        # which the enqueue below overwrites in place before backward runs.
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())

        logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # logits: Nx(1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # positives: column 0

        self._dequeue_and_enqueue(k)
        return MoCoOutput(logits, labels, q_raw, k, q_key_view, q_stages)


def infonce(output: MoCoOutput) -> torch.Tensor:
    """InfoNCE (MoCo Eq. 1): cross-entropy of the logits (already divided by T) toward the positive, in fp32."""
    return F.cross_entropy(output.logits.float(), output.labels)


@torch.no_grad()
def contrastive_diagnostics(output: MoCoOutput, T: float) -> dict[str, torch.Tensor]:
    """Is InfoNCE falling because images are told apart, or because "now" is told from "earlier"?

    The queue's negatives always come from earlier steps, so an embedding whose common
    direction drifts over time lowers InfoNCE without separating images: the negative
    similarity falls, the in-batch query cosine rises toward 1 and the in-batch instance
    accuracy stays at chance. Learning looks the other way round.

    Args:
        output: one forward's :class:`MoCoOutput`.
        T: the temperature that divided the logits.

    Returns:
        0-dim tensors (no host sync): ``pos_sim`` mean cos(q, own key); ``neg_sim`` mean
        cos(q, queued key); ``query_cos`` mean pairwise cosine of the batch's queries (1: all
        the same direction); ``inst_acc`` % of queries whose own key is the nearest of the
        *current* batch's keys (this rank's; chance 100/N).
    """
    q = F.normalize(output.query.detach().float(), dim=1)  # q: NxC
    k = output.key.detach().float()  # k: NxC
    n = q.shape[0]
    similarities = output.logits.detach().float() * T  # cosines: Nx(1+K)
    gram = q @ q.T  # gram: NxN
    query_cos = (gram.sum() - gram.diagonal().sum()) / max(n * (n - 1), 1)
    own_key_nearest = (q @ k.T).argmax(dim=1) == torch.arange(n, device=q.device)
    return {"pos_sim": similarities[:, 0].mean(), "neg_sim": similarities[:, 1:].mean(),
            "query_cos": query_cos, "inst_acc": own_key_nearest.float().mean() * 100}
