"""Faults at save time, for real: a process killed with SIGKILL inside ``save_checkpoint``, and a full disk.

The kills land while a real process is writing a checkpoint (the test watches the temporary
file grow and kills the writer before it is complete); the full disk is a size-limited
tmpfs mounted here (skipped, with the reason, where mounting is not allowed; under CI that fails).
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from moco_mgd.checkpoints import files as ckpt
from tests.helpers import moco_v2_checkpoint, tmpfs_mounted

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _temporaries(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if ".tmp-" in p.name)


def _kill_inside_a_write(proc: subprocess.Popen, directory: Path, complete_size: int,
                         timeout: float = 300) -> Path | None:
    """SIGKILL ``proc`` while it is writing a checkpoint; return the half-written temporary file.

    ``complete_size``: the size of one of its complete checkpoints. None: ``proc`` ended (or
    the deadline passed) without a kill landing inside a write.
    """
    partial = complete_size - (1 << 16)  # clearly short of complete (pickled RNG states vary by a few bytes)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for entry in os.scandir(directory):
            if not entry.name.endswith(f".tmp-{proc.pid}"):
                continue
            try:
                size = entry.stat().st_size
            except FileNotFoundError:  # renamed in between
                continue
            if 0 < size < partial:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                tmp = Path(entry.path)
                return tmp if tmp.exists() and tmp.stat().st_size < partial else None
        time.sleep(0.0002)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return None


# --- kill -9 inside save_checkpoint --------------------------------------------------

_WRITER = textwrap.dedent("""
    import itertools, sys
    import torch
    from moco_mgd.checkpoints import files as ckpt

    out = sys.argv[1]
    latest = ckpt.latest_checkpoint(out)
    start = 0 if latest is None else torch.load(latest, weights_only=True)["epoch"]
    for epoch in itertools.count(start):  # as a run does: one checkpoint per epoch, the newest 2 kept
        state = {"epoch": epoch + 1, "w": torch.full((8 << 20,), float(epoch + 1))}  # 32 MiB
        ckpt.save_checkpoint(state, ckpt.checkpoint_path(out, epoch), keep=2)
