"""MoCo-v2 pretraining with optional MGD: configuration, checks, and the per-process run.

``main_moco_mgd.py`` parses the command line into a :class:`PretrainConfig`, calls
:func:`validate` (every bad input fails here, before any process starts or any file is
written), then launches :func:`pretrain` in each process.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from moco_mgd import checkpoint as ckpt
from moco_mgd.backbone import head_dim, load_checkpoint_file, load_frozen_teacher, resnet_trunk
from moco_mgd.data import (TwoCropsTransform, build_dataset, check_same_classes, eval_transform, pretrain_transform,
                           random_subset)
from moco_mgd.distiller import MGDistiller
from moco_mgd.embedding_distiller import EmbeddingDistiller
from moco_mgd.engine import (Distillation, NonFiniteLossError, learning_rate, matching_epochs,
                             run_matching_update, set_learning_rate, train_one_epoch)
from moco_mgd.knn import knn_evaluate
from moco_mgd.launch import DistEnv, per_process_batch
from moco_mgd.logs import MetricsLog, setup_logging
from moco_mgd.moco import MoCo
from moco_mgd.taps import FeatureTaps

__all__ = ["PretrainConfig", "validate", "pretrain"]

logger = logging.getLogger("moco_mgd")


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on; stored in every checkpoint as a plain dict."""

    data: str = ""
    dataset: str = "imagefolder"
    arch: str = "resnet18"
    workers: int = 32
    epochs: int = 200
    start_epoch: int = 0
    batch_size: int = 256
    lr: float = 0.03
    schedule: list[int] = field(default_factory=lambda: [120, 160])
    momentum: float = 0.9
    weight_decay: float = 1e-4
    print_freq: int = 10
    resume: str = ""
    seed: int | None = None
    moco_dim: int = 128
    moco_k: int = 65536
    moco_m: float = 0.999
    moco_t: float = 0.07
    mlp: bool = False
    aug_plus: bool = False
    cos: bool = False
    image_size: int = 224
    stem: str = "imagenet"
    shuffle_bn_splits: int = 8
    teacher_arch: str = "resnet50"
    teacher_checkpoint: str = ""
    mgd: bool = True
    mgd_reducer: str = "amp"
    mgd_loss_factor: float = 1e4
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
    output_dir: str = "."
    amp: str = "auto"
    channels_last: bool | None = None
    keep_checkpoints: int = 2
    max_skipped_images: int = 100
    max_images: int = 0
    knn_freq: int = 0
    knn_k: int = 200
    knn_t: float = 0.1
    wandb_project: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def use_mgd(self) -> bool:
        return self.mgd and bool(self.teacher_checkpoint)

    @property
    def use_embedding_losses(self) -> bool:
        return any(w > 0 for w in (self.cckd_weight, self.disco_weight, self.seed_weight))

    @property
    def use_teacher(self) -> bool:
        return self.use_mgd or (self.use_embedding_losses and bool(self.teacher_checkpoint))


def build_moco(config: PretrainConfig) -> MoCo:
    return MoCo(config.arch, config.moco_dim, config.moco_k, config.moco_m, config.moco_t, config.mlp,
                shuffle_bn_splits=config.shuffle_bn_splits, stem=config.stem,
                mlp_hidden_dim=config.mlp_hidden_dim or None)


def build_embedding_distiller(config: PretrainConfig, teacher: nn.Module) -> EmbeddingDistiller:
    """The embedding losses of ``config``, between the student's head and ``teacher``'s (with its head)."""
    return EmbeddingDistiller(
        config.moco_dim, head_dim(teacher), cckd_weight=config.cckd_weight, cckd_kernel=config.cckd_kernel, cckd_gamma=config.cckd_gamma,
        cckd_order=config.cckd_order, disco_weight=config.disco_weight, disco_both_views=config.disco_both_views,
        seed_weight=config.seed_weight, seed_queue=config.seed_queue, seed_t=config.seed_t,
        seed_teacher_t=config.seed_teacher_t)


