"""Figures from the recorded logs of a tiny Fashion-MNIST run (tests/data/recorded/README.md)."""
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread

from moco_mgd.reporting import plots
from moco_mgd.runtime.logs import read_metrics

RECORDED = Path(__file__).parent / "data" / "recorded"
REPO = Path(__file__).parents[1]
FIGURES = {"matching_cost.png", "assignment_stability.png", "training_curves.png"}


def raw_records(run: str, kind: str) -> list[dict]:
    lines = (RECORDED / run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def mgd():
    return read_metrics(RECORDED / "mgd")


@pytest.fixture(scope="module")
def baseline():
    return read_metrics(RECORDED / "baseline" / "metrics.jsonl")


def assert_png(path: Path, min_side: int = 300) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(path).shape[:2]
    assert height >= min_side and width >= min_side and path.stat().st_size > 20_000


@pytest.fixture(scope="module")
def fresh_mgd(module_dir, data_dir):
    """A log written now, by this checkout: a tiny MGD run (ResNet-18 MoCo teacher) re-matched after
    every epoch, so that the plots are checked against what the code logs today, not only in 2026."""
    import main_moco_mgd
    from tests.helpers import moco_v2_checkpoint
    from tests.test_pretrain import _args

    teacher = module_dir("teacher18") / "teacher.pth.tar"
    torch.save(moco_v2_checkpoint("resnet18", mlp=True)[0], teacher)
    out = module_dir("fresh_mgd")
    main_moco_mgd.main(_args(data_dir, out, str(teacher), epochs=3,
                             extra=["--teacher-arch", "resnet18", "--mgd-schedule", "every:1", "-p", "1000"]))
    return out


def _assert_matching_costs_and_changes_are_the_logged_ones(run_dir: Path) -> list[dict]:
    records = read_metrics(run_dir)
    updates = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "matching"]
    epochs, costs = plots.matching_costs(records)
    assert epochs.tolist() == [u["epoch"] for u in updates]
    assert list(costs) == ["layer1", "layer2", "layer3", "layer4"]
    for stage, cost in costs.items():
        assert cost.tolist() == [u["cost"][stage] for u in updates]
    _, fractions = plots.changed_fractions(records)
    for stage, fraction in fractions.items():
        assert fraction.tolist() == [u["changed"][stage] / len(u["assignment"][stage]) for u in updates]
        assert fraction[0] == 1.0                       # the first matching sets every teacher channel
        for before, after in zip(updates, updates[1:]):  # later: those whose student differs from before
            assert after["changed"][stage] == sum(a != b for a, b in zip(before["assignment"][stage],
                                                                         after["assignment"][stage]))
    return updates


def test_matching_costs_and_changes_are_the_logged_ones(mgd):
    assert [u["epoch"] for u in _assert_matching_costs_and_changes_are_the_logged_ones(RECORDED / "mgd")] == [0, 1, 2, 3]
    _, fractions = plots.changed_fractions(mgd)
    # The recorded run (1024 images, ResNet-50 teacher) trained long enough for layer1 to settle;
    # a test-sized run does not (its matchings on 16 images keep moving).
    assert fractions["layer1"][-1] < 0.5


def test_matching_costs_and_changes_of_a_log_written_now(fresh_mgd):
    updates = _assert_matching_costs_and_changes_are_the_logged_ones(fresh_mgd)
    assert [u["epoch"] for u in updates] == [0, 1, 2]   # every:1 over 3 epochs: before each epoch
    assert [len(u["assignment"]["layer1"]) for u in updates] == [64] * 3
    written = plots.write_run_figures(fresh_mgd, fresh_mgd / "figures")
    assert {p.name for p in written} == FIGURES


def test_stability_matrix_holds_the_smallest_matched_teacher_channel(mgd):
    updates = raw_records("mgd", "matching")
    for stage in ("layer1", "layer4"):
        epochs, channels, matrix = plots.assignment_history(mgd, stage, num_channels=50, seed=3)
        num_students = max(updates[0]["assignment"][stage]) + 1
        assert matrix.shape == (50, 4) and epochs.tolist() == [0, 1, 2, 3]
        assert len(set(channels.tolist())) == 50 and channels.tolist() == sorted(channels.tolist())
        assert 0 <= channels.min() and channels.max() < num_students
        for column, update in enumerate(updates):
            assignment = update["assignment"][stage]
            for row, student in enumerate(channels.tolist()):
                expected = min(t for t, s in enumerate(assignment) if s == student)
                assert matrix[row, column] == expected
    same = plots.assignment_history(mgd, "layer2", seed=3)[1]
    assert same.tolist() == plots.assignment_history(mgd, "layer2", seed=3)[1].tolist()
    assert same.tolist() != plots.assignment_history(mgd, "layer2", seed=4)[1].tolist()
    assert len(plots.assignment_history(mgd, "layer1", num_channels=500)[1]) == 64  # all of them


