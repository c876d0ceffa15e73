"""Refusing a pretraining run before it starts: the flags' ranges, the data, the teacher, the output
directory and the checkpoint to resume from, each problem with its fix."""
from __future__ import annotations

import os

from moco_mgd.checkpoints import files as ckpt
from moco_mgd.checkpoints.formats import check_pretraining_checkpoint, load_checkpoint_file, load_frozen_teacher
from moco_mgd.data import build_dataset, check_same_classes
from moco_mgd.losses.embedding import EmbeddingDistiller
from moco_mgd.losses.mgd import REDUCERS
from moco_mgd.losses.mgd_distiller import DEFAULT_STAGE_WEIGHTS, MGDistiller
from moco_mgd.models.resnet import arch_stage_channels, head_dim
from moco_mgd.models.stages import check_image_size
from moco_mgd.runtime.flag_checks import AT_LEAST_1, IN_0_1, NON_NEGATIVE, POSITIVE, check_numbers, training_rules
from moco_mgd.runtime.launch import per_process_batch
from moco_mgd.training.bags import bag_source, check_bag_size, check_bags, read_bags
from moco_mgd.training.config import PretrainConfig
from moco_mgd.training.schedules import matching_epochs

__all__ = ["validate", "check_resume"]


def validate(config: PretrainConfig, world_size: int, local_world_size: int) -> None:
    """Refuse a run that cannot work, before anything starts. Raises with the fix in the message."""
    c = config
    check_numbers(training_rules(c) + [
        ("--moco-dim", c.moco_dim, *AT_LEAST_1), ("--moco-k", c.moco_k, *AT_LEAST_1),
        ("--moco-m", c.moco_m, *IN_0_1), ("--moco-t", c.moco_t, *POSITIVE),
        ("--mgd-loss-factor", c.mgd_loss_factor, *POSITIVE), ("--mgd-samples", c.mgd_samples, *AT_LEAST_1),
        ("--cckd-weight", c.cckd_weight, *NON_NEGATIVE), ("--cckd-gamma", c.cckd_gamma, *POSITIVE),
        ("--cckd-order", c.cckd_order, *NON_NEGATIVE), ("--disco-weight", c.disco_weight, *NON_NEGATIVE),
        ("--mlp-hidden-dim", c.mlp_hidden_dim, NON_NEGATIVE[0], ">= 0 (0: MoCo's width)"),
        ("--seed-weight", c.seed_weight, *NON_NEGATIVE), ("--seed-queue", c.seed_queue, *AT_LEAST_1),
        ("--seed-t", c.seed_t, *POSITIVE), ("--seed-teacher-t", c.seed_teacher_t, *POSITIVE),
        ("--bingo-weight", c.bingo_weight, *NON_NEGATIVE), ("--bingo-k", c.bingo_k, *AT_LEAST_1),
        ("--bingo-t", c.bingo_t, *POSITIVE), ("--bingo-queue", c.bingo_queue, *AT_LEAST_1),
        ("--bingo-warmup-epochs", c.bingo_warmup_epochs, *NON_NEGATIVE),
        ("--shuffle-bn-splits", c.shuffle_bn_splits, *AT_LEAST_1),
        ("--keep-checkpoints", c.keep_checkpoints, NON_NEGATIVE[0], ">= 0 (0: all)"),
        ("--max-skipped-images", c.max_skipped_images, *NON_NEGATIVE),
        ("--knn-freq", c.knn_freq, NON_NEGATIVE[0], ">= 0 (0: off)"), ("--knn-k", c.knn_k, *AT_LEAST_1),
        ("--knn-t", c.knn_t, *POSITIVE), ("--crop-min", c.crop_min, lambda v: 0 < v <= 1, "> 0 and <= 1"),
    ])
    check_image_size(config.image_size, config.stem)
    if local_world_size > config.batch_size:
        raise ValueError(f"-b/--batch-size {config.batch_size} is smaller than the {local_world_size} processes "
                         f"of a node: each process needs at least one image")
    global_batch = per_process_batch(config.batch_size, local_world_size) * world_size
    if config.moco_k % global_batch:
        raise ValueError(f"--moco-k {config.moco_k} is not divisible by the global batch size {global_batch} "
                         f"({world_size} processes x {global_batch // world_size}): the queue is filled in whole "
                         f"batches; choose K as a multiple of {global_batch}")
    weights = config.mgd_stage_weights
    if len(weights) != len(DEFAULT_STAGE_WEIGHTS) or min(weights) < 0 or max(weights) <= 0:
        raise ValueError(f"--mgd-stage-weights {' '.join(f'{w:g}' for w in weights)}: give one weight >= 0 per "
                         f"ResNet stage ({len(DEFAULT_STAGE_WEIGHTS)}), at least one positive (0 leaves a stage out; "
                         f"default {' '.join(f'{w:g}' for w in DEFAULT_STAGE_WEIGHTS)}, the authors')")
    if config.mgd_reducer not in REDUCERS:
        raise ValueError(f"unknown --mgd-reducer {config.mgd_reducer!r}: choose one of {', '.join(REDUCERS)}")
    matching_epochs(config.mgd_schedule, config.epochs)
    if config.use_embedding_losses and not config.teacher_checkpoint:
        raise ValueError("--cckd-weight / --disco-weight / --seed-weight / --bingo-weight distil from a teacher: pass "
                         "--teacher-checkpoint (add --no-mgd to use the embedding losses without MGD)")
    if config.mlp_hidden_dim and not config.mlp:
        raise ValueError(f"--mlp-hidden-dim {config.mlp_hidden_dim} widens the MoCo-v2 MLP head: add --mlp")
    if config.embedding_bn and not config.mlp:
        raise ValueError("--embedding-bn is a layer of the MoCo-v2 MLP head: add --mlp")
    for loss, queue in _queued_losses(config):
        if queue % global_batch:
            raise ValueError(f"--{loss}-queue {queue} is not divisible by the global batch size {global_batch}: "
                             f"{loss.upper()}'s queue is filled in whole batches; choose a multiple of {global_batch}")
    if config.bingo_bags and not config.bingo_weight > 0:
        raise ValueError(f"--bingo-bags {config.bingo_bags} is for BINGO: give --bingo-weight a positive value")
    train_set = build_dataset(config.dataset, config.data, "train", val_holdout=config.val_holdout)
    if config.use_bingo:
        images = min(len(train_set), config.max_images or len(train_set))
        check_bag_size(config.bingo_k, images)
        if config.bingo_bags:
            if not os.path.isfile(config.bingo_bags):
                raise ValueError(f"--bingo-bags {config.bingo_bags}: no such file (build one with python -m "
                                 f"moco_mgd.training.bags, or leave the flag out to build them in --output-dir)")
            check_bags(read_bags(config.bingo_bags), config.bingo_bags, bag_source(**config.bag_source_arguments(images)),
                       config.bingo_k)
    if config.knn_freq:
        check_same_classes(train_set, build_dataset(config.dataset, config.data, "val", val_holdout=config.val_holdout))
    ckpt.check_writable(config.output_dir)
    if config.use_teacher:
        teacher = load_frozen_teacher(config.teacher_arch, config.teacher_checkpoint, stem=config.stem,
                                      with_head=config.use_embedding_losses)
        if config.use_mgd:
            MGDistiller.from_teacher(teacher, arch_stage_channels(config.arch))
        if config.use_embedding_losses:
            EmbeddingDistiller(config.moco_dim, head_dim(teacher), **config.embedding_arguments())
    resume = config.resume or ckpt.latest_checkpoint(config.output_dir)
    if resume:
        check_resume(load_checkpoint_file(resume, "--resume checkpoint"), config, str(resume), world_size)


