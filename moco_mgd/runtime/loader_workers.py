"""DataLoader worker processes: what the stop signals do to them, and how they end.

Two things must hold at once:

* A stop signal (SLURM's SIGTERM or USR2, the terminal's Ctrl-C) reaches every process of the
  job, workers included. It must not kill a worker mid-epoch: the training process still needs
  its batches to reach the iteration where every rank stops and saves.
* The process that started a worker must always be able to end it. At exit, multiprocessing
  sends its daemonic children SIGTERM and then waits for them with no time limit: a worker that
  ignored that SIGTERM held the finished run (and its GPU node) forever.

So a worker ignores USR2 and Ctrl-C, and SIGTERM from anyone but the process that started it
(:func:`ignore_stop_signals`); and the runs end their loaders' workers themselves, however they
end (:func:`shut_down_workers`). Garbage collection is no substitute: when a run's frame is kept
alive by a reference cycle (matplotlib's savefig left one), the collector closes the iterator's
queues before the iterator's ``__del__`` asks its workers to exit, and that request is never sent.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading

__all__ = ["ignore_stop_signals", "shut_down_workers"]


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """``worker_init_fn`` of the DataLoaders: the stop signals are the training process's business.

    Why: SLURM signals every process of a step and Ctrl-C reaches the whole process group; a
    loader worker that died of it (or ran submitit's requeue handler, inherited through fork)
    would leave the training process without the batches it needs to reach the stop iteration.

    SIGTERM from the process that owns the loader still ends the worker (at once, status 0): it
    is how multiprocessing and the DataLoader end a worker that did not stop when asked. A worker
    whose owner died ends too (the DataLoader's watchdog notices within 5 s).
    """
    for signum in (signal.SIGUSR2, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    owner = multiprocessing.parent_process()   # the loader's process, also under spawn and forkserver
    owner_pid = owner.pid if owner is not None else os.getppid()
    # Blocked rather than ignored, so that the watcher can read who sent it. The worker's later
    # threads are started from this one and inherit the mask: no thread ever takes the default action.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_sigterm_from, args=(owner_pid,), name="sigterm-from-owner", daemon=True).start()


def _end_on_sigterm_from(owner_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == owner_pid:
            # Status 0: the DataLoader's SIGCHLD check reads any other end as a crashed worker.
            os._exit(0)


def shut_down_workers(source) -> None:
    """End the worker processes of a DataLoader (its persistent iterator) or of a DataLoader iterator, now.

    Does nothing when there are none (``-j 0``, never iterated, already ended), so it can be
    called on every path out of a run. A DataLoader iterated again afterwards starts new workers.
    """
    # torch has no public call for this; it is what the iterator's own __del__ does. A DataLoader
    # with persistent workers keeps its iterator in ``_iterator``.
    iterator = getattr(source, "_iterator", source)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    if hasattr(source, "_iterator"):
        source._iterator = None
