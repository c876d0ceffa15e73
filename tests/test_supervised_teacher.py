"""experiments/supervised_teacher.py: the positive-control teacher, trained, resumed and loaded."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from moco_mgd.checkpoints.formats import load_frozen_teacher
from tests.helpers import write_fashion_mnist

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fashion_dir(module_dir):
    root = module_dir("fashion")
    write_fashion_mnist(root, "train", n=64, structured=True)
    write_fashion_mnist(root, "t10k", n=16, seed=1, structured=True)
    return root


def _train(data, out, *extra):
    command = [sys.executable, "experiments/supervised_teacher.py", str(data), "--dataset", "fashion-mnist",
               "--image-size", "32", "-a", "resnet18", "--epochs", "2", "-b", "16", "--max-images", "48",
               "--seed", "0", "-j", "0", "--output-dir", str(out), *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_teacher_is_a_torchvision_state_dict_that_mgd_loads(fashion_dir, tmp_path):
    result = _train(fashion_dir, tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    weights = torch.load(tmp_path / "teacher.pth", map_location="cpu", weights_only=True)
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(weights, strict=True)            # the torchvision layout, 10-way classifier
    teacher = load_frozen_teacher("resnet18", tmp_path / "teacher.pth")   # what --teacher-checkpoint does
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    torch.testing.assert_close(teacher.layer1[0].conv1.weight, weights["layer1.0.conv1.weight"])
    epochs = [line for line in (tmp_path / "log.txt").read_text().splitlines() if "done: loss" in line]
    assert len(epochs) == 2


def test_an_interrupted_teacher_resumes_to_the_same_weights(fashion_dir, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert _train(fashion_dir, full).returncode == 0
    assert _train(fashion_dir, resumed).returncode == 0
    # Undo the second epoch as a crash during it would: only the first epoch's checkpoint is left.
    (resumed / "checkpoint_0001.pth.tar").unlink()
    (resumed / "teacher.pth").unlink()
    result = _train(fashion_dir, resumed)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout and "checkpoint_0000.pth.tar at epoch 1" in result.stdout
    a, b = (torch.load(d / "teacher.pth", map_location="cpu", weights_only=True) for d in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_arguments_are_refused_before_training(fashion_dir, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    import supervised_teacher

    for flags, message in ((["--lr", "0"], "--lr 0.0: must be positive"),
                           (["--epochs", "0"], "--epochs 0: must be at least 1"),
                           (["-b", "64"], "fewer than one batch")):
        with pytest.raises(SystemExit) as refused:    # in this process: refused before anything is written
            supervised_teacher.main([str(fashion_dir), "--dataset", "fashion-mnist", "--image-size", "32",
                                     "--max-images", "48", "-j", "0", "--output-dir", str(tmp_path / "o"), *flags])
        stderr = capsys.readouterr().err
        assert refused.value.code == 2 and message in stderr, stderr[-1000:]
    assert not list((tmp_path / "o").glob("checkpoint_*"))
    result = _train(fashion_dir, tmp_path / "other", "-a", "resnet18", "--epochs", "1")
    assert result.returncode == 0
    result = _train(fashion_dir, tmp_path / "other", "-a", "resnet34")
    assert result.returncode == 2 and "holds a resnet18, not -a resnet34" in result.stderr
