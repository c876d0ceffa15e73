"""Impossible numeric flags of both entry scripts: exit code 2 naming the flag, before anything starts or is written."""
import os

import pytest

import main_lincls
import main_moco_mgd
from moco_mgd.runtime import launch

PRETRAIN_BAD = [
    (["-j", "-1"], "-j/--workers -1: must be >= 0"),
    (["--epochs", "0"], "--epochs 0: must be >= 1"),
    (["--start-epoch", "-1"], "--start-epoch -1: must be >= 0 and < --epochs (2)"),
    (["--start-epoch", "2"], "--start-epoch 2: must be >= 0 and < --epochs (2)"),
    (["-b", "0"], "-b/--batch-size 0: must be >= 1"),
    (["--lr", "-1"], "--lr -1.0: must be positive"),
    (["--lr", "0"], "--lr 0.0: must be positive"),
    (["--lr", "nan"], "--lr nan: must be finite and positive"),
    (["--schedule", "1", "-1"], "--schedule 1 -1: must be epochs >= 0"),
    (["--momentum", "1"], "--momentum 1.0: must be in [0, 1)"),
    (["--momentum", "-0.1"], "--momentum -0.1: must be in [0, 1)"),
    (["--wd", "-0.0001"], "--wd/--weight-decay -0.0001: must be >= 0"),
    (["-p", "-1"], "-p/--print-freq -1: must be >= 0"),
    (["--seed", "-1"], "--seed -1: must be in [0, 4294967295] (numpy's seeds)"),
    (["--moco-dim", "0"], "--moco-dim 0: must be >= 1"),
    (["--moco-k", "0"], "--moco-k 0: must be >= 1"),
    (["--moco-m", "1.5"], "--moco-m 1.5: must be in [0, 1]"),
    (["--moco-m", "-0.1"], "--moco-m -0.1: must be in [0, 1]"),
    (["--moco-t", "0"], "--moco-t 0.0: must be positive"),
    (["--moco-t", "inf"], "--moco-t inf: must be finite and positive"),
    (["--mgd-loss-factor", "-1"], "--mgd-loss-factor -1.0: must be positive"),
    (["--mgd-samples", "0"], "--mgd-samples 0: must be >= 1"),
    (["--mgd-stage-weights", "1", "1", "1"], "--mgd-stage-weights 1 1 1: give one weight >= 0 per ResNet stage (4)"),
    (["--mgd-stage-weights", "1", "-1", "1", "1"], "--mgd-stage-weights 1 -1 1 1: give one weight >= 0 per"),
    (["--mgd-stage-weights", "0", "0", "0", "0"], "--mgd-stage-weights 0 0 0 0: give one weight >= 0 per"),
    (["--cckd-weight", "-1"], "--cckd-weight -1.0: must be >= 0"),
    (["--cckd-gamma", "0"], "--cckd-gamma 0.0: must be positive"),
    (["--cckd-order", "-1"], "--cckd-order -1: must be >= 0"),
    (["--disco-weight", "-1"], "--disco-weight -1.0: must be >= 0"),
    (["--mlp-hidden-dim", "-1"], "--mlp-hidden-dim -1: must be >= 0 (0: MoCo's width)"),
    (["--seed-weight", "-1"], "--seed-weight -1.0: must be >= 0"),
    (["--seed-queue", "0"], "--seed-queue 0: must be >= 1"),
    (["--seed-t", "0"], "--seed-t 0.0: must be positive"),
    (["--seed-teacher-t", "-1"], "--seed-teacher-t -1.0: must be positive"),
    (["--image-size", "0"], "--image-size 0: must be >= 1"),
    (["--shuffle-bn-splits", "0"], "--shuffle-bn-splits 0: must be >= 1"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints -1: must be >= 0 (0: all)"),
    (["--max-skipped-images", "-1"], "--max-skipped-images -1: must be >= 0"),
    (["--max-images", "-1"], "--max-images -1: must be >= 0 (0: all images)"),
    (["--knn-freq", "-1"], "--knn-freq -1: must be >= 0 (0: off)"),
    (["--knn-k", "0"], "--knn-k 0: must be >= 1"),
    (["--knn-t", "0"], "--knn-t 0.0: must be positive"),
    (["--world-size", "0"], "--world-size 0: must be -1 (one node) or >= 1"),
    (["--world-size", "2", "--rank", "2"], "--rank 2: must be -1 or in [0, 2) (--world-size 2)"),
    (["--gpu", "-1"], "--gpu -1: must be >= 0"),
    (["--nproc-per-node", "0"], "--nproc-per-node 0: must be >= 1"),
]

LINCLS_BAD = [
    (["-j", "-1"], "-j/--workers -1: must be >= 0"),
    (["--epochs", "0"], "--epochs 0: must be >= 1"),
    (["--start-epoch", "2"], "--start-epoch 2: must be >= 0 and < --epochs (2)"),
    (["-b", "0"], "-b/--batch-size 0: must be >= 1"),
    (["--lr", "-1"], "--lr -1.0: must be positive"),
    (["--schedule", "-5"], "--schedule -5: must be epochs >= 0"),
    (["--momentum", "1.5"], "--momentum 1.5: must be in [0, 1)"),
    (["--wd", "-1"], "--wd/--weight-decay -1.0: must be >= 0"),
    (["-p", "-1"], "-p/--print-freq -1: must be >= 0"),
    (["--seed", str(2 ** 32)], "--seed 4294967296: must be in [0, 4294967295] (numpy's seeds)"),
    (["--image-size", "0"], "--image-size 0: must be >= 1"),
    (["--max-images", "-1"], "--max-images -1: must be >= 0 (0: all images)"),
    (["--world-size", "-2"], "--world-size -2: must be -1 (one node) or >= 1"),
    (["--nproc-per-node", "0"], "--nproc-per-node 0: must be >= 1"),
]


def _pretrain_args(data, out):
    return [str(data), "-a", "resnet18", "--epochs", "2", "-b", "8", "--moco-k", "16", "--moco-dim", "16", "-j", "0",
            "--image-size", "32", "--output-dir", str(out)]


def _lincls_args(data, out):
    return [str(data), "-a", "resnet18", "--epochs", "2", "-b", "8", "-j", "0", "--image-size", "32",
            "--output-dir", str(out)]


@pytest.fixture
def saved_run(tmp_path):
    """An output directory holding a checkpoint, and a check that nothing in it was touched."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint_0000.pth.tar").write_bytes(b"an earlier run")
    before = os.stat(out).st_mtime_ns

    def untouched():
        assert os.listdir(out) == ["checkpoint_0000.pth.tar"]
        assert (out / "checkpoint_0000.pth.tar").read_bytes() == b"an earlier run"
        assert os.stat(out).st_mtime_ns == before  # not even check_writable's probe file came and went

    return out, untouched


@pytest.fixture
def no_launch(monkeypatch):
    """Replace the process launch: a config that passes every check is recorded instead of trained."""
    configs = []
    monkeypatch.setattr(launch, "launch", lambda worker, config, **kwargs: configs.append(config))
    return configs


def _refused(main, args, message, capsys, no_launch):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not no_launch


@pytest.mark.parametrize("extra, message", PRETRAIN_BAD, ids=[" ".join(a) for a, _ in PRETRAIN_BAD])
def test_pretrain_refuses_impossible_numbers(extra, message, data_dir, saved_run, capsys, no_launch):
    out, untouched = saved_run
    _refused(main_moco_mgd.main, _pretrain_args(data_dir, out) + extra, message, capsys, no_launch)
    untouched()


@pytest.mark.parametrize("extra, message", LINCLS_BAD, ids=[" ".join(a) for a, _ in LINCLS_BAD])
def test_lincls_refuses_impossible_numbers(extra, message, data_dir, saved_run, capsys, no_launch):
    out, untouched = saved_run
    _refused(main_lincls.main, _lincls_args(data_dir, out) + extra, message, capsys, no_launch)
    untouched()


PRETRAIN_EDGES = ["--moco-m", "1", "--momentum", "0", "--wd", "0", "-j", "0", "-p", "0", "--keep-checkpoints", "0",
                  "--start-epoch", "199", "--knn-freq", "0", "--cckd-order", "0", "--max-images", "0", "--seed", "0",
                  "--world-size", "1", "--rank", "0", "--schedule"]
LINCLS_EDGES = ["--momentum", "0", "--wd", "0", "-j", "0", "-p", "0", "--start-epoch", "99", "--seed", "4294967295",
                "--world-size", "1", "--rank", "0", "--schedule", "0"]


@pytest.mark.parametrize("main, edges", [(main_moco_mgd.main, PRETRAIN_EDGES), (main_lincls.main, LINCLS_EDGES)],
                         ids=["pretrain", "lincls"])
@pytest.mark.parametrize("with_edges", [False, True], ids=["defaults", "edges"])
def test_defaults_and_edge_values_pass(main, edges, with_edges, data_dir, tmp_path, no_launch):
    main([data_dir, "--output-dir", str(tmp_path)] + (edges if with_edges else []))
    assert len(no_launch) == 1
