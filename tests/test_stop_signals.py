"""The pieces of a mid-epoch stop: signals and the ranks' agreement, the resumable sampler, the
seeded augmentations and the checkpoint names. The runs stopped for real are in test_pretrain.py
(one and two processes) and test_slurm.py (ten preemptions); what the signals do to the loader
workers is in test_loader_workers.py."""
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from moco_mgd.checkpoints import files as ckpt
from moco_mgd.data import ResumableSampler, SeededSamples
from moco_mgd.runtime.stopping import StopRequest, exit_code
from moco_mgd.training.checks import check_resume
from moco_mgd.training.config import PretrainConfig
from tests.helpers import run_distributed


# --- the signals and the agreement of the ranks -----------------------------------------

def test_a_signal_is_recorded_not_acted_on_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR2)
    with StopRequest() as stop:
        assert stop.poll() == frozenset()
        os.kill(os.getpid(), signal.SIGUSR2)        # default action: terminate; here: recorded
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.poll() == {signal.SIGUSR2, signal.SIGTERM}
    assert signal.getsignal(signal.SIGUSR2) is before


def test_ctrl_c_twice_quits_without_saving_but_a_forwarded_repeat_does_not():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)         # within a second: torchrun passing the same press on
        assert stop.poll() == {signal.SIGINT}
        stop._first_sigint = time.monotonic() - 2.0
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_exit_codes_are_the_shells():
    assert exit_code({signal.SIGUSR2}) == 128 + signal.SIGUSR2
    assert exit_code({signal.SIGTERM, signal.SIGINT}) == 130


def _agree(rank, world, out):
    with StopRequest.for_run() as stop:
        seen = []
        for step in range(4):
            if rank == 1 and step == 2:
                os.kill(os.getpid(), signal.SIGUSR2)   # only rank 1 is told
            seen.append(sorted(int(s) for s in stop.poll()))
    Path(out, f"rank{rank}").write_text(repr(seen))


def test_every_rank_stops_at_the_iteration_where_any_rank_saw_the_signal(tmp_path):
    run_distributed(_agree, 2, str(tmp_path))
    expected = repr([[], [], [int(signal.SIGUSR2)], [int(signal.SIGUSR2)]])
    assert (tmp_path / "rank0").read_text() == expected
    assert (tmp_path / "rank1").read_text() == expected


# --- the sampler and the augmentations -------------------------------------------------

def test_a_resumed_epoch_reads_what_the_uninterrupted_one_would_have(tmp_path):
    data = list(range(50))
    for rank in (0, 1):
        full = ResumableSampler(data, batch_size=4, num_replicas=2, rank=rank, seed=3)
        full.set_epoch(5)
        order = list(full)
        plain = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3, drop_last=True)
        plain.set_epoch(5)
        assert order == [(5, i) for i in plain]          # DistributedSampler's order, with the epoch
        resumed = ResumableSampler(data, batch_size=4, num_replicas=2, rank=rank, seed=3)
        resumed.set_epoch(5, batches_done=2)
        assert list(resumed) == order[8:] and len(resumed) == len(order) - 8
        assert resumed.batches_per_epoch() == len(order) // 4 == 6
        resumed.set_epoch(6)
        assert len(resumed) == len(order)


class _Noise(Dataset):
    """A 'transform' that draws from torch's and Python's RNG, as the MoCo-v2 augmentations do."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.rand(3), random.random()


def test_a_samples_augmentation_depends_on_seed_epoch_and_index_alone():
    samples = SeededSamples(_Noise(), seed=7)
    torch.manual_seed(0)
    random.seed(0)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    first = samples[(2, 4)]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state  # left as it was
    torch.rand(100)                                                        # whatever ran before
    samples[(2, 3)]
    again = samples[(2, 4)]
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert not torch.equal(samples[(3, 4)][0], first[0])                  # another epoch, another crop
    assert not torch.equal(SeededSamples(_Noise(), seed=8)[(2, 4)][0], first[0])


# --- checkpoint names ----------------------------------------------------------------

def test_mid_epoch_checkpoints_sort_inside_their_epoch_and_go_once_superseded(tmp_path):
    for epoch, iteration in ((0, None), (1, 3), (1, 7)):
        ckpt.save_checkpoint({"epoch": epoch}, ckpt.checkpoint_path(tmp_path, epoch, iteration))
    # A second stop in the same epoch supersedes the first.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_0000.pth.tar",
                                                                  "checkpoint_0001_iter000007.pth.tar"]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint_0001_iter000007.pth.tar"
    ckpt.save_checkpoint({"epoch": 2}, ckpt.checkpoint_path(tmp_path, 1))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar"]
    ckpt.save_checkpoint({"epoch": 2}, ckpt.checkpoint_path(tmp_path, 2, 1))
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint_0002_iter000001.pth.tar"


def test_a_mid_epoch_checkpoint_resumes_only_with_the_same_processes_and_batch():
    config = PretrainConfig(arch="resnet18", batch_size=8)
    state = {"arch": "resnet18", "epoch": 3, "iteration": 5, "world_size": 2, "config": config.to_dict(),
             "state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}}   # a pretraining checkpoint's
    check_resume(state, config, "c.pth.tar", world_size=2)
    with pytest.raises(ValueError, match=r"processes 2 \(now 1\).*checkpoint_0002.pth.tar"):
        check_resume(state, config, "c.pth.tar", world_size=1)
    with pytest.raises(ValueError, match=r"-b/--batch-size 8 \(now 16\)"):
        check_resume(state, PretrainConfig(arch="resnet18", batch_size=16), "c.pth.tar", world_size=2)
    check_resume({**state, "iteration": None}, config, "c.pth.tar", world_size=1)   # an epoch's end: any
