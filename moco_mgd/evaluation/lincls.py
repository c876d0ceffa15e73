"""Linear classification on a frozen backbone: the protocol of MoCo's main_lincls.py.

``main_lincls.py`` parses the command line into a :class:`LinclsConfig`, calls :func:`check_config` (every
bad input fails there, before any process starts), then launches :func:`linear_eval` in each process. Only
``fc`` trains; the backbone stays in eval mode, so neither its weights nor its BN running statistics move.
Cached-features mode departs from the protocol: training images are not augmented (the val transform
replaces RandomResizedCrop + flip), so the backbone's pooled features are computed once and ``fc`` trains
on them (minutes instead of hours on CPU); optimizer, lr schedule, batch and checkpoints are unchanged.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset
from torchvision import transforms

from moco_mgd.runtime import distributed
from moco_mgd.checkpoints.formats import load_checkpoint_file, load_pretrained_backbone
from moco_mgd.models.resnet import build_resnet, resnet_trunk
from moco_mgd.models.stages import check_image_size
from moco_mgd.checkpoints.files import check_writable, save_checkpoint, with_module_prefix
from moco_mgd.data import (IMAGENET_MEAN, IMAGENET_STD, build_dataset, check_same_classes, eval_transform,
                           random_subset)
from moco_mgd.training.schedules import learning_rate, set_learning_rate
from moco_mgd.evaluation.features import extract_features
from moco_mgd.evaluation.knn import KNN_T, knn_features_accuracy
from moco_mgd.training.flags import MocoRunConfig
from moco_mgd.runtime.flag_checks import NON_NEGATIVE, POSITIVE, check_numbers, training_rules
from moco_mgd.runtime.launch import DistEnv, per_process_batch
from moco_mgd.runtime.loader_workers import shut_down_workers
from moco_mgd.runtime.logs import MetricsLog, setup_logging

__all__ = ["LinclsConfig", "check_config", "linear_eval", "build_linear_model", "check_frozen_weights",
           "train_transform", "train_epoch", "validate"]

logger = logging.getLogger("moco_mgd")
CHECKPOINT, BEST_CHECKPOINT = "checkpoint.pth.tar", "model_best.pth.tar"
# Both files at every epoch, as MoCo writes them, took most of a --cached-features run (0.2-0.4 s
# of writing against milliseconds of training per epoch). An epoch on images is longer than
# this, so it is still saved every epoch; a stop between saves loses at most this much.
SAVE_INTERVAL_S = 60.0


@dataclass
class LinclsConfig(MocoRunConfig):
    """Everything a linear-evaluation run depends on; stored in its checkpoints as a plain dict. The fields
    it shares with pretraining are :class:`~moco_mgd.training.flags.MocoRunConfig`'s; these defaults are
    MoCo's main_lincls.py."""

    arch: str = "resnet50"
    epochs: int = 100
    lr: float = 30.0
    schedule: list[int] = field(default_factory=lambda: [60, 80])
    weight_decay: float = 0.0
    evaluate: bool = False
    pretrained: str = ""
    cached_features: bool = False
    knn_k: int = 0
    knn_t: float = KNN_T   # the same default as pretraining's monitor and the kNN command


