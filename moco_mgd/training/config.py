"""A pretraining run's configuration: the dataclass of every flag and its default, and what it builds.

``main_moco_mgd.py`` (and ``slurm/submit.py``) parse the command line into a :class:`PretrainConfig`;
:func:`moco_mgd.training.checks.validate` refuses a bad one before any process starts. The run itself is
:func:`moco_mgd.training.pretrain.pretrain`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from moco_mgd.evaluation.knn import KNN_K, KNN_T
from moco_mgd.losses.mgd_distiller import DEFAULT_STAGE_WEIGHTS
from moco_mgd.training.flags import MocoRunConfig

__all__ = ["PretrainConfig"]


@dataclass
class PretrainConfig(MocoRunConfig):
    """Everything a pretraining run depends on; stored in every checkpoint as a plain dict. MoCo's fields
    and defaults are :class:`~moco_mgd.training.flags.MocoRunConfig`'s."""

    moco_dim: int = 128
    moco_k: int = 65536
    moco_m: float = 0.999
    moco_t: float = 0.07
    mlp: bool = False
    aug_plus: bool = False
    cos: bool = False
    shuffle_bn_splits: int = 8
    zero_init_residual: bool = False
    embedding_bn: bool = False
    teacher_arch: str = "resnet50"
    teacher_checkpoint: str = ""
    mgd: bool = True
    mgd_reducer: str = "amp"
    mgd_loss_factor: float = 1e4
    mgd_stage_weights: list[float] = field(default_factory=lambda: list(DEFAULT_STAGE_WEIGHTS))
    mgd_schedule: str = "authors"
    mgd_samples: int = 20000
    cckd_weight: float = 0.0
    cckd_kernel: str = "rbf-taylor"
    cckd_gamma: float = 0.4
    cckd_order: int = 2
    disco_weight: float = 0.0
    disco_both_views: bool = False
    mlp_hidden_dim: int = 0
    seed_weight: float = 0.0
    seed_queue: int = 65536
    seed_t: float = 0.2
    seed_teacher_t: float = 1e-4
    bingo_weight: float = 0.0
    bingo_k: int = 5
    bingo_t: float = 0.2
    bingo_queue: int = 65536
    bingo_pair_weights: list[float] = field(default_factory=lambda: [0.5, 0.5])
    bingo_warmup_epochs: int = 11
    bingo_mix: bool = True
    bingo_bags: str = ""
    amp: str = "auto"
    channels_last: bool | None = None
    keep_checkpoints: int = 2
    max_skipped_images: int = 100
    crop_min: float = 0.2
    knn_freq: int = 0
    knn_k: int = KNN_K
    knn_t: float = KNN_T
    wandb_project: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def use_mgd(self) -> bool:
        return self.mgd and bool(self.teacher_checkpoint)

    @property
    def use_embedding_losses(self) -> bool:
        return any(w > 0 for w in (self.cckd_weight, self.disco_weight, self.seed_weight, self.bingo_weight))

    @property
    def use_bingo(self) -> bool:
        return self.bingo_weight > 0 and bool(self.teacher_checkpoint)

    @property
    def use_teacher(self) -> bool:
        return self.use_mgd or (self.use_embedding_losses and bool(self.teacher_checkpoint))

    # What the run builds from the configuration, as the builders' own arguments: the package code
    # below takes these values, never the configuration.

    def moco_arguments(self) -> dict:
        """The arguments of :class:`~moco_mgd.models.moco.MoCo`."""
        return dict(arch=self.arch, dim=self.moco_dim, K=self.moco_k, m=self.moco_m, T=self.moco_t, mlp=self.mlp,
                    shuffle_bn_splits=self.shuffle_bn_splits, stem=self.stem,
                    mlp_hidden_dim=self.mlp_hidden_dim or None, zero_init_residual=self.zero_init_residual,
                    embedding_bn=self.embedding_bn)

    def mgd_arguments(self) -> dict | None:
        """The options of :class:`~moco_mgd.losses.mgd_distiller.MGDistiller`; None with MGD off."""
        if not self.use_mgd:
            return None
        return dict(reducer=self.mgd_reducer, loss_factor=self.mgd_loss_factor, stage_weights=self.mgd_stage_weights)

    def bag_source_arguments(self, num_images: int) -> dict:
        """The arguments of :func:`~moco_mgd.training.bags.bag_source` for this run's ``num_images`` training images."""
        return dict(teacher_checkpoint=self.teacher_checkpoint, dataset=self.dataset, data=self.data,
                    val_holdout=self.val_holdout, max_images=self.max_images,
                    seed=self.seed if self.seed is not None else 0, image_size=self.image_size, stem=self.stem,
                    num_images=num_images)

    def embedding_arguments(self) -> dict | None:
        """The options of :class:`~moco_mgd.losses.embedding.EmbeddingDistiller`; None with its losses off."""
        if not self.use_embedding_losses:
            return None
        return dict(cckd_weight=self.cckd_weight, cckd_kernel=self.cckd_kernel, cckd_gamma=self.cckd_gamma,
                    cckd_order=self.cckd_order, disco_weight=self.disco_weight, disco_both_views=self.disco_both_views,
                    seed_weight=self.seed_weight, seed_queue=self.seed_queue, seed_t=self.seed_t,
                    seed_teacher_t=self.seed_teacher_t, bingo_weight=self.bingo_weight, bingo_queue=self.bingo_queue,
                    bingo_t=self.bingo_t, bingo_pair_weights=tuple(self.bingo_pair_weights),
                    bingo_warmup_epochs=self.bingo_warmup_epochs, bingo_mix=self.bingo_mix)
