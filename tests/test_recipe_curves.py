"""experiments/recipe_curves.py on run directories laid out as the recipe lane writes them."""
import sys
from pathlib import Path

import pytest

from moco_mgd.runtime.logs import MetricsLog

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from recipe_curves import main as recipe_curves  # noqa: E402


def _run(root, name, knn, linear, command="-b 64 --max-images 2048 --image-size 32 --stem imagenet"):
    run = root / name / "seed0"
    (run / "lincls").mkdir(parents=True)
    (run / "stdout.txt").write_text(f"$ python main_moco_mgd.py DATA {command}\nlog lines\n")
    log = MetricsLog(run, True)
    for epoch, top1 in knn:
        log.log("knn", epoch=epoch, top1=top1)
    MetricsLog(run / "lincls", True).log("epoch", epoch=99, top1=linear)


def _floor(root, shape, knn, linear):
    lincls = root / "random" / shape / "seed0" / "lincls"
    lincls.mkdir(parents=True)
    (lincls / "log.txt").write_text(f"2026 [rank 0] kNN (k=20, T=0.07) of the cached features: top1 {knn} top5 99\n")
    MetricsLog(lincls, True).log("epoch", epoch=99, top1=linear)


def test_each_run_is_read_against_the_floor_of_its_shape(tmp_path, capsys):
    _run(tmp_path, "a", [(4, 70.0), (8, 76.5)], 78.0)
    _run(tmp_path, "b", [(2, 71.0)], 70.0, "-b 32 --max-images 2048 --image-size 16 --stem small")
    (tmp_path / "unfinished" / "seed0").mkdir(parents=True)   # no logs yet: left out
    _floor(tmp_path, "imagesize32stemimagenet", 75.5, 77.5)
    _floor(tmp_path, "imagesize16stemsmall", 74.0, 77.0)
    recipe_curves([str(tmp_path), "--output", str(tmp_path / "out" / "recipe")])
    rows = (tmp_path / "out" / "recipe.md").read_text().splitlines()
    assert rows[2] == "| a | 4:70.00 8:76.50 | +1.00 | 78.00 | +0.50 |"
    assert rows[3] == "| b | 2:71.00 | -3.00 | 70.00 | -7.00 |"
    assert len([r for r in rows if r.startswith("| ")]) == 3   # the header and two runs: not the unfinished one
    assert (tmp_path / "out" / "recipe.png").read_bytes()[:4] == b"\x89PNG"


def test_no_finished_run_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no finished run"):
        recipe_curves([str(tmp_path), "--output", str(tmp_path / "x")])
