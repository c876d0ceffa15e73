"""A supervised teacher: the positive control of the distillation study.

MGD is a feature-distillation method; the paper shows it with supervised teachers too
(Tables 1-2). A ResNet-50 trained with labels on the same training images is far better
than a MoCo-v2 ResNet-18 trained on them without labels, and cheap to train on a CPU, so
distilling it shows whether MGD transfers what a good teacher knows. If an MGD student of
this teacher does not beat the MoCo-v2 baseline, suspect a defect, not the method.

The teacher sees the ``--max-images`` subset that ``main_moco_mgd.py --max-images`` with the
same ``--seed`` trains on, and nothing else. The result is ``OUTPUT/teacher.pth``, a plain
torchvision state dict (``torchvision.models.<arch>(num_classes=...)`` loads it), which
``main_moco_mgd.py --teacher-checkpoint`` reads. Each epoch writes a checkpoint; a run
started again with the same command resumes from the newest one.

    python experiments/supervised_teacher.py /usr/share/datasets/fashion-mnist --dataset fashion-mnist \\
        --image-size 32 -a resnet50 --epochs 8 --max-images 8192 --seed 0 --output-dir output/sup_teacher
"""
from __future__ import annotations

import argparse
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


from moco_mgd.checkpoints import files as ckpt
from moco_mgd.models.resnet import RESNET_ARCHS, STEMS, build_resnet
from moco_mgd.data import (DATASETS, IMAGENET_MEAN, IMAGENET_STD, VAL_HOLDOUT_HELP, build_dataset,
                                   random_subset)
from moco_mgd.training.schedules import set_learning_rate
from moco_mgd.runtime.logs import MetricsLog, setup_logging

logger = logging.getLogger("moco_mgd")
TEACHER_FILE = "teacher.pth"


def add_teacher_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every teacher-making script shares: the images and the network's shape."""
    parser.add_argument("data", metavar="DATA", nargs="?", default="",
                        help="image folders (train/CLASS/*), or the Fashion-MNIST IDX directory")
    parser.add_argument("--dataset", default="imagefolder", choices=DATASETS)
    parser.add_argument("-a", "--arch", default="resnet50", choices=RESNET_ARCHS)
    parser.add_argument("--stem", default="imagenet", choices=STEMS)
    parser.add_argument("--image-size", default=224, type=int)
    parser.add_argument("--val-holdout", default=0.0, type=float, help=VAL_HOLDOUT_HELP)
    return parser


def teacher_images(args: argparse.Namespace, parser: argparse.ArgumentParser, transform) -> tuple[Dataset, int]:
    """The students' training images (the --max-images subset of the same --seed, from the kept part
    with --val-holdout) and the number of classes; a bad --data or --dataset exits with the reason."""
    try:
        dataset = build_dataset(args.dataset, args.data, "train", transform, val_holdout=args.val_holdout)
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    classes = len(dataset.classes)
    return (random_subset(dataset, args.max_images, args.seed) if args.max_images else dataset), classes


