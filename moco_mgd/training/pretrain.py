"""MoCo-v2 pretraining with MGD and the embedding losses: the run of one process.

Every launch mode (one process, ``mp.spawn``, torchrun, SLURM) ends in :func:`pretrain`,
with a configuration already checked by :func:`moco_mgd.training.config.validate`.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from moco_mgd.runtime import checkpoint as ckpt
from moco_mgd.models.resnet import load_checkpoint_file, load_frozen_teacher, resnet_trunk
from moco_mgd.runtime.data import TwoCropsTransform, build_dataset, eval_transform, pretrain_transform, random_subset
from moco_mgd.losses.mgd_distiller import MGDistiller
from moco_mgd.training.engine import (Distillation, NonFiniteLossError, diagnostics_text, learning_rate, matching_epochs,
                             run_matching_update, set_learning_rate, train_one_epoch)
from moco_mgd.evaluation.knn import knn_evaluate
from moco_mgd.runtime.launch import DistEnv, per_process_batch
from moco_mgd.runtime.logs import MetricsLog, setup_logging
from moco_mgd.training.config import PretrainConfig, build_embedding_distiller, build_moco, check_resume
from moco_mgd.models.taps import FeatureTaps

__all__ = ["pretrain"]

logger = logging.getLogger("moco_mgd")


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
                            + "".join(f" {name} {means[name]:.4g}" for name in ("cckd", "disco", "seed") if name in means)
                            + f" acc@1 {means['acc1']:.1f} {diagnostics_text(means)} "
                            f"{means['images_per_s']:.1f} img/s; saved {path}")
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
    from moco_mgd.runtime import plots  # matplotlib is imported only here, once per run

    try:
        paths = plots.write_run_figures(output_dir, metrics_log=metrics)
    except (OSError, ValueError) as exc:
        logger.warning(f"figures not drawn ({exc}); retry with: python -m moco_mgd.runtime.plots {output_dir}")
        return
    logger.info("figures: " + ", ".join(str(p) for p in paths))