""")


def test_kill_9_inside_a_write_leaves_the_previous_checkpoint_to_resume_from(tmp_path):
    for attempt in range(5):  # a kill that comes after the write ended is retried: the next writer resumes
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not ckpt.list_checkpoints(tmp_path) and proc.poll() is None:  # one complete checkpoint first
            time.sleep(0.01)
        assert proc.poll() is None, f"the writer exited with {proc.returncode}"
        if killed := _kill_inside_a_write(proc, tmp_path, ckpt.list_checkpoints(tmp_path)[-1].stat().st_size):
            break
    else:
        pytest.fail("5 writers were never caught inside a write")

    target = tmp_path / killed.name[1:].rsplit(".tmp-", 1)[0]
    being_written = int(target.name[len("checkpoint_"):-len(".pth.tar")])
    assert being_written >= 1 and not target.exists()
    assert ckpt.list_checkpoints(tmp_path)[-1] == ckpt.checkpoint_path(tmp_path, being_written - 1)
    for path in ckpt.list_checkpoints(tmp_path):  # keep=2 pruned nothing the kill could have needed
        state = _load(path)
        assert torch.equal(state["w"], torch.full((8 << 20,), float(state["epoch"])))
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.checkpoint_path(tmp_path, being_written - 1)

    # The next run resumes from it, and its first save removes the half-written file.
    resumed = subprocess.run([sys.executable, "-c", _WRITER.replace("itertools.count(start)", "[start]"),
                              str(tmp_path)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert _temporaries(tmp_path) == []
    assert _load(ckpt.latest_checkpoint(tmp_path))["epoch"] == being_written + 1


def _pretrain_cmd(data_dir, out, epochs):
    return [sys.executable, str(REPO / "main_moco_mgd.py"), data_dir, "-a", "resnet18", "--epochs", str(epochs),
            "-b", "8", "--moco-k", "16", "--moco-dim", "16", "-j", "0", "--image-size", "32", "--seed", "0",
            "--mlp", "--output-dir", str(out), "-p", "1", "--keep-checkpoints", "2", "--lr", "0.01"]


def test_pretraining_killed_inside_a_save_resumes_to_the_same_weights(data_dir, tmp_path):
    reference = tmp_path / "uninterrupted"
    done = subprocess.run(_pretrain_cmd(data_dir, reference, 2), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    size = ckpt.checkpoint_path(reference, 1).stat().st_size  # ~130 MiB: resnet18 twice and SGD's momentum

    for attempt in range(3):
        out = tmp_path / f"killed{attempt}"
        out.mkdir()
        with open(tmp_path / f"killed{attempt}.log", "w") as log:
            proc = subprocess.Popen(_pretrain_cmd(data_dir, out, 2), cwd=REPO, env=ENV, stdout=log, stderr=log)
            while not ckpt.list_checkpoints(out) and proc.poll() is None:  # kill the second save
                time.sleep(0.01)
            if killed := _kill_inside_a_write(proc, out, size):
                break
    else:
        pytest.fail("3 runs were never caught inside a checkpoint write:\n" + (tmp_path / "killed2.log").read_text())
    being_written = int(killed.name[len(".checkpoint_"):].split(".", 1)[0])
    previous = ckpt.checkpoint_path(out, being_written - 1)
    assert ckpt.latest_checkpoint(out) == previous and _load(previous)["epoch"] == being_written

    again = subprocess.run(_pretrain_cmd(data_dir, out, 2), cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {previous} at epoch {being_written}" in (out / "log.txt").read_text()
    assert _temporaries(out) == []
    a, b = _load(ckpt.checkpoint_path(reference, 1)), _load(ckpt.checkpoint_path(out, 1))
    assert a["epoch"] == b["epoch"] == 2
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


# --- a full disk ---------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """``small_disk("2m")``: a directory on a tmpfs of that size, unmounted afterwards."""
    with ExitStack() as mounts:
        def mount(size: str) -> Path:
            directory = tmp_path / f"disk{len(list(tmp_path.glob('disk*')))}"
            directory.mkdir()
            return mounts.enter_context(tmpfs_mounted(directory, f"size={size}"))

        yield mount


def _assert_untouched(directory, previous, before):
    assert previous.read_bytes() == before
    assert ckpt.list_checkpoints(directory) == [previous] and ckpt.latest_checkpoint(directory) == previous
    assert _temporaries(directory) == []


def test_full_disk_is_refused_before_writing(small_disk):
    disk = small_disk("2m")
    previous = ckpt.save_checkpoint({"epoch": 1, "w": torch.zeros(1 << 16)}, ckpt.checkpoint_path(disk, 0))
    before = previous.read_bytes()
    with pytest.raises(ckpt.CheckpointSpaceError) as caught:
        ckpt.save_checkpoint({"epoch": 2, "w": torch.zeros(1 << 20)}, ckpt.checkpoint_path(disk, 1), keep=1)
    message = str(caught.value)
    assert f"checkpoint_0001.pth.tar in {str(disk)!r}" in message and "it needs 4.1 MiB" in message, message
    assert caught.value.needed >= 4 << 20 and caught.value.free < 2 << 20
    _assert_untouched(disk, previous, before)


def test_disk_filling_up_during_the_write(small_disk):
    # Pickled strings are not in the estimate: this write starts, then hits ENOSPC midway.
    disk = small_disk("2m")
    previous = ckpt.save_checkpoint({"epoch": 1, "w": torch.zeros(1 << 16)}, ckpt.checkpoint_path(disk, 0))
    before = previous.read_bytes()
    state = {"epoch": 2, "w": torch.zeros(16), "notes": "x" * (3 << 20)}
    assert ckpt.estimated_size(state) < 1 << 20
    with pytest.raises(ckpt.CheckpointSpaceError) as caught:
        ckpt.save_checkpoint(state, ckpt.checkpoint_path(disk, 1), keep=1)
    assert "it needs 3.0 MiB" in str(caught.value) and str(disk) in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no torch internals shown
    _assert_untouched(disk, previous, before)


def test_full_disk_stops_a_pretraining_run_with_the_message(data_dir, small_disk):
    # One checkpoint (~130 MiB) fits, the second does not.
    out = small_disk("200m")
    result = subprocess.run(_pretrain_cmd(data_dir, out, 2), cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("moco_mgd.checkpoints.files.CheckpointSpaceError: no space left to save "
                              f"checkpoint_0001.pth.tar in {str(out)!r}: it needs "), result.stderr[-3000:]
    assert "no space left to save checkpoint_0001.pth.tar" in (out / "log.txt").read_text().splitlines()[-1]
    previous = ckpt.checkpoint_path(out, 0)
    assert ckpt.list_checkpoints(out) == [previous] and ckpt.latest_checkpoint(out) == previous
    assert _load(previous)["epoch"] == 1 and _temporaries(out) == []


# --- the size estimate ---------------------------------------------------------------

def test_size_estimate_covers_a_real_checkpoint(tmp_path):
    state, _ = moco_v2_checkpoint("resnet18", mlp=True)
    state["view"] = state["state_dict"]["module.queue"][:, :3]  # a view: its storage is written once
    path = ckpt.save_checkpoint(state, tmp_path / "checkpoint_0000.pth.tar")
    size = path.stat().st_size
    assert size <= ckpt.estimated_size(state) <= size + (1 << 20)
