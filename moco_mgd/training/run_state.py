"""What a pretraining checkpoint holds, written and read back in one place.

The layout is MoCo's (``epoch``, ``arch``, ``state_dict`` with ``module.encoder_q.*`` keys,
``optimizer``), so MoCo's ``main_lincls.py`` and its detectron2 converter read it; this project
adds ``mgd``, ``embedding``, ``scaler``, ``rng`` and ``config`` beside them.
"""
from __future__ import annotations

import torch

from moco_mgd.models.moco import MoCo
from moco_mgd.runtime import checkpoint as ckpt
from moco_mgd.training.config import PretrainConfig
from moco_mgd.training.distillation import Distillation

__all__ = ["run_state", "restore_run_state"]


def run_state(epochs_done: int, config: PretrainConfig, moco: MoCo, optimizer: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler, distillation: Distillation) -> dict:
    """The checkpoint of a run after ``epochs_done`` epochs."""
    return {
        "epoch": epochs_done, "arch": config.arch,
        "state_dict": ckpt.with_module_prefix(moco.state_dict()),
        "optimizer": optimizer.state_dict(),
        **distillation.state_dict(),
        "scaler": scaler.state_dict(), "rng": ckpt.rng_state(), "config": config.to_dict(),
    }


def restore_run_state(state: dict, moco: MoCo, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      distillation: Distillation) -> tuple[int, dict | None]:
    """Load :func:`run_state`'s checkpoint into the run's objects.

    Returns ``(epochs done, the RNG states to restore)``; the RNG is restored by the caller
    once the data loaders are built, right before training continues.
    """
    moco.load_state_dict({k.removeprefix("module."): v for k, v in state["state_dict"].items()})
    optimizer.load_state_dict(state["optimizer"])
    distillation.load_state_dict(state)
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state["epoch"], state.get("rng")
