"""Stopping a run on a signal at an iteration every rank agrees on, so that it can save and go on later.

SLURM warns a job with USR2 (submitit's preemption and time-limit signal) or SIGTERM before it
stops it; a user presses Ctrl-C (SIGINT). The handler only records the signal. The training loop
asks :meth:`StopRequest.poll` after every step. That is one all-reduce of three integers over a
gloo group, so the GPU is never waited for. Every rank gets the same answer at the same
iteration, saves (rank 0 writes), and the run ends there.

A second Ctrl-C more than a second after the first quits at once, without saving. (torchrun
forwards the terminal's SIGINT to processes that already got it, so a repeat within a second
is the same press.)

What the signals do to the DataLoader workers is in :mod:`moco_mgd.runtime.loader_workers`.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

import torch
import torch.distributed as dist

from moco_mgd.runtime import distributed

__all__ = ["STOP_SIGNALS", "StopRequest", "exit_code", "signal_names"]

logger = logging.getLogger("moco_mgd")

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


def signal_names(signals) -> str:
    return "+".join(signal.Signals(s).name for s in sorted(signals))


def exit_code(signals) -> int:
    """The shell's code for a process ended by a signal (128 + its number); SIGINT first, as a shell does."""
    chosen = signal.SIGINT if signal.SIGINT in signals else min(signals)
    return 128 + int(chosen)


class StopRequest:
    """The stop signals this process received, and the agreement of all ranks on them.

    Use as a context manager around the training: the handlers are installed on entry (main
    thread only; elsewhere it records nothing) and the previous ones put back on exit, so a
    launcher's own handler (submitit's requeue on USR2) runs after the run has saved.
    """

    def __init__(self, group=None, signals=STOP_SIGNALS):
        self.group = group
        self.signals = tuple(signals)
        self.received: set[int] = set()
        self._first_sigint: float | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > 1.0:
                raise KeyboardInterrupt  # the second press: quit without saving
            if self._first_sigint is None:
                self._first_sigint = now
                logger.warning("Ctrl-C: saving at the next iteration and stopping (Ctrl-C again to quit "
                               "without saving)")
        self.received.add(signum)

    def poll(self) -> frozenset[int]:
        """The signals any rank has received so far (empty: go on). Collective with a process group."""
        if self.group is None:
            return frozenset(self.received)
        flags = torch.tensor([int(s in self.received) for s in self.signals], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return frozenset(s for s, flag in zip(self.signals, flags.tolist()) if flag)

    @classmethod
    def for_run(cls, timeout_s: float | None = None) -> "StopRequest":
        """One per training process; collective (the gloo group, ``timeout_s`` as the run's) when there is a
        process group."""
        return cls(distributed.new_host_group(timeout_s))

