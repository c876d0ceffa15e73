"""The evidence study's protocol in experiments/fashion_mnist.py, end to end on tiny Fashion-MNIST files.

Random-weight teachers (the negative controls), several teachers paired with one baseline
(--baseline-from), and model selection on held-out training images (--val-holdout). Every stage
is a real process.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moco_mgd.models.resnet import build_resnet
from moco_mgd.data import build_dataset
from tests.helpers import write_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))   # the experiment scripts import each other by name

from random_teacher import recalibrate_bn  # noqa: E402
TINY = ["-b", "16", "--moco-k", "64", "--mgd-samples", "32", "--lincls-epochs", "2", "-j", "0", "--knn-k", "5",
        "--epochs", "1", "--images", "64", "--seeds", "0", "1", "--crop-min", "0.5"]


@pytest.fixture(scope="module")
def fashion_dir(module_dir):
    root = module_dir("fashion")
    write_fashion_mnist(root, "train", n=120, structured=True)
    write_fashion_mnist(root, "t10k", n=40, seed=1, structured=True)
    return root


def _experiment(*flags, check=True):
    result = subprocess.run([sys.executable, "experiments/fashion_mnist.py", *map(str, flags)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _result(run_dir):
    return json.loads((Path(run_dir) / "result.json").read_text())


@pytest.fixture(scope="module")
def study(fashion_dir, module_dir):
    """A baseline directory (2 seeds, random weights) and a random-teacher directory paired with it."""
    base, control = module_dir("base"), module_dir("control")
    _experiment("--output-dir", base, "--data", fashion_dir, "--methods", "baseline", "--val-holdout", "0.25", *TINY)
    stdout = _experiment("--output-dir", control, "--data", fashion_dir, "--methods", "mgd-amp", "--teacher-kind",
                         "random-bn", "--baseline-from", base, "--val-holdout", "0.25", *TINY).stdout
    return base, control, stdout


def test_runs_are_scored_on_the_held_out_images_and_say_so(study, fashion_dir):
    base, control, _ = study
    held_out = len(build_dataset("fashion-mnist", str(fashion_dir), "val", val_holdout=0.25))
    for run in (base / "seed0" / "baseline", base / "seed1" / "random", control / "seed1" / "mgd-amp",
                control / "teacher"):
        result = _result(run)
        assert result["val_holdout"] == 0.25 and result["evaluated_on"].startswith("validation: 0.25")
        # The linear probe's last epoch was scored on the held-out training images, not the 40 test images.
        log = (run / "lincls" / "log.txt").read_text()
        assert f"cached val features ({held_out}, " in log, log[-2000:]
        assert "--val-holdout 0.25" in (run / "lincls" / "stdout.txt").read_text().splitlines()[0]
    for run in (base / "seed0" / "baseline", control / "seed1" / "mgd-amp"):   # pretraining: the recipe's flags
        command = (run / "stdout.txt").read_text().splitlines()[0]
        assert "--val-holdout 0.25" in command and "--crop-min 0.5" in command


def test_the_paired_table_uses_the_other_directorys_baseline_with_intervals(study):
    base, control, stdout = study
    # The settings line names a teacher and a matching only where the runs had them.
    baseline_settings, control_settings = ((d / "results.md").read_text().splitlines()[0] for d in (base, control))
    assert "teacher" not in baseline_settings and "MGD" not in baseline_settings, baseline_settings
    assert "random-weight (BN re-estimated) teacher" in control_settings and "MGD loss factor" in control_settings
    assert not (control / "seed0" / "baseline").exists()        # nothing trained twice
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
            for line in (control / "results.md").read_text().splitlines() if line.startswith("| ")}
    assert {"baseline (MoCo-v2 resnet18)", "MGD-AMP", "random init resnet18"} <= rows.keys()
    deltas = [_result(control / f"seed{s}" / "mgd-amp")["knn_top1"] - _result(base / f"seed{s}" / "baseline")["knn_top1"]
              for s in (0, 1)]
    mean = sum(deltas) / 2
    cell = rows["MGD-AMP"][4]          # "Δ kNN vs baseline": mean ± std [95% t-interval]
    assert cell.startswith(f"{mean:+.2f} ± ") and "[" in cell and "]" in cell, cell
    assert "random-weight (BN re-estimated) resnet50" in rows["teacher (random-weight (BN re-estimated) resnet50)"][0]
    assert "held-out validation images" in stdout and "10,000 test images" not in stdout


def test_baseline_from_an_unfinished_directory_is_refused(fashion_dir, tmp_path):
    result = _experiment("--output-dir", tmp_path / "x", "--data", fashion_dir, "--methods", "mgd-amp",
                         "--teacher-kind", "random", "--baseline-from", tmp_path / "nothing", *TINY, check=False)
    assert result.returncode != 0 and "--baseline-from" in result.stderr and "not finished" in result.stderr
    assert not (tmp_path / "x" / "teacher").exists()            # refused before any work


def test_bad_val_holdout_is_refused(fashion_dir, tmp_path):
    result = _experiment("--output-dir", tmp_path, "--data", fashion_dir, "--val-holdout", "1.5", check=False)
    assert result.returncode != 0 and "--val-holdout 1.5: must be > 0 and < 1" in result.stderr


def test_the_random_teachers_are_random_and_bn_recalibration_sees_the_images(study, fashion_dir):
    _, control, _ = study
    saved = torch.load(control / "teacher" / "teacher.pth", weights_only=True)
    torch.manual_seed(0)
    fresh = build_resnet("resnet50", num_classes=10).state_dict()
    assert torch.equal(saved["conv1.weight"], fresh["conv1.weight"])           # the seed's initial weights
    assert not torch.equal(saved["bn1.running_mean"], fresh["bn1.running_mean"])  # statistics re-estimated
    # recalibrate_bn computes the plain average of the batch statistics over the loader.
    bn_only = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    batches = [(torch.randn(4, 3, 5, 5) + 2.0, None), (torch.randn(4, 3, 5, 5) - 1.0, None)]
    assert recalibrate_bn(bn_only, batches) == 8
    expected = torch.stack([b.mean(dim=(0, 2, 3)) for b, _ in batches]).mean(0)
    torch.testing.assert_close(bn_only[0].running_mean, expected)
    assert bn_only[0].momentum == 0.1 and torch.equal(bn_only[0].weight, torch.ones(3))


def test_teacher_ladder_rows_are_the_paired_gains_of_each_teachers_students(study, tmp_path, capsys):
    from teacher_ladder import main as ladder

    base, control, _ = study
    ladder(["--baseline-dir", str(base), str(control), "--output", str(tmp_path / "ladder")])
    table = (tmp_path / "ladder.md").read_text().splitlines()
    assert len(table) == 3 and table[2].startswith("| random-bn")
    cells = table[2].split(" | ")
    teacher = _result(control / "teacher")
    assert cells[1:3] == [f"{teacher['knn_top1']:.2f}", f"{teacher['linear_top1']:.2f}"]
    gains = [_result(control / f"seed{s}" / "mgd-amp")["linear_top1"] - _result(base / f"seed{s}" / "baseline")["linear_top1"]
             for s in (0, 1)]
    assert cells[4].startswith(f"{sum(gains) / 2:+.2f} ± ") and cells[5] == "2"
    # The pull: the students' mean MGD loss over their first epoch, read from their metrics.jsonl.
    first_epochs = [next(json.loads(line)["mgd"] for line in (control / f"seed{s}" / "mgd-amp" / "metrics.jsonl").open()
                         if json.loads(line)["kind"] == "epoch") for s in (0, 1)]
    assert cells[6] == f"{sum(first_epochs) / 2:.1f} |"
    assert (tmp_path / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A row that took its teacher from another directory (--teacher-from), kept elsewhere side by side with it,
    # finds that teacher as the sibling of the same name.
    kept = tmp_path / "kept"
    shutil.copytree(control, kept / "control")
    shutil.copytree(control / "seed0", kept / "match" / "seed0")
    (kept / "match" / "results.json").write_text(json.dumps({"args": {"teacher_from": "/elsewhere/control"}}))
    ladder(["--baseline-dir", str(base), str(kept / "match"), "--output", str(tmp_path / "kept_ladder")])
    kept_cells = (tmp_path / "kept_ladder.md").read_text().splitlines()[2].split(" | ")
    assert kept_cells[1:3] == cells[1:3] and kept_cells[5] == "1"
    with pytest.raises(SystemExit, match="did not finish"):
        ladder(["--baseline-dir", str(base), str(tmp_path), "--output", str(tmp_path / "x")])
