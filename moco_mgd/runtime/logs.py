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

__all__ = ["setup_logging", "MetricsLog", "format_duration", "furthest_logged", "read_metrics"]

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


def furthest_logged(path: str | os.PathLike) -> tuple[int, int] | None:
    """The furthest point of training a ``metrics.jsonl`` records: ``(epoch, iterations done in it)``.

    From its ``train`` records (every ``-p`` iterations), ``epoch`` ends and ``stop`` records; None
    when there is no such record (or no file). A resumed run compares it with where it goes on.
    """
    furthest = None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        kind = record.get("kind")
        if kind == "train":
            point = (record["epoch"], record["iteration"] + 1)
        elif kind == "epoch":
            point = (record["epoch"] + 1, 0)
        elif kind == "stop":
            point = (record["epoch"], record["iteration"])
        else:
            continue
        furthest = point if furthest is None else max(furthest, point)
    return furthest


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

    def log_images(self, images: Mapping[str, str | os.PathLike]) -> None:
        """Send image files (``{name: path}``, e.g. the PNGs of :mod:`moco_mgd.reporting.plots`) to wandb.

        A no-op when wandb is off: the files on disk are the record.
        """
        if self._wandb is None or not images:
            return
        import wandb

        self._wandb.log({f"figures/{name}": wandb.Image(str(path)) for name, path in images.items()})

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics log, in the order they were written.

    Args:
        path: the ``metrics.jsonl`` file, or the run's output directory that holds it.

    Returns:
        One dict per line. Values that were NaN or infinite are the strings ``"nan"``,
        ``"inf"``, ``"-inf"`` (``float()`` reads them back).

    Raises:
        FileNotFoundError: no log at ``path``.
        ValueError: a line is not a JSON object; the message names the file and line number.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path}: main_moco_mgd.py and main_lincls.py write "
                                f"OUTPUT_DIR/{METRICS_FILE}; pass a run's output directory or that file")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records
