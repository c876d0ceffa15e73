"""What a pretraining checkpoint holds, written and read back in one place.

The layout is MoCo's (``epoch``, ``arch``, ``state_dict`` with ``module.encoder_q.*`` keys,
``optimizer``), so MoCo's ``main_lincls.py`` and its detectron2 converter read it; this project
adds ``mgd``, ``embedding``, ``scaler``, ``rng`` and ``config`` beside them.

A checkpoint saved part-way through an epoch (a stop on a signal) has ``epoch`` = the epochs
fully done, as MoCo's own resume expects (it would redo that epoch from its start), and beside it
``iteration`` (iterations done in the next epoch), ``epoch_progress`` (the sums of its logged
values so far) and ``world_size`` (the same sampler shards are needed to go on mid-epoch).
"""
from __future__ import annotations

import torch

from moco_mgd.models.moco import MoCo
from moco_mgd.checkpoints import files as ckpt
from moco_mgd.training.distillation import Distillation
from moco_mgd.training.engine import EpochProgress

__all__ = ["run_state", "restore_run_state"]


def run_state(epochs_done: int, arch: str, config: dict, moco: MoCo, optimizer: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler, distillation: Distillation, progress: EpochProgress | None = None,
              world_size: int = 1) -> dict:
    """The checkpoint of a run after ``epochs_done`` epochs (and ``progress`` into the next one).

    ``arch`` is the student's architecture and ``config`` the run's configuration as a plain dict."""
    mid_epoch = {} if progress is None else {"iteration": progress.iteration, "epoch_progress": progress.state_dict(),
                                             "world_size": world_size}
    return {
        "epoch": epochs_done, "arch": arch,
        "state_dict": ckpt.with_module_prefix(moco.state_dict()),
        "optimizer": optimizer.state_dict(),
        **distillation.checkpoint_entries(),
        "scaler": scaler.state_dict(), "rng": ckpt.rng_state(), "config": config,
        **mid_epoch,
    }


def restore_run_state(state: dict, moco: MoCo, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      distillation: Distillation, device: torch.device | None = None
                      ) -> tuple[int, EpochProgress | None, dict | None]:
    """Load :func:`run_state`'s checkpoint into the run's objects.

    Returns ``(epochs done, the progress into the next epoch or None, the RNG states to
    restore)``; the RNG is restored by the caller once the data loaders are built, right before
    training continues.
    """
    moco.load_state_dict({k.removeprefix("module."): v for k, v in state["state_dict"].items()})
    optimizer.load_state_dict(state["optimizer"])
    distillation.load_checkpoint_entries(state)
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    progress = None
    if state.get("epoch_progress") is not None:
        progress = EpochProgress.from_state_dict(state["epoch_progress"], device or torch.device("cpu"))
    return state["epoch"], progress, state.get("rng")
