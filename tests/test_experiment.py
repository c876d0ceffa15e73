"""The README's main job (scripts/demo_fashion_mnist.sh) and experiments/fashion_mnist.py end to end.

Tiny Fashion-MNIST IDX files, a few iterations per stage, every stage a real process: teacher,
baseline and MGD pretraining, kNN and linear evaluation, the table and the figures.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moco_mgd.runtime.logs import read_metrics
from tests.helpers import write_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
# Overrides of the demo's sizes: 1 epoch of 64 images in batches of 16, 2 linear epochs.
TINY = ["-b", "16", "--moco-k", "64", "--mgd-samples", "32", "--lincls-epochs", "2", "-j", "0", "--knn-k", "5"]


@pytest.fixture(scope="module")
def fashion_dir(module_dir):
    root = module_dir("fashion")
    write_fashion_mnist(root, "train", n=96, structured=True)
    write_fashion_mnist(root, "t10k", n=40, seed=1, structured=True)
    return root


def _run(command, **env):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHON": sys.executable, **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def demo(fashion_dir, module_dir):
    out = module_dir("demo")
    stdout = _run(["bash", "scripts/demo_fashion_mnist.sh", str(out), "--data", str(fashion_dir), *TINY],
                  EPOCHS="1", TEACHER_EPOCHS="1", IMAGES="64")
    return out, stdout


@pytest.fixture(scope="module")
def moco_teacher(fashion_dir, module_dir):
    """An experiment whose teacher is MoCo-v2 (the default kind): it has the head the embedding losses read."""
    out = module_dir("moco_teacher")
    _run([sys.executable, "experiments/fashion_mnist.py", "--output-dir", str(out), "--data", str(fashion_dir),
          "--methods", "mgd-amp", "--seeds", "0", "--epochs", "1", "--images", "64", "--no-random-init", *TINY])
    return out


def _table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]


def _table_cells(text):
    """Each row of the results table as {column title: cell} (the first column is ``method``)."""
    header = next(line for line in text.splitlines() if line.startswith("| method")).strip("| ").split(" | ")
    return [dict(zip(header, [cell.strip() for cell in row[2:-2].split(" | ")])) for row in _table_rows(text)]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_demo_trains_three_networks_and_prints_the_table(demo):
    out, stdout = demo
    for run in ("teacher", "seed0/baseline", "seed0/mgd-amp"):
        assert (out / run / "checkpoint_0000.pth.tar").is_file(), run
        assert (out / run / "lincls" / "checkpoint.pth.tar").is_file(), run
    assert (out / "teacher" / "teacher.pth").is_file()       # the supervised teacher, torchvision layout
    assert json.loads((out / "teacher/result.json").read_text())["teacher_kind"] == "supervised"
    # The student was distilled from this teacher, not from another one, with the demo's loss factor.
    config = json.loads((out / "seed0/mgd-amp/result.json").read_text())
    assert config["arch"] == "resnet18" and config["epochs"] == 1
    mgd_command = next(line for line in stdout.splitlines() if "--output-dir " + str(out / "seed0/mgd-amp") in line)
    assert "--teacher-checkpoint " + str(out / "teacher" / "teacher.pth") in mgd_command
    assert "--mgd-loss-factor 100.0" in mgd_command and "--crop-min 0.8" in mgd_command   # study 6's recipe and factor
    table = (out / "results.md").read_text()
    assert table.split("\n\n", 1)[-1] in stdout  # the table and summary printed are those written
    summary = [line for line in stdout.splitlines() if line.startswith("In short: ")]
    assert len(summary) == 1 and "supervised resnet50 teacher is" in summary[0] and "MGD-AMP" in summary[0]
    rows = _table_rows(table)
    assert [row.split(" | ")[0] for row in rows] == ["| teacher (supervised resnet50)",
                                                   "| baseline (MoCo-v2 resnet18)", "| MGD-AMP",
                                                   "| random init resnet18"]
    # Each row shows its run's result.json, and the paired deltas are the differences of two of them.
    run_of_row = {"teacher (supervised resnet50)": "teacher", "baseline (MoCo-v2 resnet18)": "seed0/baseline",
                  "MGD-AMP": "seed0/mgd-amp", "random init resnet18": "seed0/random"}
    baseline = json.loads((out / "seed0/baseline/result.json").read_text())
    for cells in _table_cells(table):
        assert cells["seeds"] == "0"                        # one seed
        result = json.loads((out / run_of_row[cells["method"]] / "result.json").read_text())
        assert float(cells["kNN top-1"]) == pytest.approx(result["knn_top1"], abs=0.005)
        assert float(cells["linear top-1"]) == pytest.approx(result["linear_top1"], abs=0.005)
        assert float(cells["pretrain s"]) == pytest.approx(result["pretrain_seconds"], abs=0.5)
        if cells["method"].startswith("baseline"):
            assert cells["Δ kNN vs baseline"] == cells["Δ linear vs baseline"] == ""
            continue
        for key, column in (("knn_top1", "Δ kNN vs baseline"), ("linear_top1", "Δ linear vs baseline")):
            assert float(cells[column]) == pytest.approx(result[key] - baseline[key], abs=0.005), (cells, column)
    results = json.loads((out / "results.json").read_text())["results"]
    assert {r["method"] for r in results} == {"teacher", "baseline", "mgd-amp", "random"}


def test_demo_writes_the_figures(demo, tmp_path, monkeypatch):
    """The demo's figures hold the runs' numbers: drawn again here from the same logs, as the
    experiment draws them, each has the panels and lines those logs call for, with their values,
    and the demo's PNGs have the pixel size of these (a panel more or less changes it)."""
    from moco_mgd.reporting import plots
    from moco_mgd.runtime.logs import read_metrics

    out, _ = demo
    mgd, baseline = out / "seed0/mgd-amp", out / "seed0/baseline"
    drawn, save = {}, plots._save

    def keep(figure, path):
        drawn[Path(path).name] = figure
        return save(figure, path)

    monkeypatch.setattr(plots, "_save", keep)
    plots.write_run_figures(mgd, tmp_path, label="MGD-AMP", compare={"baseline": baseline})
    for name in ("matching_cost.png", "assignment_stability.png", "training_curves.png"):
        assert _png_size(out / "figures" / name) == _png_size(tmp_path / name), name
    stages = ["layer1", "layer2", "layer3", "layer4"]
    records = {run: read_metrics(run) for run in (mgd, baseline)}
    last = lambda run, kind: [r for r in records[run] if r["kind"] == kind][-1]

    (cost_axes,) = drawn["matching_cost.png"].axes                     # one line per stage: its matching costs
    assert [line.get_label() for line in cost_axes.lines] == stages
    matchings = [r for r in records[mgd] if r["kind"] == "matching"]
    for line, stage in zip(cost_axes.lines, stages):
        assert list(line.get_ydata()) == pytest.approx([r["cost"][stage] for r in matchings])
    assert len(drawn["assignment_stability.png"].axes) == 2 * len(stages)   # a grid and its changes per stage

    infonce, mgd_axes, knn = drawn["training_curves.png"].axes          # no embedding loss: three panels
    assert [line.get_label() for line in infonce.lines] == ["MGD-AMP", "baseline"]
    for line, run in zip(infonce.lines, (mgd, baseline)):
        assert list(line.get_ydata()) == pytest.approx([last(run, "epoch")["infonce"]])
    assert [line.get_label() for line in mgd_axes.lines] == [f"MGD-AMP {stage}" for stage in stages]
    for line, stage in zip(mgd_axes.lines, stages):
        assert list(line.get_ydata()) == pytest.approx([last(mgd, "epoch")[f"mgd_{stage}"]])
    assert [line.get_label() for line in knn.lines] == ["MGD-AMP", "baseline", "teacher"]
    for line, run in zip(knn.lines, (mgd, baseline)):
        assert list(line.get_ydata()) == pytest.approx([last(run, "knn")["top1"]])
    assert set(knn.lines[2].get_ydata()) == {last(mgd, "knn_teacher")["top1"]}   # the teacher's, dashed