def train_transform(image_size: int = 224):
    """MoCo's linear-classification augmentation: random resized crop and flip, no colour changes."""
    return transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_linear_model(arch: str, num_classes: int, pretrained_path: str = "",
                       stem: str = "imagenet") -> tuple[nn.Module, str]:
    """A ResNet whose backbone is frozen (pretrained if asked) and whose fresh ``fc`` alone trains.

    Args:
        arch, stem: the architecture (``RESNET_ARCHS``) and stem the weights must fit (all but ``fc``).
        num_classes: outputs of the new ``fc``.
        pretrained_path: a checkpoint in any layout of ``moco_mgd.models.resnet`` ("" = random backbone).
    Returns:
        ``(model, description)``: only ``fc.weight``/``fc.bias`` require grad, ``fc`` ~ N(0, 0.01)
        with bias 0 (as MoCo); a one-line account of what was loaded, to log.
    Raises:
        FileNotFoundError / ValueError: a missing file, no backbone (keys listed), another architecture.
    """
    model = build_resnet(arch, num_classes=num_classes, stem=stem)
    description = f"{arch} with a random backbone (no --pretrained)"
    if pretrained_path:
        backbone, head, layout = load_pretrained_backbone(model, arch, pretrained_path, "--pretrained")
        description = (f"{arch} backbone: {len(backbone)} tensors loaded from --pretrained "
                       f"{str(pretrained_path)!r} ({layout}); "
                       f"{len(head)} head tensors dropped ({', '.join(sorted(head)) or 'none'})")
    for name, param in model.named_parameters():
        param.requires_grad = name in ("fc.weight", "fc.bias")
    nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(model.fc.bias)
    return model, description + f"; backbone frozen, new fc for {num_classes} classes"


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every backbone tensor (weights and BN buffers, ``fc`` excluded)."""
    model = getattr(model, "module", model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def check_frozen_weights(model: nn.Module, pretrained_backbone: Mapping[str, torch.Tensor]) -> None:
    """MoCo's sanity check: every backbone tensor still equals ``pretrained_backbone``'s.

    Raises: AssertionError naming the first tensor (``fc`` excluded) that is missing or changed.
    """
    state = getattr(model, "module", model).state_dict()
    for key, reference in ((k, v) for k, v in pretrained_backbone.items() if not k.startswith("fc.")):
        assert key in state, f"{key} of the pretrained backbone is missing from the model"
        assert torch.equal(state[key].detach().to(reference.device), reference), \
            f"{key} changed during linear classification: the backbone must stay frozen"


def _correct(output: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    top = output.topk(min(k, output.shape[1]), dim=1).indices
    return top.eq(target[:, None]).any(dim=1).sum()


def _checkpoint_state(config: LinclsConfig, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                      best_acc1: float, copy: bool = False) -> dict:
    """MoCo's lincls checkpoint after ``epoch``; ``copy`` clones what later epochs change (fc, its momentum)."""
    state_dict = with_module_prefix(model.state_dict())
    optimizer_state = optimizer.state_dict()
    if copy:
        state_dict = {k: v.clone() if ".fc." in k else v for k, v in state_dict.items()}
        optimizer_state = deepcopy(optimizer_state)
    return {"epoch": epoch + 1, "arch": config.arch, "state_dict": state_dict, "best_acc1": best_acc1,
            "optimizer": optimizer_state, "config": asdict(config)}


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, device: torch.device,
                epoch: int, print_freq: int = 10) -> dict[str, float]:
    """One pass of cross-entropy training of what in ``model`` requires grad (``fc``).

    The whole model runs in eval mode, as in MoCo: the frozen backbone's BN layers use (and keep)
    their pretrained running statistics; ``fc`` behaves the same in both modes.

    Args:
        model: images (or cached features) -> logits; may be wrapped in DDP.
        loader, optimizer, device: yields ``(inputs, targets)``; over the trainable parameters; of the model.
        epoch, print_freq: for the log lines, every ``print_freq`` iterations (0: never).
    Returns:
        ``loss``, ``top1`` (training accuracy over all ranks) and ``images_per_s``.
    """
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x n, correct, n
    start, num_batches = time.perf_counter(), len(loader)
    for i, (inputs, targets) in enumerate(loader):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        output = model(inputs)
        loss = F.cross_entropy(output, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.stack([loss.detach() * len(targets), _correct(output.detach(), targets, 1),
                             torch.tensor(len(targets), device=device)]).double()
        if print_freq and (i % print_freq == 0 or i + 1 == num_batches):
            if not math.isfinite(value := float(loss.detach())):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} iteration {i}: lower --lr")
            logger.info(f"epoch {epoch} [{i + 1}/{num_batches}] loss {value:.4f} "
                        f"lr {optimizer.param_groups[0]['lr']:.4g}")
    loss_sum, correct, count = distributed.all_reduce_sum(sums).tolist()
    return {"loss": loss_sum / max(count, 1), "top1": 100 * correct / max(count, 1),
            "images_per_s": count / max(time.perf_counter() - start, 1e-9)}


@torch.no_grad()
def validate(model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, float]:
    """Accuracy and loss over ``loader``'s samples of every rank (counts summed, not averaged).

    Args:
        model: maps inputs to logits; DDP is unwrapped (ranks may hold uneven shards).
        loader, device: yields ``(inputs, targets)``, each rank its own shard; where the model is.
    Returns:
        ``top1``, ``top5`` (only with >= 5 classes) in percent, and the mean ``loss``.
    """
    model = getattr(model, "module", model).eval()
    num_classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, n
    for inputs, targets in loader:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        output = model(inputs).float()
        sums += torch.stack([F.cross_entropy(output, targets, reduction="sum"), _correct(output, targets, 1),
                             _correct(output, targets, 5), torch.tensor(len(targets), device=device)]).double()
    loss_sum, top1, top5, count = distributed.all_reduce_sum(sums).tolist()
    count = max(count, 1)
    return {"top1": 100 * top1 / count, **({"top5": 100 * top5 / count} if num_classes >= 5 else {}),
            "loss": loss_sum / count}