def _queued_losses(config: PretrainConfig) -> list[tuple[str, int]]:
    """The embedding losses that are on and keep a queue of teacher embeddings, with its size."""
    return [(loss, queue) for loss, weight, queue in (("bingo", config.bingo_weight, config.bingo_queue),
                                                      ("seed", config.seed_weight, config.seed_queue)) if weight > 0]


def check_resume(checkpoint, config: PretrainConfig, path: str, world_size: int) -> None:
    """A checkpoint must come from a run of the same student (and teacher, with MGD on); one saved
    mid-epoch, from the same processes and batch (the rest of the epoch is their shards)."""
    check_pretraining_checkpoint(checkpoint, path)
    saved = checkpoint.get("config") or {}
    differences = []
    if checkpoint.get("iteration") is not None:
        epoch = checkpoint["epoch"]
        instead = (f"resume from the end of epoch {epoch - 1} (--resume ...checkpoint_{epoch - 1:04d}.pth.tar)"
                   if epoch > 0 else "start again in a new --output-dir")
        for what, then, now in (("processes", checkpoint.get("world_size"), world_size),
                                ("-b/--batch-size", saved.get("batch_size"), config.batch_size)):
            if then is not None and then != now:
                differences.append(f"it was saved {checkpoint['iteration']} iterations into epoch {epoch} by a "
                                   f"run with {what} {then} (now {now}), and the rest of that epoch is their "
                                   f"shards: go on with {then}, or {instead}")
    if checkpoint.get("arch") != config.arch:
        differences.append(f"student -a {checkpoint.get('arch')!r} vs {config.arch!r}")
    for key in ("moco_dim", "moco_k", "mlp", "stem", "mlp_hidden_dim", "embedding_bn"):
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
    for loss, queue in _queued_losses(config):
        if f"{loss}_queue.queue" not in (checkpoint.get("embedding") or {}):
            differences.append(f"it has no {loss.upper()} queue while --{loss}-weight is on (start a new --output-dir)")
        elif f"{loss}_queue" in saved and saved[f"{loss}_queue"] != queue:
            differences.append(f"{loss}_queue {saved[f'{loss}_queue']!r} vs {queue!r}")
    if differences:
        raise ValueError(f"cannot resume from {path}: " + "; ".join(differences))
