"""The DataLoader workers: a stop signal does not end them, their owner always can, and a run
leaves none behind however it ends (the hang at exit of issue 26)."""
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from torch.utils.data import DataLoader, Dataset

import main_moco_mgd
from moco_mgd.runtime.loader_workers import ignore_stop_signals, shut_down_workers
from moco_mgd.training.engine import NonFiniteLossError
from tests.test_pretrain import _args

REPO = Path(__file__).resolve().parents[1]


class _Pids(Dataset):
    """Each item is the pid of the process that loaded it."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return os.getpid()


def _ended(pid: int, within: float) -> bool:
    """Whether ``pid`` has exited (a zombie, or gone) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _worker_pids(loader) -> set[int]:
    return {int(pid) for batch in loader for pid in batch}


def test_a_stop_signal_does_not_end_a_worker_but_its_owners_sigterm_does():
    loader = DataLoader(_Pids(), batch_size=2, num_workers=1, persistent_workers=True,
                        worker_init_fn=ignore_stop_signals)
    try:
        (worker,) = _worker_pids(loader)
        for name in ("TERM", "USR2", "INT"):      # as SLURM or a terminal sends them: from another process
            subprocess.run(["kill", f"-{name}", str(worker)], check=True)
        assert not _ended(worker, within=1.0)
        assert _worker_pids(loader) == {worker}   # the same worker goes on loading the next epoch
        os.kill(worker, signal.SIGTERM)           # from its owner, as multiprocessing ends it at exit
        assert _ended(worker, within=5.0), "the worker ignored its owner's SIGTERM: an exit would wait forever"
    finally:
        shut_down_workers(loader)


def test_shut_down_workers_ends_them_now_and_a_new_pass_starts_new_ones():
    loader = DataLoader(_Pids(), batch_size=2, num_workers=2, persistent_workers=True,
                        worker_init_fn=ignore_stop_signals)
    first = _worker_pids(loader)
    assert len(first) == 2
    shut_down_workers(loader)
    assert all(_ended(pid, within=0.0) for pid in first)   # ended and joined before it returned
    second = _worker_pids(loader)
    assert len(second) == 2 and not second & first
    shut_down_workers(loader)
    shut_down_workers(loader)                               # twice, and on a loader without workers: no-op
    shut_down_workers(DataLoader(_Pids(), batch_size=2))


# The bad order, forced: the iterator of a persistent loader is collected as part of a reference
# cycle, so the collector closes its index queues (multiprocessing's finalizers are weakref
# callbacks, run first) before the iterator's __del__ asks the worker to exit; the request is
# never sent, and at exit multiprocessing sends the worker SIGTERM and waits for it.
_LEFT_TO_THE_COLLECTOR = textwrap.dedent("""
    import gc, os, sys
    from torch.utils.data import DataLoader
    from moco_mgd.runtime.loader_workers import ignore_stop_signals
    from tests.test_loader_workers import _Pids

    loader = DataLoader(_Pids(), batch_size=2, num_workers=1, persistent_workers=True,
                        worker_init_fn=ignore_stop_signals)
    print(sorted({int(p) for batch in loader for p in batch})[0], flush=True)
    cycle = [loader]
    cycle.append(cycle)
    del loader, cycle
    gc.collect()
    print("end of script", flush=True)
""")


def test_a_process_that_leaves_its_workers_to_the_collector_still_exits():
    process = subprocess.Popen([sys.executable, "-c", _LEFT_TO_THE_COLLECTOR], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        pytest.fail(f"the process did not exit in 60 s: it waits for a worker that ignores SIGTERM\n{out}")
    assert process.returncode == 0 and "end of script" in out, out
    assert _ended(int(out.split()[0]), within=0.0)


def test_a_failed_run_leaves_no_worker_behind(data_dir, tmp_path):
    """The traceback keeps the run's frames, and so its loader, alive (as an uncaught error's does
    until the interpreter exits): the run must end its workers itself."""
    before = set(multiprocessing.active_children())
    with pytest.raises(NonFiniteLossError) as failure:
        main_moco_mgd.main(_args(data_dir, tmp_path, epochs=1, extra=["-j", "1", "--lr", "1e30"]))
    assert failure.traceback                   # still held here
    assert set(multiprocessing.active_children()) - before == set()