def test_experiment_resumes_and_adds_a_seed(demo, fashion_dir):
    out, _ = demo
    teacher_log = (out / "teacher" / "log.txt").read_text()
    stdout = _run([sys.executable, "experiments/fashion_mnist.py", "--output-dir", str(out), "--data", str(fashion_dir),
                   "--methods", "baseline", "--seeds", "0", "1", "--epochs", "1", "--images", "64",
                   "--print-freq", "20", *TINY])
    # No --teacher-kind: the teacher already there (supervised) is the one used, not trained again.
    assert "supervised teacher: done before" in stdout and "baseline seed 0: done before" in stdout
    assert (out / "teacher" / "log.txt").read_text() == teacher_log   # not trained again
    rows = {row.split(" | ")[0]: row for row in _table_rows((out / "results.md").read_text())}
    assert "| MGD-AMP" not in rows                                     # not asked for this time
    assert " | 0,1 | " in rows["| baseline (MoCo-v2 resnet18)"] and " ± " in rows["| baseline (MoCo-v2 resnet18)"]
    assert (out / "seed1" / "baseline" / "result.json").is_file() and not (out / "seed1" / "mgd-amp").exists()


def test_report_only_assembles_the_table_and_points_to_each_runs_command(demo):
    out, stdout = demo
    trained = (out / "results.md").read_text()   # the last training invocation's (earlier tests add seeds)
    assert trained.startswith("Fashion-MNIST, ")
    try:
        report = _run([sys.executable, "experiments/fashion_mnist.py", "--output-dir", str(out), "--report-only",
                       "--methods", "baseline", "mgd-amp", "--seeds", "0"])
        assembled = (out / "results.md").read_text()
    finally:
        (out / "results.md").write_text(trained)   # the other tests read the demo's own
    assert assembled.startswith("Assembled by --report-only") and "loss factor" not in assembled   # no defaults posing as settings
    rows = [row.split(" | ")[:2] for row in _table_rows(assembled)]
    assert rows[:3] == [["| teacher (supervised resnet50)", "0"], ["| baseline (MoCo-v2 resnet18)", "0"],
                        ["| MGD-AMP", "0"]] and "In short: " in report
    command = (out / "seed0" / "mgd-amp" / "stdout.txt").read_text().splitlines()[0]
    assert command.startswith("$ ") and "main_moco_mgd.py" in command and "--mgd-loss-factor 100.0" in command