def _shard_loader(dataset, batch: int, env: DistEnv, workers: int) -> DataLoader:
    """This rank's share, without padding: each image is counted once in the summed accuracy."""
    return DataLoader(dataset, batch, sampler=distributed.shard_indices(len(dataset)),
                      num_workers=workers, pin_memory=env.device.type == "cuda")


def _tensor_batches(dataset: TensorDataset, sampler, batch: int) -> DataLoader:
    """Cached features a batch at a time, indexed at once: collating them one sample at a time cost
    more than training the linear layer on them. Same order and batches as a ``batch``-sized loader."""
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch, drop_last=False), batch_size=None)


def _load_resume(path: str, arch: str, model: nn.Module) -> Mapping:
    """Load a checkpoint of this script into ``model`` (``arch``); return it. ValueError if it does not fit."""
    state = load_checkpoint_file(path, "--resume checkpoint")
    if not {"state_dict", "optimizer", "best_acc1"} <= state.keys():
        raise ValueError(f"--resume {path!r} is not a linear-classification checkpoint: found keys "
                         f"{sorted(state)[:10]} (pretrained weights go to --pretrained)")
    if state.get("arch") != arch:
        raise ValueError(f"--resume {path!r} holds a {state.get('arch')!r} model, not -a {arch}")
    try:
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["state_dict"].items()})
    except RuntimeError as exc:
        raise ValueError(f"--resume {path!r} does not fit this model: {str(exc).splitlines()[-1].strip()}") from None
    return state


def check_config(config: LinclsConfig, world_size: int, local_world_size: int) -> None:
    """Refuse a run that cannot work, before anything starts. Raises with the fix in the message."""
    c = config
    check_numbers(training_rules(c) + [("--knn-k", c.knn_k, *NON_NEGATIVE), ("--knn-t", c.knn_t, *POSITIVE)])
    check_image_size(c.image_size, c.stem)
    if local_world_size > config.batch_size:
        raise ValueError(f"-b/--batch-size {config.batch_size} is smaller than the {local_world_size} processes "
                         f"of a node: each process needs at least one image")
    train_set = build_dataset(config.dataset, config.data, "train", val_holdout=config.val_holdout)
    check_same_classes(train_set, build_dataset(config.dataset, config.data, "val", val_holdout=config.val_holdout))
    if config.knn_k and not config.cached_features:
        raise ValueError(f"--knn-k {config.knn_k} scores the cached features: add --cached-features, or use "
                         "python -m moco_mgd.evaluation.knn for the images")
    if config.knn_k > (train_images := min(len(train_set), config.max_images or len(train_set))):
        raise ValueError(f"--knn-k {config.knn_k} is more neighbours than the {train_images} training images: "
                         "lower --knn-k")
    model, _ = build_linear_model(config.arch, len(train_set.classes), config.pretrained, config.stem)
    if resume_path(config):
        _load_resume(resume_path(config), config.arch, model)
    check_writable(config.output_dir)


def resume_path(config: LinclsConfig) -> str:
    """``--resume``, or else this output directory's own ``checkpoint.pth.tar`` (a run stopped
    and started again goes on from its last epoch by itself, as pretraining does)."""
    if config.resume or config.evaluate:
        return config.resume
    own = Path(config.output_dir) / CHECKPOINT
    return str(own) if own.is_file() else ""


def linear_eval(config: LinclsConfig, env: DistEnv) -> None:
    """The run of one process (all launch modes end here): train ``fc``, validate, checkpoint."""
    with ExitStack() as at_end:   # the loader's persistent workers end with the run, however it ends
        _linear_eval(config, env, at_end)


