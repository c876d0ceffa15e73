"""Checkpoints: atomic, in MoCo's layout, plain data only, and found again after a crash.

A pretraining checkpoint is a dict of tensors, numbers, strings, lists and dicts (so it
loads with ``torch.load(weights_only=True)``):

    epoch        the next epoch to run (as MoCo)
    arch         the student architecture
    state_dict   ``module.encoder_q.*``, ``module.encoder_k.*``, ``module.queue``,
                 ``module.queue_ptr``: what MoCo's main_lincls.py and its detectron2
                 converter read
    optimizer    the optimizer's state dict
    mgd          the distiller's state dict (assignments, margins, student BNs), or None
    scaler       the GradScaler's state dict
    rng          torch / CUDA / numpy / python RNG states
    config       the run's configuration as a plain dict
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CheckpointSpaceError",
    "check_writable",
    "checkpoint_path",
    "estimated_size",
    "save_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "rng_state",
    "set_rng_state",
    "with_module_prefix",
    "file_sha256",
]

logger = logging.getLogger(__name__)
# checkpoint_0003.pth.tar: after epoch 3 (0-based); checkpoint_0004_iter000017.pth.tar: 17 iterations into epoch 4.
_NAME = re.compile(r"^checkpoint_(\d{4,})(?:_iter(\d{6,}))?\.pth\.tar$")


def check_writable(directory: str | os.PathLike, flag: str = "--output-dir") -> None:
    """Create ``directory`` if needed and prove a file can be written there, before any work.

    Args:
        directory: the directory a run will write to.
        flag: the command-line flag that chose it, named in the error.

    Raises:
        PermissionError: naming the directory and the flag to change.
    """
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PermissionError(f"{flag} directory {os.fspath(directory)!r} is not writable ({exc.strerror}): "
                              f"pass {flag} to a directory you can write to") from None


def checkpoint_path(output_dir: str | os.PathLike, epoch: int, iteration: int | None = None) -> Path:
    """MoCo's name for the checkpoint at the end of epoch ``epoch`` (0-based); with ``iteration``,
    the one saved ``iteration`` iterations into that epoch (a stop on a signal)."""
    suffix = "" if iteration is None else f"_iter{iteration:06d}"
    return Path(output_dir) / f"checkpoint_{epoch:04d}{suffix}.pth.tar"


def _position(path: Path) -> tuple[int, float] | None:
    """Where a checkpoint name stands in a run: (epoch, iteration), an epoch's end after all its iterations."""
    match = _NAME.match(path.name)
    if match is None:
        return None
    return int(match.group(1)), float("inf") if match.group(2) is None else int(match.group(2))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointSpaceError(OSError):
    """No room on the disk for a checkpoint; the checkpoints already there are untouched.

    An ``OSError`` with ``errno`` ENOSPC, so code that handles disk errors handles it too.
    """

    def __init__(self, path: Path, needed: int, free: int) -> None:
        super().__init__(errno.ENOSPC, f"no space left to save {path.name} in {os.fspath(path.parent)!r}: it needs "
                         f"{_megabytes(needed)} and {_megabytes(free)} are free there; the checkpoints already "
                         f"there are untouched. Free space there, or write to a larger disk")
        self.directory, self.needed, self.free = path.parent, needed, free

    def __str__(self) -> str:
        return self.strerror


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _storages(obj, seen: dict) -> None:
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        seen[(storage.device, storage.data_ptr())] = storage.nbytes()
    elif isinstance(obj, Mapping):
        for value in obj.values():
            _storages(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _storages(value, seen)


def estimated_size(state: Mapping) -> int:
    """Bytes ``torch.save(state)`` will write, about: every tensor storage once, plus room for the rest.

    Cheap (no serialisation, no copy off the GPU). Pickled non-tensor data is not counted
    beyond a fixed allowance, so a huge string can exceed it: the write then still fails
    cleanly (see :func:`save_checkpoint`).
    """
    seen: dict = {}
    _storages(state, seen)
    return sum(seen.values()) + 512 * len(seen) + 2**16  # zip headers and alignment per storage, data.pkl


class _ByteCounter:
    """A write-only file that keeps nothing: how many bytes ``torch.save`` writes, exactly."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.written += n
        return n

    def flush(self) -> None:
        pass


def _serialized_size(state: Mapping) -> int:
    counter = _ByteCounter()
    torch.save(state, counter)
    return counter.written


def _is_disk_full(exc: BaseException) -> bool:
    # torch.save reports a failed write as a RuntimeError whose context is the OSError.
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_TEMPORARY = re.compile(r"^\..+\.pth(?:\.tar)?\.tmp-(\d+)$")  # what save_checkpoint names its temporary files


def _remove_stale_temporaries(directory: Path) -> None:
    """Delete what a write killed midway left (``.NAME.tmp-PID`` of a process no longer alive here)."""
    for entry in directory.iterdir():
        if (m := _TEMPORARY.match(entry.name)) and not _alive(int(m.group(1))):
            logger.info("removing %s, left by a checkpoint write that was interrupted", entry)
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # this process writes one checkpoint at a time: a file of its pid is an older one's
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def save_checkpoint(state: Mapping, path: str | os.PathLike, keep: int = 0) -> Path:
    """Write ``state`` to ``path`` atomically, then prune older checkpoints.

    The file is written under a temporary name (``.NAME.tmp-PID``) in the same directory,
    flushed and fsynced, renamed onto ``path``, and the directory fsynced: a kill at any
    moment (even ``kill -9``) leaves the previous checkpoints complete and at most a
    temporary file, which :func:`latest_checkpoint` never picks and the next save removes.
    Older checkpoints are pruned only once the new one is in place; so are the mid-epoch
    checkpoints that come before it in the run (superseded, whatever ``keep`` says).

    One process writes to a directory (rank 0 of one run): temporary files of processes no
    longer alive on this machine are deleted here.

    Args:
        state: plain data (see the module docstring).
        path: destination, normally :func:`checkpoint_path`.
        keep: keep only the newest ``keep`` checkpoints of the directory (0: keep all).

    Returns:
        ``path``.

    Raises:
        CheckpointSpaceError: the disk has no room for it, found before writing (from the
            tensors' sizes) or by the write itself; nothing is left behind.
    """
    path = Path(path)
    _remove_stale_temporaries(path.parent)
    state = dict(state)
    needed, free = estimated_size(state), shutil.disk_usage(path.parent).free
    if needed > free:
        raise CheckpointSpaceError(path, needed, free)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # a Ctrl-C too: never leave the temporary file behind
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and _is_disk_full(exc):
            raise CheckpointSpaceError(path, _serialized_size(state), shutil.disk_usage(path.parent).free) from None
        raise
    _fsync_dir(path.parent)
    existing = list_checkpoints(path.parent)
    position = _position(path)
    if position is not None:
        for old in existing:
            if old != path and _NAME.match(old.name).group(2) is not None and _position(old) < position:
                old.unlink(missing_ok=True)
        existing = list_checkpoints(path.parent)
    if keep > 0:
        for old in existing[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of ``output_dir``, oldest first (by epoch, then iteration within it)."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [(position, p) for p in directory.iterdir() if (position := _position(p)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``output_dir`` that loads, or None.

    Temporary files of an interrupted write never match. A file that does not load (a
    disk error, a copy cut short by hand) is skipped with a warning, and the one before
    it is used.
    """
    for path in reversed(list_checkpoints(output_dir)):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
            logger.warning("skipping unreadable checkpoint %s (%s)", path, exc)
            continue
        return path
    return None


def rng_state() -> dict:
    """Every RNG this training touches, as plain data."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"algorithm": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def with_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MoCo's keys as DDP writes them (``module.encoder_q...``), whatever the wrapping."""
    return {(k if k.startswith("module.") else f"module.{k}"): v.detach().cpu() if isinstance(v, torch.Tensor) else v
            for k, v in state_dict.items()}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file (a teacher checkpoint, a bag file), read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
