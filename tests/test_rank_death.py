"""A rank that dies mid-epoch (``kill -9``), under each launcher the tests can run: the job ends
at once (not after gloo's 30-minute collective timeout), its output names the dead rank, and the
same command then resumes from the newest complete checkpoint and ends where an uninterrupted run
does. And a rank that hangs: the other ranks give up after ``--dist-timeout``.

The SLURM launcher's dead task, and its preemptions, are in test_slurm.py (they need its cluster).
"""
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moco_mgd.runtime import launch
from tests.helpers import free_port, make_image_folder
from tests.test_pretrain import _assert_same_state, _load, _records

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENDS_WITHIN_S = 60


@pytest.fixture(scope="module")
def data(module_dir):
    """24 images: 3 iterations of 2 x 4 images per epoch."""
    return make_image_folder(str(module_dir("data24")), splits=("train",), per_class=12)


def _args(data, out):
    return [data, "-a", "resnet18", "--epochs", "2", "-b", "8", "--moco-k", "16", "--moco-dim", "16", "-j", "0",
            "--image-size", "32", "--seed", "0", "--mlp", "--output-dir", str(out), "-p", "1", "--lr", "0.01",
            "--keep-checkpoints", "0"]


def _spawn(data, out):
    return [sys.executable, "main_moco_mgd.py", *_args(data, out), "--multiprocessing-distributed",
            "--nproc-per-node", "2", "--dist-url", f"tcp://127.0.0.1:{free_port()}"]


def _torchrun(data, out):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "main_moco_mgd.py",
            *_args(data, out), "--dist-url", "env://", "--dist-backend", "gloo"]


@pytest.fixture(scope="module")
def reference(data, module_dir):
    out = module_dir("reference")
    result = subprocess.run(_spawn(data, out), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _rank_pids(out: Path) -> dict[int, int]:
    """The pid of each rank, from the run's ``processes: rank 0 host:pid, ...`` line."""
    line = next(line for line in (out / "log.txt").read_text().splitlines() if "] processes: " in line)
    return {int(rank): int(pid) for rank, pid in re.findall(r"rank (\d+) [^ ,]+:(\d+)", line)}


def _live_processes_of_session(sid: int) -> list[str]:
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":   # zombies hold nothing but a pid
            live.append(stat.parent.name)
    return live


def _kill_rank_mid_epoch(cmd, out: Path, rank: int) -> tuple[str, int, float]:
    """Start the job; in epoch 1 (epoch 0's checkpoint saved), SIGKILL ``rank``. Returns the job's
    output, the pid killed and the seconds from the kill to the job's end."""
    log = out.parent / f"{out.name}.out"
    with open(log, "w") as sink:
        job = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while (1, 0) not in _records(out):
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        victim = _rank_pids(out)[rank]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        try:
            job.wait(timeout=ENDS_WITHIN_S)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            pytest.fail(f"the job outlived its dead rank by {ENDS_WITHIN_S} s:\n{log.read_text()[-3000:]}")
    elapsed = time.monotonic() - killed
    assert job.returncode != 0
    deadline = time.monotonic() + 10                     # orphaned helpers (resource tracker, ...) go too
    while _live_processes_of_session(job.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _live_processes_of_session(job.pid) == []
    return log.read_text(), victim, elapsed


def _resumes_to_the_reference(cmd, out: Path, reference: Path) -> None:
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint_0000.pth.tar'} at epoch 1" in (out / "log.txt").read_text()
    _assert_same_state(_load(out / "checkpoint_0001.pth.tar"), _load(reference / "checkpoint_0001.pth.tar"))


def test_a_rank_killed_under_mp_spawn(data, reference, tmp_path):
    out = tmp_path / "run"
    cmd = _spawn(data, out)
    output, victim, elapsed = _kill_rank_mid_epoch(cmd, out, rank=1)
    assert elapsed < ENDS_WITHIN_S
    assert f"rank 1 (pid {victim}) was killed by SIGKILL" in output, output[-3000:]
    assert "Run the same command again to go on from the newest complete checkpoint" in output
    _resumes_to_the_reference(cmd, out, reference)


def test_a_rank_killed_under_torchrun(data, reference, tmp_path):
    out = tmp_path / "run"
    cmd = _torchrun(data, out)
    output, victim, elapsed = _kill_rank_mid_epoch(cmd, out, rank=1)
    assert elapsed < ENDS_WITHIN_S
    # torchrun's failure report: the root cause is rank 1, ended by SIGKILL.
    cause = output.split("Root Cause (first observed failure):", 1)[-1]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", cause) and f"-9 (pid: {victim})" in cause, output[-3000:]
    _resumes_to_the_reference(cmd, out, reference)


def _hung_peer(rank, world_size, port, out):
    """Rank 1 joins the group and then does not answer; rank 0's collective gives up after 3 s."""
    launch.init_process_group("gloo", f"tcp://127.0.0.1:{port}", world_size, rank, torch.device("cpu"), timeout_s=3)
    try:
        if rank == 1:
            time.sleep(8)
            return
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1))
            outcome = "answered"
        except RuntimeError:
            outcome = "timed out"
        Path(out, "rank0").write_text(f"{outcome} {time.monotonic() - start:.1f}")
    finally:
        dist.destroy_process_group()


def test_a_hung_rank_is_given_up_on_after_the_dist_timeout(tmp_path):
    mp.spawn(_hung_peer, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    outcome, seconds = (tmp_path / "rank0").read_text().rsplit(" ", 1)
    assert outcome == "timed out" and 2.5 <= float(seconds) < 6, (outcome, seconds)   # not gloo's 30 minutes


def test_the_flag_reaches_the_launch(data, tmp_path, monkeypatch):
    import main_moco_mgd

    seen = []
    monkeypatch.setattr(launch, "launch", lambda worker, config, **kwargs: seen.append(kwargs["dist_timeout_s"]))
    main_moco_mgd.main(_args(data, tmp_path / "a") + ["--dist-timeout", "45"])
    main_moco_mgd.main(_args(data, tmp_path / "b"))
    assert seen == [45.0, launch.DEFAULT_DIST_TIMEOUT_S] and launch.DEFAULT_DIST_TIMEOUT_S <= 1800
    assert timedelta(seconds=launch.DistEnv().dist_timeout_s) == timedelta(minutes=10)