def _linear_eval(config: LinclsConfig, env: DistEnv, at_end: ExitStack) -> None:
    output_dir = Path(config.output_dir)
    setup_logging(output_dir, env.rank)
    if config.seed is not None:
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        torch.backends.cudnn.deterministic = True
    device, batch = env.device, per_process_batch(config.batch_size, env.local_world_size)
    def train_images(transform):
        # The subset rule of main_moco_mgd.py --max-images: the same --seed draws the same images.
        dataset = build_dataset(config.dataset, config.data, "train", transform, val_holdout=config.val_holdout)
        return random_subset(dataset, config.max_images, config.seed or 0) if config.max_images else dataset

    val_set = build_dataset(config.dataset, config.data, "val", eval_transform(config.image_size),
                            val_holdout=config.val_holdout)
    train_set = train_images(train_transform(config.image_size))
    # check_config made sure train and val have the same classes; a Subset has no .classes.
    model, description = build_linear_model(config.arch, len(val_set.classes), config.pretrained, config.stem)
    logger.info(description)
    model.to(device)
    reference = frozen_state(model) if config.pretrained else {}  # MoCo checks against --pretrained
    optimizer = torch.optim.SGD(model.fc.parameters(), config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    start_epoch, best_acc1 = config.start_epoch, 0.0
    resume = resume_path(config)
    if resume:
        state = _load_resume(resume, config.arch, model)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_acc1 = state["epoch"], float(state["best_acc1"])
        logger.info(f"resumed from {resume} at epoch {start_epoch} (best top-1 {best_acc1:.2f})")
    reference = reference or frozen_state(model)
    check_frozen_weights(model, reference)  # a --resume of another backbone than --pretrained fails here
    metrics = MetricsLog(output_dir, env.is_main, config=asdict(config))
    val_loader = _shard_loader(val_set, batch, env, config.workers)
    if config.evaluate:
        result = validate(model, val_loader, device)
        logger.info(f"evaluation on {len(val_set)} images: " + " ".join(f"{k} {v:.2f}" for k, v in result.items()))
        metrics.log("eval", **result)
        return
    net, workers = model, config.workers
    if config.cached_features:  # no augmentation: the backbone's features never change, compute them once
        cached = []
        for split in ("train", "val"):  # both under the val transform; the trunk is the model with fc = identity
            dataset = (train_images(eval_transform(config.image_size)) if split == "train" else
                       build_dataset(config.dataset, config.data, split, eval_transform(config.image_size),
                                     val_holdout=config.val_holdout))
            cached.append(TensorDataset(*extract_features(resnet_trunk(model), dataset, batch, device,
                                                          config.workers)))
            logger.info(f"cached {split} features {tuple(cached[-1].tensors[0].shape)}")
        (train_set, val_set), net, workers = cached, model.fc, 0
        if config.knn_k and start_epoch == 0:  # the same features, classified by neighbours: seconds more
            knn = knn_features_accuracy(*train_set.tensors, *val_set.tensors, model.fc.out_features, config.knn_k,
                                        config.knn_t, device)
            metrics.log("knn", epoch=0, k=config.knn_k, temperature=config.knn_t, **knn)
            logger.info(f"kNN (k={config.knn_k}, T={config.knn_t}) of the cached features: "
                        + " ".join(f"{k} {v:.2f}" for k, v in knn.items()))
        # Evaluation has no batch semantics: a few large batches are as exact and faster.
        val_loader = _tensor_batches(val_set, distributed.shard_indices(len(val_set)), max(batch, 4096))
    sampler = DistributedSampler(train_set, env.world_size, env.rank, shuffle=True, seed=config.seed or 0)
    if config.cached_features:
        train_loader = _tensor_batches(train_set, sampler, batch)
    else:
        train_loader = DataLoader(train_set, batch, sampler=sampler, num_workers=workers,
                                  pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        at_end.callback(shut_down_workers, train_loader)
    # Only fc has gradients; the frozen BN buffers never change, so there are none to broadcast.
    ddp_net = net if env.world_size == 1 else DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    logger.info(f"training fc on {len(train_set)} {'cached features' if config.cached_features else 'images'}, "
                f"{env.world_size} process(es) x {batch} on {device}; output in {output_dir}")
    best_state, last_save = None, time.monotonic()
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        lr = learning_rate(config.lr, epoch, config.epochs, False, config.schedule)
        set_learning_rate(optimizer, lr)
        train = train_epoch(ddp_net, train_loader, optimizer, device, epoch, config.print_freq)
        result = validate(net, val_loader, device)
        if epoch == start_epoch:  # MoCo's sanity check, after the first epoch; again after the last
            check_frozen_weights(model, reference)
        is_best = result["top1"] > best_acc1
        best_acc1 = max(best_acc1, result["top1"])
        metrics.log("epoch", epoch=epoch, lr=lr, train_loss=train["loss"], train_top1=train["top1"], **result)
        logger.info(f"epoch {epoch}: train loss {train['loss']:.4f} top1 {train['top1']:.2f}; val "
                    + " ".join(f"{k} {v:.2f}" for k, v in result.items()) + f"; best top1 {best_acc1:.2f}")
        if not env.is_main:
            continue
        if is_best:  # only fc changes: the best epoch's model is the frozen backbone and a copy of fc
            best_state = _checkpoint_state(config, epoch, model, optimizer, best_acc1, copy=True)
        last = epoch + 1 == config.epochs
        if last or time.monotonic() - last_save >= SAVE_INTERVAL_S:
            save_checkpoint(_checkpoint_state(config, epoch, model, optimizer, best_acc1), output_dir / CHECKPOINT)
            if best_state is not None:
                save_checkpoint(best_state, output_dir / BEST_CHECKPOINT)
                best_state = None
            last_save = time.monotonic()
    check_frozen_weights(model, reference)
    metrics.close()