def test_students_of_an_earlier_experiments_teacher(demo, fashion_dir, tmp_path):
    out, _ = demo
    stdout = _run([sys.executable, "experiments/fashion_mnist.py", "--output-dir", str(tmp_path), "--data",
                   str(fashion_dir), "--teacher-from", str(out), "--methods", "mgd-amp", "--seeds", "0",
                   "--epochs", "1", "--images", "64", "--mgd-loss-factor", "1000", "--no-random-init", *TINY])
    assert "supervised teacher: done before" in stdout and not (tmp_path / "teacher").exists()
    command = next(line for line in stdout.splitlines() if "--output-dir " + str(tmp_path / "seed0/mgd-amp") in line)
    assert "--teacher-checkpoint " + str(out / "teacher" / "teacher.pth") in command
    assert "--mgd-loss-factor 1000.0" in command
    table = (tmp_path / "results.md").read_text()
    assert "| teacher (supervised resnet50) | 0 |" in table and "random init" not in table
    refused = subprocess.run([sys.executable, "experiments/fashion_mnist.py", "--output-dir", str(out), "--data",
                              str(fashion_dir), "--teacher-kind", "moco", "--methods", "mgd-amp", *TINY],
                             cwd=REPO, capture_output=True, text=True)
    assert refused.returncode != 0 and "the teacher in" in refused.stderr and "is supervised" in refused.stderr


