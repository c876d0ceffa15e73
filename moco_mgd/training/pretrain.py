"""MoCo-v2 pretraining with MGD and the embedding losses: the run of one process.

Every launch mode (one process, ``mp.spawn``, torchrun, SLURM) ends in :func:`pretrain`,
with a configuration already checked by :func:`moco_mgd.training.checks.validate`.
"""
from __future__ import annotations

import logging
import random
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from moco_mgd.evaluation.knn import knn_evaluate
from moco_mgd.losses.embedding import EMBEDDING_LOSSES
from moco_mgd.checkpoints.formats import load_checkpoint_file
from moco_mgd.models.moco import MoCo
from moco_mgd.models.resnet import resnet_trunk
from moco_mgd.models.stages import degenerate_image_size
from moco_mgd.checkpoints import files as ckpt
from moco_mgd.runtime import precision
from moco_mgd.runtime import distributed
from moco_mgd.data import (ResumableSampler, SeededSamples, TwoCropsTransform, WithBagMember, build_dataset,
                           eval_transform, pretrain_transform, random_subset)
from moco_mgd.runtime.launch import DistEnv, per_process_batch
from moco_mgd.runtime.logs import MetricsLog, furthest_logged, setup_logging
from moco_mgd.runtime.loader_workers import ignore_stop_signals, shut_down_workers
from moco_mgd.runtime.stopping import StopRequest, signal_names
from moco_mgd.checkpoints.files import file_sha256
from moco_mgd.training.bags import BAG_FILE, bag_source, build_bags, check_bags, read_bags
from moco_mgd.training.checks import check_resume
from moco_mgd.training.config import PretrainConfig
from moco_mgd.training.distillation import Distillation, PretrainModel, own_random_stream
from moco_mgd.training.engine import EpochProgress, NonFiniteLossError, RunStopped, diagnostics_text, train_one_epoch
from moco_mgd.training.run_state import restore_run_state, run_state
from moco_mgd.training.schedules import learning_rate, matching_epochs, set_learning_rate

__all__ = ["pretrain"]

logger = logging.getLogger("moco_mgd")


def _loader(dataset, batch_size: int, env: DistEnv, workers: int, seed: int, sampler=None):
    """The loaders of the run. Their own generator: making an iterator never draws from the global
    RNG, whose stream (shuffle BN, random drop) a mid-epoch resume restores exactly."""
    if sampler is None:
        sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=False, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=env.device.type == "cuda", drop_last=isinstance(sampler, ResumableSampler),
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=ignore_stop_signals)


def pretrain(config: PretrainConfig, env: DistEnv) -> frozenset[int]:
    """The run of one process (all launch modes end here).

    Returns the stop signals that ended it early (empty: it ran to its last epoch). On such a
    signal every rank stops at the same iteration, rank 0 saves a checkpoint there, and running
    the same command again goes on from it, bit for bit as if never stopped (on CPU).
    """
    output_dir = Path(config.output_dir)
    setup_logging(output_dir, env.rank)
    # The loaders' workers end before the stop handlers go: however the run ends (see loader_workers).
    with StopRequest.for_run(env.dist_timeout_s) as stop, ExitStack() as at_end:
        return _pretrain(config, env, output_dir, stop, at_end)


def _bingo_bags(config: PretrainConfig, env: DistEnv, output_dir: Path, distillation: Distillation, images,
                resumed_sha256: str | None, batch: int, autocast_dtype: torch.dtype | None, seed: int) -> torch.Tensor:
    """BINGO's bags for this run: those it trained with (a resume), those of --bingo-bags, or built
    in the output directory (reused while teacher and images are the same)."""
    path = Path(config.bingo_bags) if config.bingo_bags else output_dir / BAG_FILE
    source = bag_source(**config.bag_source_arguments(len(images)))
    if resumed_sha256 is not None or config.bingo_bags:
        sha256 = file_sha256(path) if path.is_file() else None
        if resumed_sha256 is not None and sha256 != resumed_sha256:
            raise ValueError(f"the checkpoint was trained with the bags of sha256 {resumed_sha256[:12]}..., and "
                             f"{path} {'is another file' if sha256 else 'is missing'}: put that bag file back "
                             f"(or pass it with --bingo-bags), or start a new --output-dir")
        state = read_bags(path)
        check_bags(state, path, source, config.bingo_k)
        bags = state["bags"]
        logger.info(f"BINGO: bags of {len(bags)} images (k={config.bingo_k}) from {path}")
    else:
        # The extraction's loader draws its seed from the global stream: drawn aside (exact pairing).
        with own_random_stream(seed, env.device):
            bags, sha256 = build_bags(distillation.teacher, images, config.bingo_k, source, path, batch, env.device,
                                      config.workers, autocast_dtype)
    distillation.bags_sha256 = sha256
    return bags