def get_args_parser() -> argparse.ArgumentParser:
    parser = add_teacher_arguments(argparse.ArgumentParser(description=__doc__,
                                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--epochs", default=8, type=int)
    parser.add_argument("-b", "--batch-size", default=64, type=int)
    parser.add_argument("--lr", default=2e-3, type=float,
                        help="AdamW lr: linear warm-up over the first epoch, then half-cosine, per iteration")
    parser.add_argument("--wd", "--weight-decay", dest="weight_decay", default=0.05, type=float)
    parser.add_argument("--max-images", default=0, type=int,
                        help="train on a random subset of this many images (0: all); the subset of "
                             "main_moco_mgd.py --max-images with the same --seed")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("-j", "--workers", default=2, type=int)
    parser.add_argument("-p", "--print-freq", default=50, type=int)
    parser.add_argument("--output-dir", required=True)
    return parser


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not args.lr > 0:
        parser.error(f"--lr {args.lr}: must be positive")
    if args.max_images < 0 or args.workers < 0:
        parser.error("--max-images and --workers must not be negative")


def train_transform(image_size: int) -> transforms.Compose:
    """Mild augmentation: a supervised teacher only needs not to overfit a few thousand images."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(0.9, 1.1)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def zero_init_residuals(model: nn.Module) -> None:
    """Start every residual block as the identity (Goyal et al. 2017; torchvision's zero_init_residual).

    Without it a ResNet-50 spends its first epoch on a few thousand images near chance.
    """
    for block in model.modules():
        last_bn = getattr(block, "bn3", None) if hasattr(block, "conv3") else getattr(block, "bn2", None)
        if hasattr(block, "downsample") and last_bn is not None:
            nn.init.zeros_(last_bn.weight)


def warmup_cosine_lr(base_lr: float, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Linear warm-up over the first epoch, then half-cosine to zero at the last step."""
    total = steps_per_epoch * epochs
    warmup = min(1.0, (step + 1) / steps_per_epoch)
    return base_lr * warmup * 0.5 * (1.0 + math.cos(math.pi * step / total))


def main(argv: list[str] | None = None) -> Path:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    ckpt.check_writable(output)
    setup_logging(output, 0)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    dataset, classes = teacher_images(args, parser, train_transform(args.image_size))
    if len(dataset) < args.batch_size:
        parser.exit(2, f"{parser.prog}: error: {len(dataset)} training images are fewer than one batch "
                       f"(-b {args.batch_size})\n")
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(dataset, args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
                        generator=generator, persistent_workers=args.workers > 0)
    model = build_resnet(args.arch, num_classes=classes, stem=args.stem)
    zero_init_residuals(model)
    # AdamW, not SGD: a ResNet-50 from scratch on a few thousand small images reached 61% train
    # accuracy in 4 epochs with SGD (lr 0.02, warm-up; 0.05 diverged), which is no teacher.
    optimizer = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=args.weight_decay)
    start_epoch = 0
    resume = ckpt.latest_checkpoint(output)
    if resume is not None:
        state = torch.load(resume, map_location="cpu", weights_only=True)
        if state.get("arch") != args.arch:
            parser.exit(2, f"{parser.prog}: error: {resume} holds a {state.get('arch')}, not -a {args.arch}: "
                           "pass another --output-dir\n")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(state["rng"])
        generator.set_state(state["loader_rng"])
        start_epoch = state["epoch"]
        logger.info(f"resumed from {resume} at epoch {start_epoch}")
    metrics = MetricsLog(output, True)
    logger.info(f"supervised {args.arch} ({args.stem} stem) on {len(dataset)} images of {args.image_size} px, "
                f"{classes} classes, {args.epochs} epochs; output in {output}")
    criterion = nn.CrossEntropyLoss()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for i, (images, labels) in enumerate(loader):
            lr = warmup_cosine_lr(args.lr, epoch * len(loader) + i, len(loader), args.epochs)
            set_learning_rate(optimizer, lr)
            logits = model(images)
            loss = criterion(logits, labels)
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite loss at epoch {epoch} iteration {i}: lower --lr; "
                                 f"the last checkpoint in {output} is intact")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            if args.print_freq and i % args.print_freq == 0:
                logger.info(f"epoch {epoch} [{i + 1}/{len(loader)}] loss {float(loss):.4f} lr {lr:.4g}")
        seconds = time.perf_counter() - start
        means = {"loss": loss_sum / seen, "acc1": 100.0 * correct / seen, "images_per_s": seen / seconds}
        metrics.log("epoch", epoch=epoch, lr=lr, **means)
        path = ckpt.save_checkpoint({"epoch": epoch + 1, "arch": args.arch, "state_dict": model.state_dict(),
                                     "optimizer": optimizer.state_dict(), "rng": ckpt.rng_state(),
                                     "loader_rng": generator.get_state(), "config": vars(args)},
                                    ckpt.checkpoint_path(output, epoch), keep=2)
        logger.info(f"epoch {epoch} done: loss {means['loss']:.4f} train acc@1 {means['acc1']:.1f} "
                    f"{means['images_per_s']:.1f} img/s; saved {path}")
    teacher = output / TEACHER_FILE
    tmp = teacher.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(teacher)
    logger.info(f"teacher weights (torchvision layout, {classes}-way fc): {teacher}")
    metrics.close()
    return teacher


if __name__ == "__main__":
    main()