def validate(config: PretrainConfig, world_size: int, local_world_size: int) -> None:
    """Refuse a run that cannot work, before anything starts. Raises with the fix in the message."""
    if local_world_size > config.batch_size:
        raise ValueError(f"-b/--batch-size {config.batch_size} is smaller than the {local_world_size} processes "
                         f"of a node: each process needs at least one image")
    global_batch = per_process_batch(config.batch_size, local_world_size) * world_size
    if config.moco_k % global_batch:
        raise ValueError(f"--moco-k {config.moco_k} is not divisible by the global batch size {global_batch} "
                         f"({world_size} processes x {global_batch // world_size}): the queue is filled in whole "
                         f"batches; choose K as a multiple of {global_batch}")
    if config.mgd_reducer not in ("amp", "rd", "sm", "max", "avg"):
        raise ValueError(f"unknown --mgd-reducer {config.mgd_reducer!r}: choose amp, rd, sm, max or avg")
    matching_epochs(config.mgd_schedule, config.epochs)
    if config.max_images < 0:
        raise ValueError(f"--max-images {config.max_images}: pass a positive number, or 0 for all images")
    if config.use_embedding_losses and not config.teacher_checkpoint:
        raise ValueError("--cckd-weight / --disco-weight / --seed-weight distil from a teacher: pass "
                         "--teacher-checkpoint (add --no-mgd to use the embedding losses without MGD)")
    if config.mlp_hidden_dim and not config.mlp:
        raise ValueError(f"--mlp-hidden-dim {config.mlp_hidden_dim} widens the MoCo-v2 MLP head: add --mlp")
    if config.mlp_hidden_dim < 0:
        raise ValueError(f"--mlp-hidden-dim {config.mlp_hidden_dim}: pass a positive width, or 0 for MoCo's")
    if config.seed_weight > 0 and config.seed_queue % global_batch:
        raise ValueError(f"--seed-queue {config.seed_queue} is not divisible by the global batch size {global_batch}: "
                         f"SEED's queue is filled in whole batches; choose a multiple of {global_batch}")
    if config.use_mgd and config.mgd_samples < 1:
        raise ValueError(f"--mgd-samples {config.mgd_samples}: the matching needs at least one image "
                         f"(the authors use 20000)")
    train_set = build_dataset(config.dataset, config.data, "train")
    if config.knn_freq:
        check_same_classes(train_set, build_dataset(config.dataset, config.data, "val"))
    ckpt.check_writable(config.output_dir)
    if config.use_teacher:
        teacher = load_frozen_teacher(config.teacher_arch, config.teacher_checkpoint, stem=config.stem,
                                      with_head=config.use_embedding_losses)
        if config.use_mgd:
            MGDistiller.from_models(teacher, MoCo(config.arch, dim=config.moco_dim, K=global_batch,
                                                  stem=config.stem).encoder_q)
        if config.use_embedding_losses:
            build_embedding_distiller(config, teacher)
    resume = config.resume or ckpt.latest_checkpoint(config.output_dir)
    if resume:
        check_resume(load_checkpoint_file(resume, "--resume checkpoint"), config, str(resume))


def check_resume(checkpoint, config: PretrainConfig, path: str) -> None:
    """A checkpoint must come from a run of the same student (and teacher, with MGD on)."""
    saved = checkpoint.get("config") or {}
    differences = []
    if checkpoint.get("arch") != config.arch:
        differences.append(f"student -a {checkpoint.get('arch')!r} vs {config.arch!r}")
    for key in ("moco_dim", "moco_k", "mlp", "stem", "mlp_hidden_dim"):
        if key in saved and saved[key] != getattr(config, key):
            differences.append(f"{key} {saved[key]!r} vs {getattr(config, key)!r}")
    if config.use_mgd:
        if checkpoint.get("mgd") is None:
            differences.append("it comes from a run without MGD while MGD is on (pass --no-mgd, or start a new "
                               "--output-dir)")
        else:
            for key in ("teacher_arch", "mgd_reducer"):
                if key in saved and saved[key] != getattr(config, key):
                    differences.append(f"{key} {saved[key]!r} vs {getattr(config, key)!r}")
    if config.seed_weight > 0:
        if "seed_queue.queue" not in (checkpoint.get("embedding") or {}):
            differences.append("it has no SEED queue while --seed-weight is on (start a new --output-dir)")
        elif "seed_queue" in saved and saved["seed_queue"] != config.seed_queue:
            differences.append(f"seed_queue {saved['seed_queue']!r} vs {config.seed_queue!r}")
    if differences:
        raise ValueError(f"cannot resume from {path}: " + "; ".join(differences))


