#!/usr/bin/env python
"""Linear classification on a frozen pretrained backbone: a drop-in for MoCo's main_lincls.py.

Same flags and defaults as facebookresearch/moco's main_lincls.py (``--pretrained`` reads the
official MoCo checkpoints, this project's, and torchvision state dicts), plus ``--output-dir``,
``--dataset``, ``--image-size``, ``--stem``, ``--nproc-per-node`` and ``--cached-features``.
"""
from __future__ import annotations

import argparse
import sys

from moco_mgd.models.resnet import STEMS
from moco_mgd.runtime import launch
from moco_mgd.data import DATASETS, VAL_HOLDOUT_HELP
from moco_mgd.evaluation.lincls import LinclsConfig, check_config, linear_eval
from moco_mgd.training.flags import moco_argument_parser


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser, moco = moco_argument_parser(
        "Linear classification on a frozen backbone", "main_lincls.py", add_help,
        data_help="dataset root with train/ and val/ (image folders); for fashion-mnist the IDX "
                  "directory (default: Debian's /usr/share/datasets/fashion-mnist)",
        arch_help="architecture of the pretrained backbone (checked against --pretrained)",
        resume_help="checkpoint of this script (checkpoint.pth.tar) to resume training or to --evaluate")
    moco.add_argument("-e", "--evaluate", action="store_true", help="only evaluate the model on val/")
    moco.add_argument("--pretrained", type=str,
                      help="pretrained weights: an official MoCo checkpoint (module.encoder_q.*), one of "
                           "main_moco_mgd.py, or a torchvision state dict; none: a random backbone")

    run = parser.add_argument_group("run")
    run.add_argument("--dataset", choices=DATASETS,
                     help="fashion-mnist: train on its training set, evaluate on its test set")
    run.add_argument("--output-dir", help="checkpoint.pth.tar, model_best.pth.tar, log.txt and "
                     "metrics.jsonl go here")
    run.add_argument("--image-size", type=int, help="crop size (e.g. 32-64 for Fashion-MNIST)")
    run.add_argument("--stem", choices=STEMS,
                     help="the stem the backbone was pretrained with ('small': 3x3 stride-1 conv, no max-pool)")
    run.add_argument("--cached-features", action="store_true",
                     help="compute the frozen backbone's pooled features of train/ and val/ once and train "
                          "fc on them (minutes instead of hours on CPU). Differs from the protocol: training "
                          "images are not augmented (the val resize + centre crop replaces RandomResizedCrop + "
                          "flip). Same optimizer, schedule, batch size and checkpoints")
    run.add_argument("--knn-k", type=int,
                     help="with --cached-features, also the kNN top-1 of those features (this many neighbours, "
                          "the pretraining monitor's protocol; 0: off)")
    run.add_argument("--knn-t", type=float, help="the kNN vote temperature")
    run.add_argument("--max-images", type=int,
                     help="train fc on a random subset of this many labelled images (0: all); with the same "
                          "--seed it is the subset main_moco_mgd.py --max-images pretrained on")
    run.add_argument("--val-holdout", type=float, help=VAL_HOLDOUT_HELP)
    return launch.set_config_defaults(parser, LinclsConfig)


def main(argv: list[str] | None = None) -> None:
    launch.run_main(get_args_parser(), argv, LinclsConfig, check_config, linear_eval, "main_lincls.py")


if __name__ == "__main__":
    sys.exit(main())