def test_embedding_losses_alone_and_with_mgd(moco_teacher, fashion_dir, tmp_path):
    out = moco_teacher
    stdout = _run([sys.executable, "experiments/fashion_mnist.py", "--output-dir", str(tmp_path), "--data",
                   str(fashion_dir), "--teacher-from", str(out), "--methods", "seed", "mgd-amp+cckd", "mgd-amp+disco",
                   "mgd-amp+bingo", "--seeds", "0", "--epochs", "1", "--images", "64", "--no-random-init", "--disco-weight", "4",
                   "--disco-both-views", *TINY])
    commands = {run: next(line for line in stdout.splitlines() if "--output-dir " + str(tmp_path / "seed0" / run)
                          in line and "main_moco_mgd.py" in line)
                for run in ("seed", "mgd-amp+cckd", "mgd-amp+disco", "mgd-amp+bingo")}
    assert "--no-mgd" in commands["seed"] and "--seed-weight 1.0 --seed-queue 64" in commands["seed"]
    assert "--no-mgd" not in commands["mgd-amp+cckd"] and "--cckd-weight 20.0" in commands["mgd-amp+cckd"]
    assert "--disco-weight 4.0 --disco-both-views" in commands["mgd-amp+disco"]
    # BINGO's warm-up is its released share of the epochs (11 of 200): none of 1 epoch.
    assert "--bingo-weight 1.0 --bingo-k 5 --bingo-queue 64 --bingo-warmup-epochs 0" in commands["mgd-amp+bingo"]
    assert (tmp_path / "seed0" / "mgd-amp+bingo" / "bags.pt").is_file()
    rows = {row.split(" | ")[0]: row for row in _table_rows((tmp_path / "results.md").read_text())}
    assert {"| SEED", "| MGD-AMP + CCKD", "| MGD-AMP + DisCo", "| MGD-AMP + BINGO"} <= rows.keys()
    assert "DisCo weight 4.0 (both views)" in (tmp_path / "results.md").read_text()
    cells = {row["method"]: row for row in _table_cells((tmp_path / "results.md").read_text())}
    for run, title in (("seed", "SEED"), ("mgd-amp+cckd", "MGD-AMP + CCKD"), ("mgd-amp+disco", "MGD-AMP + DisCo")):
        # A run's result is its last kNN record and its last linear epoch, and the table shows them.
        result = json.loads((tmp_path / "seed0" / run / "result.json").read_text())
        knn = [r for r in read_metrics(tmp_path / "seed0" / run) if r["kind"] == "knn"][-1]
        linear = [r for r in read_metrics(tmp_path / "seed0" / run / "lincls") if r["kind"] == "epoch"][-1]
        assert (result["knn_top1"], result["knn_epoch"], result["linear_top1"]) == (knn["top1"], 1, linear["top1"])
        assert float(cells[title]["kNN top-1"]) == pytest.approx(knn["top1"], abs=0.005)
        assert float(cells[title]["linear top-1"]) == pytest.approx(linear["top1"], abs=0.005)


def test_students_of_a_moco_checkpoint_trained_elsewhere(moco_teacher, fashion_dir, tmp_path, capsys):
    elsewhere = tmp_path / "long_run" / "checkpoint_0000.pth.tar"
    elsewhere.parent.mkdir()
    shutil.copy(moco_teacher / "teacher" / "checkpoint_0000.pth.tar", elsewhere)
    out = tmp_path / "study"
    experiment = [sys.executable, "experiments/fashion_mnist.py", "--output-dir", str(out), "--data", str(fashion_dir),
                  "--methods", "mgd-amp", "--epochs", "1", "--images", "64", "--no-random-init", *TINY]
    stdout = _run([*experiment, "--seeds", "0", "--teacher-checkpoint", str(elsewhere)])
    assert f"== teacher {elsewhere} (1 epochs)" in stdout and not (out / "teacher" / "checkpoint_0000.pth.tar").exists()
    adopted = json.loads((out / "teacher" / "result.json").read_text())
    trained_here = json.loads((moco_teacher / "teacher" / "result.json").read_text())
    assert adopted["teacher_checkpoint"] == str(elsewhere) and adopted["epochs"] == 1
    assert len(adopted["teacher_sha256"]) == 64
    # The same weights evaluated by the same protocol and seed: the same linear top-1.
    assert adopted["linear_top1"] == trained_here["linear_top1"]
    # More seeds later, without the flag: the teacher recorded in the directory distils them.
    stdout = _run([*experiment, "--seeds", "1"])
    assert f"== teacher {elsewhere} (1 epochs): done before" in stdout
    command = next(line for line in stdout.splitlines() if "--output-dir " + str(out / "seed1/mgd-amp") in line)
    assert "--teacher-checkpoint " + str(elsewhere) in command
    assert "| teacher (MoCo-v2 resnet50) | 0 |" in (out / "results.md").read_text()

    sys.path.insert(0, str(REPO / "experiments"))
    import fashion_mnist

    def fails(*args):
        with pytest.raises(SystemExit) as refused:
            fashion_mnist.main(["--output-dir", str(out), "--data", str(fashion_dir), *args])
        return str(refused.value.code)

    other = tmp_path / "other.pth.tar"
    shutil.copy(elsewhere, other)
    assert "already holds another teacher" in fails("--teacher-checkpoint", str(other))
    assert "no such file" in fails("--teacher-checkpoint", str(tmp_path / "missing.pth.tar"))
    assert "give one" in fails("--teacher-checkpoint", str(other), "--teacher-from", str(moco_teacher))
    with open(elsewhere, "ab") as f:   # the adopted file overwritten after students were distilled from it
        f.write(b"0")
    assert "changed since its evaluation" in fails("--methods", "mgd-amp", "--seeds", "2")
    elsewhere.unlink()
    assert "which is gone" in fails("--methods", "mgd-amp", "--seeds", "2")
    assert not (out / "seed2").exists()


