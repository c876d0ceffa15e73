"""Logging: human-readable lines on rank 0, a JSON-lines metrics file, optional wandb.

Only global rank 0 writes; the other ranks log warnings and errors only, so a 64-GPU
job prints one line per step, not 64, without replacing ``print``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["setup_logging", "MetricsLog", "format_duration"]

METRICS_FILE = "metrics.jsonl"


def setup_logging(output_dir: str | os.PathLike | None, rank: int) -> logging.Logger:
    """Configure the ``moco_mgd`` logger for this process and return it.

    Rank 0 logs INFO to stdout and to ``OUTPUT_DIR/log.txt``; other ranks WARNING to stderr.
    """
    logger = logging.getLogger("moco_mgd")
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%Y-%m-%d %H:%M:%S")
    if rank == 0:
        logger.setLevel(logging.INFO)
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(fmt)
        logger.addHandler(stream)
        if output_dir is not None:
            file = logging.FileHandler(Path(output_dir) / "log.txt")
            file.setFormatter(fmt)
            logger.addHandler(file)
    else:
        logger.setLevel(logging.WARNING)
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        logger.addHandler(stream)
    return logger


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _plain(value):
    """JSON-able form of a metric (tensors and numpy numbers become floats; NaN stays visible)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


class MetricsLog:
    """Appends one JSON object per event to ``OUTPUT_DIR/metrics.jsonl`` (rank 0 only).

    Each record has a ``"kind"`` (``train``, ``epoch``, ``matching``, ``knn``, ...) and its
    numbers; plots are made from this file. With ``wandb_project`` set, records also go to
    wandb (``WANDB_MODE=offline`` works without network); wandb is never required.
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool, wandb_project: str | None = None,
                 run_name: str | None = None, config: Mapping | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._wandb = None
        if enabled and wandb_project:
            import wandb  # imported only when asked for: it is slow to import

            self._wandb = wandb.init(project=wandb_project, name=run_name, dir=str(output_dir),
                                     config=dict(config or {}), resume="allow")

    def log(self, kind: str, step: int | None = None, **values) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, **({"step": step} if step is not None else {}), **_plain(values)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            flat = {f"{kind}/{k}": v for k, v in values.items() if isinstance(_plain(v), (int, float))}
            self._wandb.log(flat, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