def test_epoch_curves_follow_the_epoch_and_knn_records(mgd, baseline):
    epochs, knn = raw_records("mgd", "epoch"), raw_records("mgd", "knn")
    curves = plots.epoch_curves(mgd)
    assert set(curves) == {"infonce", "mgd_layer1", "mgd_layer2", "mgd_layer3", "mgd_layer4", "knn_top1"}
    x, infonce = curves["infonce"]
    assert x.tolist() == [r["epoch"] + 1 for r in epochs] and infonce.tolist() == [r["infonce"] for r in epochs]
    assert curves["mgd_layer3"][1].tolist() == [r["mgd_layer3"] for r in epochs]
    assert curves["knn_top1"][0].tolist() == [r["epoch"] for r in knn] == [1, 2, 3, 4]
    assert curves["knn_top1"][1].tolist() == [r["top1"] for r in knn]
    assert plots.teacher_knn_top1(mgd) == raw_records("mgd", "knn_teacher")[0]["top1"]
    assert set(plots.epoch_curves(baseline)) == {"infonce", "knn_top1"}
    assert plots.teacher_knn_top1(baseline) is None


class SentImages:
    def log_images(self, images):
        self.images = dict(images)


def test_run_figures_are_pngs(mgd, tmp_path):
    metrics_log = SentImages()
    written = plots.write_run_figures(RECORDED / "mgd", tmp_path / "figures", label="MGD",
                                      compare={"baseline": RECORDED / "baseline"}, metrics_log=metrics_log)
    assert {p.name for p in written} == FIGURES and all(p.parent == tmp_path / "figures" for p in written)
    assert metrics_log.images == {p.stem: p for p in written}
    for path in written:
        assert_png(path)


def test_a_run_without_matching_gets_only_the_curves(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="moco_mgd"):
        written = plots.write_run_figures(RECORDED / "baseline", tmp_path)
    assert [p.name for p in written] == ["training_curves.png"]
    assert_png(written[0])
    assert "no matching records" in caplog.text


def test_nan_values_are_tolerated(mgd, tmp_path):
    records = [dict(r, infonce="nan") if r["kind"] == "epoch" and r["epoch"] == 1 else r for r in mgd]
    assert math.isnan(plots.epoch_curves(records)["infonce"][1][1])
    assert_png(plots.plot_training_curves({"nan run": records}, tmp_path / "curves.png"))


def test_embedding_losses_get_their_panel(mgd, tmp_path):
    # The recorded MGD run, as if it had also trained with CCKD and SEED.
    records = [dict(r, cckd=0.1 / (r["epoch"] + 1), seed=3.0 - r["epoch"]) if r["kind"] == "epoch" else r
               for r in mgd]
    curves = plots.epoch_curves(records)
    epochs = [r["epoch"] for r in records if r["kind"] == "epoch"]
    assert curves["seed"][1].tolist() == [3.0 - e for e in epochs] and curves["cckd"][0].tolist() == [e + 1
                                                                                                       for e in epochs]
    assert "disco" not in curves and "cckd" not in plots.epoch_curves(mgd)
    assert_png(plots.plot_training_curves({"MGD + CCKD + SEED": records, "MGD": mgd}, tmp_path / "curves.png"))


def test_reference_lines_come_from_a_runs_last_knn(tmp_path):
    floor, no_knn = tmp_path / "random", tmp_path / "no_knn"
    for run, line in ((floor, '{"kind": "knn", "epoch": 0, "top1": 12.5}'), (no_knn, '{"kind": "epoch", "epoch": 0}')):
        run.mkdir()
        (run / "metrics.jsonl").write_text(line + "\n")
    assert plots.last_knn_top1(read_metrics(floor)) == 12.5
    plots.write_run_figures(RECORDED / "mgd", tmp_path / "figures", references={"random init": floor, "paper": 50.0})
    assert_png(tmp_path / "figures" / "training_curves.png")
    with pytest.raises(ValueError, match="no kNN record"):
        plots.write_run_figures(RECORDED / "mgd", tmp_path / "other", references={"floor": no_knn})
    assert not (tmp_path / "other").exists()          # every log is read before anything is drawn


def test_cli_writes_the_three_figures(tmp_path):
    run = tmp_path / "mgd"
    shutil.copytree(RECORDED / "mgd", run)
    floor = tmp_path / "random"
    floor.mkdir()
    (floor / "metrics.jsonl").write_text('{"kind": "knn", "epoch": 0, "top1": 12.5}\n')
    result = subprocess.run([sys.executable, "-m", "moco_mgd.reporting.plots", str(run), "--label", "MGD",
                             "--compare", f"baseline={RECORDED / 'baseline'}", "--reference", f"random init={floor}"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in run.glob("*.png")} == FIGURES
    assert str(run / "training_curves.png") in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/nowhere"], "no metrics log at"),
    ([str(RECORDED / "mgd"), "--compare", "baseline"], "expected LABEL=RUN_DIR"),
    ([str(RECORDED / "mgd"), "--compare", "baseline={tmp}/nowhere"], "main_moco_mgd.py"),
    ([str(RECORDED / "mgd"), "--reference", "floor"], "--reference 'floor': expected LABEL=RUN_DIR"),
    ([str(RECORDED / "mgd"), "--reference", "floor={tmp}/nowhere"], "no metrics log at"),
])
def test_cli_names_bad_input(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plots.main([a.format(tmp=tmp_path) for a in argv] + ["--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_read_metrics_names_a_missing_log_and_a_corrupt_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="main_moco_mgd.py") as missing:
        read_metrics(tmp_path)
    assert str(tmp_path / "metrics.jsonl") in str(missing.value)
    lines = (RECORDED / "baseline" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join([*lines[:2], '{"kind": "epoch", "epo', *lines[2:]]))
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3: not valid JSON"):
        read_metrics(tmp_path)
    assert len(read_metrics(RECORDED / "baseline")) == len(lines)