def test_baselines_alone_train_no_teacher(fashion_dir, tmp_path):
    # What lets a second invocation train the baselines while another trains the teacher.
    stdout = _run([sys.executable, "experiments/fashion_mnist.py", "--output-dir", str(tmp_path), "--data",
                   str(fashion_dir), "--methods", "baseline", "--seeds", "3", "--epochs", "1", "--images", "64",
                   "--no-random-init", *TINY])
    assert not (tmp_path / "teacher").exists() and "== teacher" not in stdout
    assert (tmp_path / "seed3" / "baseline" / "result.json").is_file()
    assert "--lr 0.001875" in stdout                       # MoCo's 0.03 per 256 images, at -b 16


def test_loss_balance_measures_every_loss_against_infonce(moco_teacher, fashion_dir, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    import loss_balance

    out = moco_teacher
    means = loss_balance.main([str(fashion_dir), "--dataset", "fashion-mnist", "--image-size", "32", "-b", "8",
                               "--batches", "2", "--mgd-samples", "16", "--moco-k", "64", "--mgd-loss-factor", "100",
                               "--teacher-checkpoint", str(out / "teacher" / "checkpoint_0000.pth.tar")])
    assert list(means) == ["InfoNCE", "MGD (factor 100)", "CCKD", "DisCo", "SEED"]
    for name, (value, on_q, on_backbone) in means.items():
        assert math.isfinite(value) and on_backbone > 0, name
        assert (on_q == 0) == name.startswith("MGD"), name      # MGD acts on the stages, not on q
    printed = capsys.readouterr().out
    assert "| InfoNCE |" in printed and printed.count("weighted share of MGD") == 4


def test_matching_reliability_compares_two_halves(moco_teacher, fashion_dir):
    sys.path.insert(0, str(REPO / "experiments"))
    import matching_reliability

    out = moco_teacher
    rows = matching_reliability.main([str(fashion_dir), "--dataset", "fashion-mnist", "--image-size", "32",
                                      "--images", "32", "-b", "16", "--teacher-checkpoint",
                                      str(out / "teacher" / "checkpoint_0000.pth.tar")])
    assert [(r["stage"], r["map"]) for r in rows] == [("layer1", "8x8"), ("layer2", "4x4"), ("layer3", "2x2"),
                                                      ("layer4", "1x1")]
    assert [r["chance"] for r in rows] == [1 / 64, 1 / 128, 1 / 256, 1 / 512]
    for r in rows:
        assert 0.0 <= r["agreement"] <= 1.0 and r["matched_cost"] <= r["random_cost"]   # the optimum beats chance


def test_bad_arguments_fail_before_any_run(fashion_dir, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    import fashion_mnist

    def fails(*args):   # in this process: each refusal comes before anything is imported or trained
        with pytest.raises(SystemExit) as refused:
            fashion_mnist.main(["--output-dir", str(tmp_path / "o"), "--data", str(fashion_dir), *args])
        assert refused.value.code not in (0, None)
        return f"{refused.value.code} {capsys.readouterr().err}"

    assert "multiple of -b 16" in fails("-b", "16", "--moco-k", "40")
    assert "repeats a seed" in fails("--seeds", "1", "1")
    assert "train-images-idx3-ubyte" in fails("--data", str(tmp_path))
    assert "no finished teacher there" in fails("--teacher-from", str(tmp_path))
    assert "use --teacher-kind moco for cckd/disco/seed" in fails("--teacher-kind", "supervised", "--methods", "disco")
    import torch
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "plain.pth")   # a state dict, not a MoCo checkpoint
    assert "not a MoCo-layout pretraining checkpoint" in fails("--teacher-checkpoint", str(tmp_path / "plain.pth"))
    assert "is a MoCo-v2 teacher" in fails("--teacher-checkpoint", str(tmp_path / "plain.pth"),
                                           "--teacher-kind", "supervised")
    assert not (tmp_path / "o" / "teacher").exists()
