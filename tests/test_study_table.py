"""experiments/study_table.py: the study's one table, read from result files laid out as the experiment writes them."""
import json
import statistics
import sys
from pathlib import Path

import pytest
from scipy.stats import t

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

from study_table import main as study_table  # noqa: E402

SEEDS = (0, 1, 2)
# kNN, linear by seed: the numbers are arbitrary, the test recomputes every difference from them.
SCORES = {
    ("base", "baseline"): [(75.0, 76.0), (74.0, 76.5), (75.5, 76.2)],
    ("base", "random"): [(73.9, 76.1), (73.7, 76.5), (74.0, 76.0)],
    ("moco", "mgd-amp"): [(76.0, 77.5), (75.1, 77.0), (76.9, 78.1)],
    ("moco_bingo", "bingo"): [(77.0, 78.0), (76.5, 77.9), (77.8, 78.3)],
    ("moco_bingo", "mgd-amp+bingo"): [(77.3, 78.6), (77.4, 78.0), (78.0, 79.1)],
}


def _write(root: Path, directory: str, method: str, seed: int, knn: float, linear: float) -> None:
    run = root / directory / f"seed{seed}" / method
    run.mkdir(parents=True, exist_ok=True)
    (run / "result.json").write_text(json.dumps({"method": method, "seed": seed, "knn_top1": knn, "linear_top1": linear}))


@pytest.fixture
def study(tmp_path):
    for (directory, method), scores in SCORES.items():
        for seed, (knn, linear) in zip(SEEDS, scores):
            _write(tmp_path, directory, method, seed, knn, linear)
    (tmp_path / "moco" / "teacher").mkdir()
    (tmp_path / "moco" / "teacher" / "result.json").write_text(json.dumps({"method": "teacher", "seed": 0,
                                                                          "knn_top1": 80.0, "linear_top1": 79.0}))
    # The BINGO row adopted row moco's teacher, as final.sh's from_moco does with --teacher-from.
    (tmp_path / "moco_bingo" / "results.json").write_text(json.dumps({"args": {"teacher_from": str(tmp_path / "moco")}}))
    return tmp_path


def _paired(a: tuple[str, str], b: tuple[str, str], probe: int) -> str:
    differences = [x[probe] - y[probe] for x, y in zip(SCORES[a], SCORES[b])]
    mean, std = statistics.fmean(differences), statistics.stdev(differences)
    half = t.ppf(0.975, len(differences) - 1) * std / len(differences) ** 0.5
    return f"{mean:+.2f} ± {std:.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def _line(text: str, start: str) -> list[str]:
    [line] = [line for line in text.splitlines() if line.startswith(start)]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_each_row_is_paired_with_the_baseline_and_random_weights_of_its_seed(study, capsys):
    study_table(["--baseline-dir", str(study / "base"), str(study / "moco"), str(study / "moco_bingo"),
                 "--output", str(study / "out" / "table")])
    text = (study / "out" / "table.md").read_text()
    assert capsys.readouterr().out == text
    baseline = _line(text, "| | baseline |")
    assert baseline[7:] == [_paired(("base", "baseline"), ("base", "random"), 0),
                            _paired(("base", "baseline"), ("base", "random"), 1)]
    assert _line(text, "| moco (80.00 / 79.00) | mgd-amp |")[2] == "3"
    bingo = _line(text, "| moco (row moco_bingo) (80.00 / 79.00) | bingo |")
    assert bingo[2] == "3"
    assert bingo[5:] == [_paired(("moco_bingo", "bingo"), ("base", "baseline"), 0),
                         _paired(("moco_bingo", "bingo"), ("base", "baseline"), 1),
                         _paired(("moco_bingo", "bingo"), ("base", "random"), 0),
                         _paired(("moco_bingo", "bingo"), ("base", "random"), 1)]
    rows = json.loads((study / "out" / "table.json").read_text())["rows"]
    assert [(r["directory"], r["method"], r["teacher"], r["complete"]) for r in rows] == [
        ("moco", "mgd-amp", "moco", True), ("moco_bingo", "bingo", "moco", True),
        ("moco_bingo", "mgd-amp+bingo", "moco", True)]
    assert rows[0]["teacher_scores"] == {"knn_top1": 80.0, "linear_top1": 79.0}


def test_a_combination_is_compared_with_each_part_under_the_same_teacher(study):
    study_table(["--baseline-dir", str(study / "base"), str(study / "moco"), str(study / "moco_bingo"),
                 "--output", str(study / "table")])
    text = (study / "table.md").read_text()
    combination = _line(text, "| moco | mgd-amp+bingo (X = bingo) |")
    both = ("moco_bingo", "mgd-amp+bingo")
    assert combination[2:] == [_paired(both, ("moco_bingo", "bingo"), 0), _paired(both, ("moco_bingo", "bingo"), 1),
                               _paired(both, ("moco", "mgd-amp"), 0), _paired(both, ("moco", "mgd-amp"), 1)]
    best_linear = _line(text.replace("Best on linear", "|Best on linear"), "|Best on linear")[0]
    assert best_linear.startswith("Best on linear: mgd-amp+bingo from the moco (row moco_bingo) teacher, 78.57, "
                                  f"{_paired(both, ('base', 'baseline'), 1)} against the baseline")
    assert f"ahead of bingo (moco (row moco_bingo)) by {_paired(both, ('moco_bingo', 'bingo'), 1)}" in best_linear


def test_a_row_missing_seeds_is_marked_and_never_called_best(study):
    (study / "moco_bingo" / "seed2" / "mgd-amp+bingo" / "result.json").unlink()
    study_table(["--baseline-dir", str(study / "base"), str(study / "moco"), str(study / "moco_bingo"),
                 "--output", str(study / "table")])
    text = (study / "table.md").read_text()
    assert _line(text, "| moco (row moco_bingo) (80.00 / 79.00) | mgd-amp+bingo |")[2] == "2 of 3"
    assert "Best on linear: bingo from the moco (row moco_bingo) teacher" in text


def test_a_control_is_in_the_table_but_never_called_best(study):
    study_table(["--baseline-dir", str(study / "base"), str(study / "moco"), "--controls", str(study / "moco_bingo"),
                 "--output", str(study / "table")])
    text = (study / "table.md").read_text()
    assert _line(text, "| moco (row moco_bingo) (80.00 / 79.00), control | mgd-amp+bingo |")[2] == "3"
    assert "Best on linear: mgd-amp from the moco teacher" in text and "ahead of" not in text


def test_directories_without_runs_are_refused_by_name(study):
    with pytest.raises(SystemExit, match="no seed\\*/baseline/result.json"):
        study_table(["--baseline-dir", str(study / "moco"), str(study / "moco"), "--output", str(study / "x")])
    (study / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty has no finished student"):
        study_table(["--baseline-dir", str(study / "base"), str(study / "empty"), "--output", str(study / "x")])
