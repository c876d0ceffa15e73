"""The flags both entry scripts share with MoCo's main_moco.py and main_lincls.py: one block, one place."""
from __future__ import annotations

import argparse

from moco_mgd.models.resnet import RESNET_ARCHS
from moco_mgd.runtime import launch

__all__ = ["add_moco_arguments"]


def add_moco_arguments(group: argparse._ArgumentGroup, *, data_help: str, arch_help: str, resume_help: str,
                       schedule_help: str = "epochs at which lr drops x0.1") -> None:
    """MoCo's flags, with its names, in its order: data, arch, the optimisation, resume, the launch, seed.

    Their defaults are the configuration dataclass's (``launch.set_config_defaults``); the helps that
    differ between pretraining and linear evaluation are arguments.
    """
    group.add_argument("data", metavar="DIR", nargs="?", help=data_help)
    group.add_argument("-a", "--arch", choices=RESNET_ARCHS, help=arch_help)
    group.add_argument("-j", "--workers", type=int, help="data loading workers per process")
    group.add_argument("--epochs", type=int)
    group.add_argument("--start-epoch", type=int, help="manual epoch number (useful on restarts)")
    group.add_argument("-b", "--batch-size", type=int, help="total batch size of all the processes (GPUs) of one node")
    group.add_argument("--lr", "--learning-rate", type=float, dest="lr")
    group.add_argument("--schedule", nargs="*", type=int, help=schedule_help)
    group.add_argument("--momentum", type=float)
    group.add_argument("--wd", "--weight-decay", type=float, dest="weight_decay")
    group.add_argument("-p", "--print-freq", type=int)
    group.add_argument("--resume", type=str, help=resume_help)
    launch.add_launch_arguments(group)
    group.add_argument("--seed", type=int)