def _pretrain(config: PretrainConfig, env: DistEnv, output_dir: Path, stop: StopRequest,
              at_end: ExitStack) -> frozenset[int]:
    seed = config.seed if config.seed is not None else 0
    if config.seed is not None:
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
    device = env.device
    autocast_dtype = precision.autocast_dtype(config.amp, device)
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batch = per_process_batch(config.batch_size, env.local_world_size)

    model = MoCo(**config.moco_arguments()).to(device, memory_format=memory_format)
    distillation = Distillation.build(
        model.encoder_q, device, teacher_arch=config.teacher_arch,
        teacher_checkpoint=config.teacher_checkpoint if config.use_teacher else "", stem=config.stem,
        mgd=config.mgd_arguments(), embedding=config.embedding_arguments(), embedding_dim=config.moco_dim,
        match_epochs=matching_epochs(config.mgd_schedule, config.epochs),
        fixed_matching=config.mgd_schedule.strip() == "none", memory_format=memory_format, seed=seed)
    mgd = distillation.mgd
    pretrain_model = PretrainModel(model, distillation)
    # The MoCo parameters first, then MGD's student BNs: the optimizer state of every checkpoint so far.
    params = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    distillation_params = [p for p in distillation.parameters() if p.requires_grad]
    if distillation_params:
        params.append({"params": distillation_params})
    optimizer = torch.optim.SGD(params, config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    start_epoch, progress = config.start_epoch, None
    resume = config.resume or ckpt.latest_checkpoint(output_dir)
    rng_to_restore = None
    if resume:
        state = load_checkpoint_file(resume, "--resume checkpoint")
        check_resume(state, config, str(resume), env.world_size)
        start_epoch, progress, rng_to_restore = restore_run_state(state, model, optimizer, scaler, distillation,
                                                                  device)

    ddp_model = pretrain_model
    if env.world_size > 1:  # one wrapper for everything that trains (the frozen teacher is not a submodule)
        ddp_model = DistributedDataParallel(pretrain_model, device_ids=[device.index] if device.type == "cuda" else None)

    def train_images(transform):
        # Training, matching and the kNN bank all see the same --max-images subset.
        dataset = build_dataset(config.dataset, config.data, "train", transform, config.max_skipped_images,
                                config.val_holdout)
        return random_subset(dataset, config.max_images, seed) if config.max_images else dataset

    # Each image's augmentations are seeded by (seed, epoch, index): an epoch resumed part-way
    # goes on with the batches it would have had, whatever -j.
    augmentation = pretrain_transform(config.image_size, config.aug_plus, config.crop_min)
    train_set = SeededSamples(train_images(TwoCropsTransform(augmentation)), seed)
    if distillation.needs_bag_view:
        bags = _bingo_bags(config, env, output_dir, distillation, train_images(eval_transform(config.image_size)),
                           state.get("bingo_bags_sha256") if resume else None, batch, autocast_dtype, seed)
        train_set = WithBagMember(train_set, train_images(augmentation), bags, seed)
    sampler = ResumableSampler(train_set, batch, env.world_size, env.rank, seed)
    train_loader = _loader(train_set, batch, env, config.workers, seed, sampler)
    at_end.callback(shut_down_workers, train_loader)
    if resume:
        logger.info(f"resumed from {resume} at epoch {start_epoch}" + _resume_text(
            output_dir, start_epoch, progress, sampler.batches_per_epoch()))
    match_loader = None
    if mgd is not None:
        match_set = random_subset(train_images(eval_transform(config.image_size)), config.mgd_samples, seed)
        match_loader = _loader(match_set, batch, env, config.workers, seed)
        at_end.callback(shut_down_workers, match_loader)
    knn_sets = None
    if config.knn_freq:
        knn_sets = (train_images(eval_transform(config.image_size)),
                    build_dataset(config.dataset, config.data, "val", eval_transform(config.image_size),
                                  val_holdout=config.val_holdout))
    metrics = MetricsLog(output_dir, env.is_main, config.wandb_project or None, config=config.to_dict())

    def knn_monitor(network: nn.Module, kind: str, epoch: int) -> None:
        result = knn_evaluate(network, *knn_sets, batch, device, config.knn_k, config.knn_t, config.workers,
                              autocast_dtype)
        logger.info(f"kNN ({kind}, k={config.knn_k}, T={config.knn_t}) after {epoch} epoch(s): "
                    + " ".join(f"{name} {value:.2f}" for name, value in result.items()))
        metrics.log(kind, epoch=epoch, **result)
    if small := degenerate_image_size(config.image_size, config.stem):
        logger.warning(small)
    logger.info(f"pretraining {config.arch} on {len(train_set)} images, {env.world_size} process(es) x {batch} "
                f"images on {device}; {distillation.describe(config.teacher_arch)}; autocast {autocast_dtype}; output in {output_dir}")

    if env.world_size > 1:
        places = distributed.process_places()
        logger.info("processes: " + ", ".join(f"rank {rank} {place}" for rank, place in enumerate(places)))
    if rng_to_restore is not None:
        ckpt.set_rng_state(rng_to_restore)
    if knn_sets is not None and distillation.teacher is not None and start_epoch == 0 and progress is None:
        # The reference line the student is heading for (the trunk: the teacher may output its embedding).
        # Its loaders' seeds come from the global stream: drawn aside, as the baseline has no teacher.
        with own_random_stream(seed, device):
            knn_monitor(distillation.teacher_trunk(), "knn_teacher", 0)
    distillation.prepare(model.encoder_q, match_loader, device, autocast_dtype, metrics)
    try:
        for epoch in range(start_epoch, config.epochs):
            resumed = progress if epoch == start_epoch else None
            train_loader.sampler.set_epoch(epoch, resumed.iteration if resumed is not None else 0)
            distillation.start_epoch(epoch)
            lr = learning_rate(config.lr, epoch, config.epochs, config.cos, config.schedule)
            set_learning_rate(optimizer, lr)
            try:
                means = train_one_epoch(ddp_model, optimizer, train_loader, epoch, device, scaler,
                                        autocast_dtype, channels_last, config.print_freq, metrics, resumed, stop)
            except RunStopped as stopped:
                _save_at_stop(stopped, config, env, output_dir, metrics, sampler.batches_per_epoch(),
                              run_state(epoch, config.arch, config.to_dict(), model, optimizer, scaler, distillation, stopped.progress,
                                        env.world_size) if env.is_main else None)
                return stopped.signals
            metrics.log("epoch", epoch=epoch, lr=lr, **means)
            distillation.after_epoch(epoch + 1, model.encoder_q, match_loader, device, autocast_dtype, metrics)
            if knn_sets is not None and (epoch + 1) % config.knn_freq == 0:
                knn_monitor(resnet_trunk(model.encoder_q), "knn", epoch + 1)
            if env.is_main:
                state = run_state(epoch + 1, config.arch, config.to_dict(), model, optimizer, scaler, distillation)
                path = ckpt.save_checkpoint(state, ckpt.checkpoint_path(output_dir, epoch), config.keep_checkpoints)
                logger.info(f"epoch {epoch} done: InfoNCE {means['infonce']:.4f}"
                            + (f" MGD {means['mgd']:.4f}" if mgd else "")
                            + "".join(f" {name} {means[name]:.4g}" for name in EMBEDDING_LOSSES if name in means)
                            + f" acc@1 {means['acc1']:.1f} {diagnostics_text(means)} "
                            f"{means['images_per_s']:.1f} img/s; saved {path}")
            if epoch + 1 < config.epochs and (signals := stop.poll()):
                distributed.barrier()   # rank 0's checkpoint is complete
                metrics.log("stop", epoch=epoch + 1, iteration=0, signals=signal_names(signals))
                logger.info(f"{signal_names(signals)}: every process stopped after epoch {epoch + 1} iteration 0/"
                            f"{sampler.batches_per_epoch()} (the end of epoch {epoch}, saved above). Run the same "
                            f"command again to go on from there (nothing is trained twice)")
                return signals
        if env.is_main:
            _write_figures(output_dir, metrics)
        return frozenset()
    except (NonFiniteLossError, ckpt.CheckpointSpaceError) as exc:  # in log.txt too, not only the traceback
        logger.error(str(exc))
        raise
    finally:
        metrics.close()


def _resume_text(output_dir: Path, epoch: int, progress: EpochProgress | None, batches_per_epoch: int) -> str:
    """`` iteration K: ...``: where the resumed run goes on, and the iterations it trains again."""
    iteration = progress.iteration if progress is not None else 0
    text = f" iteration {iteration}" if iteration else ""
    furthest = furthest_logged(output_dir / "metrics.jsonl")
    if furthest is not None:
        redone = (furthest[0] - epoch) * batches_per_epoch + furthest[1] - iteration
        text += (f" ({max(redone, 0)} iteration(s) trained again: the interrupted run had logged up to epoch "
                 f"{furthest[0]} iteration {furthest[1]})")
    return text


def _save_at_stop(stopped: RunStopped, config: PretrainConfig, env: DistEnv, output_dir: Path, metrics: MetricsLog,
                  batches_per_epoch: int, state: dict | None) -> None:
    """Rank 0 saves where every rank stopped; the others wait until it is on disk."""
    names, iteration = signal_names(stopped.signals), stopped.progress.iteration
    if env.is_main:
        path = ckpt.save_checkpoint(state, ckpt.checkpoint_path(output_dir, stopped.epoch, iteration),
                                    config.keep_checkpoints)
        metrics.log("stop", epoch=stopped.epoch, iteration=iteration, signals=names)
        logger.info(f"{names}: every process stopped after epoch {stopped.epoch} iteration {iteration}/"
                    f"{batches_per_epoch}; saved {path}. Run the same command again to go on from there "
                    f"(nothing is trained twice)")
    distributed.barrier()
def _write_figures(output_dir: Path, metrics: MetricsLog) -> None:
    """The run's figures beside its log, and in wandb when it is on.

    The checkpoints are already saved: a figure that cannot be drawn is a warning, not a failed run.
    """
    from moco_mgd.reporting import plots  # matplotlib is imported only here, once per run

    try:
        paths = plots.write_run_figures(output_dir, metrics_log=metrics)
    except (OSError, ValueError) as exc:
        logger.warning(f"figures not drawn ({exc}); retry with: python -m moco_mgd.reporting.plots {output_dir}")
        return
    logger.info("figures: " + ", ".join(str(p) for p in paths))

