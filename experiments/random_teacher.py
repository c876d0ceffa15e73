"""A teacher that knows nothing: the negative control of the distillation study.

A claim that the student inherits what its teacher learned needs a teacher that learned
nothing: if MGD from a random-weight ResNet-50 helps as much as from a trained one, the gain
comes from the feature target itself (for example, from slowing the drift away from random
features), not from the teacher's knowledge. Two forms:

- as initialised: torchvision's initialisation of ``-a`` with ``torch.manual_seed(--seed)``,
  BN at its defaults (running mean 0, variance 1);
- ``--recalibrate-bn``: the same weights, with every BN's running statistics re-estimated on
  the training images (the ``--max-images`` subset of ``main_moco_mgd.py`` with the same
  ``--seed``), as a network that has seen the data but learned nothing from it would have.

The result is ``OUTPUT/teacher.pth``, a plain torchvision state dict like the supervised
teacher's, which ``main_moco_mgd.py --teacher-checkpoint`` reads.

    python experiments/random_teacher.py /usr/share/datasets/fashion-mnist --dataset fashion-mnist \\
        --image-size 32 -a resnet50 --max-images 2048 --seed 0 --recalibrate-bn --output-dir output/random_teacher
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from moco_mgd.models.resnet import build_resnet
from moco_mgd.data import eval_transform
from moco_mgd.runtime.logs import MetricsLog, setup_logging
from supervised_teacher import TEACHER_FILE, add_teacher_arguments, teacher_images

logger = logging.getLogger("moco_mgd")


def get_args_parser() -> argparse.ArgumentParser:
    parser = add_teacher_arguments(argparse.ArgumentParser(description=__doc__,
                                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--recalibrate-bn", action="store_true",
                        help="re-estimate every BN's running statistics on the training images")
    parser.add_argument("-b", "--batch-size", default=64, type=int)
    parser.add_argument("--max-images", default=0, type=int,
                        help="the --max-images subset of main_moco_mgd.py with the same --seed (0: all)")
    parser.add_argument("--seed", default=0, type=int, help="of the weights and of the --max-images draw")
    parser.add_argument("-j", "--workers", default=2, type=int)
    parser.add_argument("--output-dir", required=True)
    return parser


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: DataLoader) -> int:
    """Replace every BN's running statistics by their average over ``loader``'s images; the weights
    stay as they are. Returns the number of images seen."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None   # a cumulative average over all batches, not an exponential one
    model.train()
    seen = 0
    for images, _ in loader:
        model(images)
        seen += len(images)
    for bn in bns:
        bn.momentum = 0.1
    return seen


def main(argv: list[str] | None = None) -> Path:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 2 or args.image_size < 1 or args.max_images < 0 or args.workers < 0:
        parser.error("-b must be at least 2 (BN statistics), --image-size at least 1, --max-images and -j >= 0")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    setup_logging(output, 0)
    dataset, classes = teacher_images(args, parser, eval_transform(args.image_size))
    torch.manual_seed(args.seed)
    model = build_resnet(args.arch, num_classes=classes, stem=args.stem)
    how = "as initialised"
    if args.recalibrate_bn:
        loader = DataLoader(dataset, args.batch_size, num_workers=args.workers)
        seen = recalibrate_bn(model, loader)
        how = f"BN statistics re-estimated on {seen} training images"
    teacher = output / TEACHER_FILE
    tmp = teacher.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(teacher)
    MetricsLog(output, True).log("random_teacher", seed=args.seed, recalibrate_bn=args.recalibrate_bn)
    logger.info(f"random-weight {args.arch} (seed {args.seed}, {how}): {teacher}")
    return teacher


if __name__ == "__main__":
    main()
