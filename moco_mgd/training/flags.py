"""What the commands share: MoCo's flag block of both entry scripts, and the configuration fields behind the flags."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from moco_mgd.models.resnet import RESNET_ARCHS
from moco_mgd.runtime import launch

__all__ = ["InputConfig", "MocoRunConfig", "add_moco_arguments", "moco_argument_parser"]


@dataclass
class InputConfig:
    """The fields of every command's configuration that choose the network and its images."""

    data: str = ""
    dataset: str = "imagefolder"
    arch: str = "resnet18"
    stem: str = "imagenet"
    image_size: int = 224
    batch_size: int = 256
    max_images: int = 0
    val_holdout: float = 0.0


@dataclass
class MocoRunConfig(InputConfig):
    """The fields of MoCo's flag block (:func:`add_moco_arguments`), with main_moco.py's defaults; main_lincls.py
    overrides the optimisation's."""

    workers: int = 32
    epochs: int = 200
    start_epoch: int = 0
    lr: float = 0.03
    schedule: list[int] = field(default_factory=lambda: [120, 160])
    momentum: float = 0.9
    weight_decay: float = 1e-4
    print_freq: int = 10
    resume: str = ""
    seed: int | None = None
    output_dir: str = "."


def moco_argument_parser(description: str, mirrors: str, add_help: bool, **helps: str
                         ) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """An entry script's parser, opening with MoCo's flag block (:func:`add_moco_arguments`, ``helps``
    its help texts) in a group that says which of MoCo's scripts it ``mirrors``. Returns the parser and
    that group, for the script's own MoCo-style flags."""
    parser = argparse.ArgumentParser(description, add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group(f"MoCo (same names and defaults as {mirrors})")
    add_moco_arguments(group, **helps)
    return parser, group


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