def _autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _loader(dataset, batch_size: int, env: DistEnv, shuffle: bool, workers: int, seed: int, drop_last: bool):
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle,
                                 seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=env.device.type == "cuda", drop_last=drop_last,
                      persistent_workers=workers > 0)


def pretrain(config: PretrainConfig, env: DistEnv) -> None:
    """The run of one process (all launch modes end here)."""
    output_dir = Path(config.output_dir)
    setup_logging(output_dir, env.rank)
    seed = config.seed if config.seed is not None else 0
    if config.seed is not None:
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
    device = env.device
    autocast_dtype = _autocast_dtype(config.amp, device)
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batch = per_process_batch(config.batch_size, env.local_world_size)

    model = build_moco(config).to(device, memory_format=memory_format)
    distill = None
    if config.use_teacher:
        teacher = load_frozen_teacher(config.teacher_arch, config.teacher_checkpoint, stem=config.stem,
                                      with_head=config.use_embedding_losses)
        teacher = teacher.to(device, memory_format=memory_format)
        distill = Distillation(teacher)
        if config.use_mgd:
            distill.distiller = MGDistiller.from_models(teacher, model.encoder_q, reducer=config.mgd_reducer,
                                                        loss_factor=config.mgd_loss_factor).to(device)
            distill.student_taps, distill.teacher_taps = FeatureTaps(model.encoder_q), FeatureTaps(teacher)
        if config.use_embedding_losses:
            distill.embedding = build_embedding_distiller(config, teacher).to(device)
    mgd = distill.core if distill is not None else None
    params = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if mgd is not None:
        params.append({"params": list(mgd.parameters())})
    optimizer = torch.optim.SGD(params, config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    start_epoch = config.start_epoch
    resume = config.resume or ckpt.latest_checkpoint(output_dir)
    rng_to_restore = None
    if resume:
        state = load_checkpoint_file(resume, "--resume checkpoint")
        check_resume(state, config, str(resume))
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["state_dict"].items()})
        optimizer.load_state_dict(state["optimizer"])
        if mgd is not None:
            mgd.load_state_dict(state["mgd"])
        if distill is not None and distill.embedding is not None and state.get("embedding"):
            distill.embedding.load_state_dict(state["embedding"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"]
        rng_to_restore = state.get("rng")
        logger.info(f"resumed from {resume} at epoch {start_epoch}")

    ddp_model = model
    if env.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        ddp_model = DistributedDataParallel(model, device_ids=device_ids)
        if mgd is not None:
            distill.distiller = DistributedDataParallel(mgd, device_ids=device_ids)

    def train_images(transform):
        # Training, matching and the kNN bank all see the same --max-images subset.
        dataset = build_dataset(config.dataset, config.data, "train", transform, config.max_skipped_images)
        return random_subset(dataset, config.max_images, seed) if config.max_images else dataset

    train_set = train_images(TwoCropsTransform(pretrain_transform(config.image_size, config.aug_plus)))
    train_loader = _loader(train_set, batch, env, True, config.workers, seed, drop_last=True)
    match_epochs, match_loader = [], None
    if mgd is not None:
        match_epochs = matching_epochs(config.mgd_schedule, config.epochs)
        match_set = random_subset(train_images(eval_transform(config.image_size)), config.mgd_samples, seed)
        match_loader = _loader(match_set, batch, env, False, config.workers, seed, drop_last=False)
    knn_sets = None
    if config.knn_freq:
        knn_sets = (train_images(eval_transform(config.image_size)),
                    build_dataset(config.dataset, config.data, "val", eval_transform(config.image_size)))
    metrics = MetricsLog(output_dir, env.is_main, config.wandb_project or None, config=config.to_dict())

    def knn_monitor(network: nn.Module, kind: str, epoch: int) -> None:
        result = knn_evaluate(network, *knn_sets, batch, device, config.knn_k, config.knn_t, config.workers,
                              autocast_dtype)
        if distill is not None:  # the trunk's forward went through the tapped blocks
            distill.clear_taps()
        logger.info(f"kNN ({kind}, k={config.knn_k}, T={config.knn_t}) after {epoch} epoch(s): "
                    + " ".join(f"{name} {value:.2f}" for name, value in result.items()))
        metrics.log(kind, epoch=epoch, **result)
    logger.info(f"pretraining {config.arch} on {len(train_set)} images, {env.world_size} process(es) x {batch} "
                f"images on {device}; MGD {'from ' + config.teacher_arch + ' ' + config.mgd_reducer if mgd else 'off'}; "
                f"embedding losses {', '.join(distill.embedding.active) if distill and distill.embedding else 'off'}; "
                f"autocast {autocast_dtype}; output in {output_dir}")

    if rng_to_restore is not None:
        ckpt.set_rng_state(rng_to_restore)
    if knn_sets is not None and distill is not None and start_epoch == 0:
        # The reference line the student is heading for (the trunk: the teacher may output its embedding).
        knn_monitor(resnet_trunk(distill.teacher), "knn_teacher", 0)
    if mgd is not None and not mgd.is_matched:
        if config.mgd_schedule.strip() == "none":
            mgd.set_fixed_matching()
            logger.info("--mgd-schedule none: teacher channels assigned in order, never matched")
        else:
            run_matching_update(distill, match_loader, None, device, autocast_dtype, epoch=0, metrics=metrics)
    try:
        for epoch in range(start_epoch, config.epochs):
            train_loader.sampler.set_epoch(epoch)
            lr = learning_rate(config.lr, epoch, config.epochs, config.cos, config.schedule)
            set_learning_rate(optimizer, lr)
            means = train_one_epoch(ddp_model, optimizer, train_loader, epoch, device, distill, scaler,
                                    autocast_dtype, channels_last, config.print_freq, metrics)
            metrics.log("epoch", epoch=epoch, lr=lr, **means)
            if mgd is not None and epoch + 1 in match_epochs:
                run_matching_update(distill, match_loader, None, device, autocast_dtype, epoch + 1, metrics)
            if knn_sets is not None and (epoch + 1) % config.knn_freq == 0:
                knn_monitor(resnet_trunk(model.encoder_q), "knn", epoch + 1)
            if env.is_main:
                state = {
                    "epoch": epoch + 1, "arch": config.arch,
                    "state_dict": ckpt.with_module_prefix(model.state_dict()),
                    "optimizer": optimizer.state_dict(),
                    "mgd": mgd.state_dict() if mgd is not None else None,
                    "embedding": distill.embedding.state_dict() if distill and distill.embedding else None,
                    "scaler": scaler.state_dict(), "rng": ckpt.rng_state(), "config": config.to_dict(),
                }
                path = ckpt.save_checkpoint(state, ckpt.checkpoint_path(output_dir, epoch), config.keep_checkpoints)
                logger.info(f"epoch {epoch} done: InfoNCE {means['infonce']:.4f}"
                            + (f" MGD {means['mgd']:.4f}" if mgd else "")
                            + "".join(f" {name} {means[name]:.4f}" for name in ("cckd", "disco", "seed") if name in means)
                            + f" acc@1 {means['acc1']:.1f} {means['images_per_s']:.1f} img/s; saved {path}")
        if env.is_main:
            _write_figures(output_dir, metrics)
    except NonFiniteLossError as exc:
        logger.error(str(exc))
        raise
    finally:
        metrics.close()


def _write_figures(output_dir: Path, metrics: MetricsLog) -> None:
    """The run's figures beside its log, and in wandb when it is on.

    The checkpoints are already saved: a figure that cannot be drawn is a warning, not a failed run.
    """
    from moco_mgd import plots  # matplotlib is imported only here, once per run

    try:
        paths = plots.write_run_figures(output_dir, metrics_log=metrics)
    except (OSError, ValueError) as exc:
        logger.warning(f"figures not drawn ({exc}); retry with: python -m moco_mgd.plots {output_dir}")
        return
    logger.info("figures: " + ", ".join(str(p) for p in paths))

