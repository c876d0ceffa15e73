import random

import numpy as np
import pytest
import torch

from moco_mgd.checkpoints import files as ckpt


class _ExplodesWhenSaved:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_save_is_atomic_when_the_write_fails(tmp_path):
    good = ckpt.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, ckpt.checkpoint_path(tmp_path, 0))
    before = good.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_checkpoint({"epoch": 2, "bad": _ExplodesWhenSaved()}, ckpt.checkpoint_path(tmp_path, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_0000.pth.tar"]   # no temp file left
    assert good.read_bytes() == before
    assert ckpt.latest_checkpoint(tmp_path) == good


def test_latest_skips_unreadable_and_temporary_files(tmp_path, caplog):
    ckpt.save_checkpoint({"epoch": 1}, ckpt.checkpoint_path(tmp_path, 0))
    ckpt.save_checkpoint({"epoch": 2}, ckpt.checkpoint_path(tmp_path, 1))
    (tmp_path / ".checkpoint_0002.pth.tar.tmp-123").write_bytes(b"partial")
    ckpt.checkpoint_path(tmp_path, 3).write_bytes(b"truncated by hand")
    with caplog.at_level("WARNING", logger="moco_mgd.checkpoints.files"):
        latest = ckpt.latest_checkpoint(tmp_path)
    assert latest == ckpt.checkpoint_path(tmp_path, 1)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"skipping unreadable checkpoint {ckpt.checkpoint_path(tmp_path, 3)}"]
    assert torch.load(latest, weights_only=True)["epoch"] == 2
    assert ckpt.latest_checkpoint(tmp_path / "absent") is None


def test_keep_prunes_the_oldest(tmp_path):
    for epoch in range(4):
        ckpt.save_checkpoint({"epoch": epoch + 1}, ckpt.checkpoint_path(tmp_path, epoch), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_0002.pth.tar", "checkpoint_0003.pth.tar"]


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    ckpt.save_checkpoint({"rng": ckpt.rng_state()}, tmp_path / "checkpoint_0000.pth.tar")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "checkpoint_0000.pth.tar", weights_only=True)["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_module_prefix_is_added_once():
    out = ckpt.with_module_prefix({"encoder_q.a": torch.zeros(1), "module.queue": torch.zeros(1)})
    assert sorted(out) == ["module.encoder_q.a", "module.queue"]
