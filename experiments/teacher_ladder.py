"""Student against teacher: does what MGD transfers grow with what the teacher knows?

Each TEACHER_DIR is an ``experiments/fashion_mnist.py`` output directory with one teacher (its
``teacher/result.json``) and its students (``seedN/METHOD/result.json``); the baselines are those of
``--baseline-dir`` (the directory the others were paired with through ``--baseline-from``). For every
teacher it writes one row: the teacher's own kNN and linear top-1, and its students' paired gain over
the baseline of the same seed (mean, sample std, 95% t-interval). The figure plots the gain against the
teacher's score, one point per teacher. What transfer predicts: the gain grows with the teacher's score,
and a teacher no better than random weights gives none.

The last column is the pull: the students' mean MGD loss over their first epoch (the ``epoch`` records of
their ``metrics.jsonl``). Teachers compared at different pulls differ in two things at once; a random
teacher's features are far from anything the student computes, so it pulls harder at the same factor.
The figure draws the random-weight teachers with open markers and marks the baseline's and the random
ResNet-18's mean scores, where a teacher starts to have something to give.

    python experiments/teacher_ladder.py --baseline-dir output/s6/base output/s6/sup1 output/s6/sup6 \\
        output/s6/random --output docs/study6/ladder
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from moco_mgd.reporting.results import PROBES, paired_differences, paired_text, read_result, summarize, t_interval
from moco_mgd.runtime.logs import read_metrics


def teacher_row(teacher_dir: Path, baseline_dir: Path, method: str) -> dict:
    """One teacher: its own scores and its ``method`` students' paired gains (refuses an unfinished teacher)."""
    teacher = read_result(teacher_result_dir(teacher_dir))
    if teacher is None:
        raise SystemExit(f"{teacher_dir / 'teacher' / 'result.json'} is missing: that teacher did not finish")
    finished = [(d, r) for d in sorted(teacher_dir.glob(f"seed*/{method}")) if (r := read_result(d)) is not None]
    students = [r for _, r in finished]
    baselines = [r for r in map(read_result, sorted(baseline_dir.glob("seed*/baseline"))) if r is not None]
    row = {"directory": str(teacher_dir), "kind": teacher.get("teacher_kind", "moco"),
           "epochs": teacher.get("epochs"), "teacher": {key: teacher[key] for key, _ in PROBES},
           "pull": summarize(first_epoch_loss(d) for d, _ in finished)[0]}
    for key, _ in PROBES:
        gains = paired_differences(students + baselines, method, key)
        row[key] = gains
    return row


def teacher_result_dir(teacher_dir: Path) -> Path:
    """Where ``teacher_dir``'s teacher was scored: its own ``teacher/``, or that of the directory its run took
    the teacher from (``--teacher-from``, recorded in ``results.json``), found as written or, for files
    copied elsewhere side by side (``keep.sh``), as a sibling of the same name."""
    own = teacher_dir / "teacher"
    recorded = teacher_dir / "results.json"
    if (own / "result.json").exists() or not recorded.exists():
        return own
    source = json.loads(recorded.read_text()).get("args", {}).get("teacher_from")
    if not source:
        return own
    for candidate in (Path(source), teacher_dir.parent / Path(source).name):
        if (candidate / "teacher" / "result.json").exists():
            return candidate / "teacher"
    return own


def first_epoch_loss(run_dir: Path) -> float:
    """The MGD loss of a student's first epoch: how hard its teacher pulled before the student moved."""
    epochs = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "epoch"]
    if not epochs or "mgd" not in epochs[0]:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'} has no epoch record with an MGD loss: not an MGD student's log")
    return epochs[0]["mgd"]


def reference_scores(baseline_dir: Path) -> dict[str, dict[str, float]]:
    """The mean scores of the baseline students and of the random-weight ResNet-18 in ``baseline_dir``."""
    runs = [r for d in sorted(baseline_dir.glob("seed*/*")) if (r := read_result(d)) is not None]
    return {name: {key: summarize(r[key] for r in runs if r["method"] == name)[0] for key, _ in PROBES}
            for name in ("baseline", "random") if any(r["method"] == name for r in runs)}


def teacher_name(row: dict) -> str:
    epochs = row["epochs"]
    return row["kind"] + (f", {epochs} epoch{'s' if epochs != 1 else ''}" if epochs else "")


def ladder_table(rows: list[dict], method: str) -> str:
    lines = [f"| teacher | its kNN | its linear | {method} Δ kNN vs baseline | {method} Δ linear vs baseline | seeds "
             "| first-epoch MGD loss |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: r["teacher"]["knn_top1"]):
        lines.append(f"| {teacher_name(row)} ({row['directory']}) | {row['teacher']['knn_top1']:.2f} | "
                     f"{row['teacher']['linear_top1']:.2f} | {paired_text(row['knn_top1'])} | "
                     f"{paired_text(row['linear_top1'])} | {len(row['knn_top1'])} | "
                     f"{row['pull']:.1f} |")
    return "\n".join(lines) + "\n"


def comparable_pull(rows: list[dict], factor: float = 2.0) -> list[dict]:
    """The rows whose first-epoch MGD loss is within ``factor`` of the median row's: teachers that pulled alike."""
    median = sorted(row["pull"] for row in rows)[len(rows) // 2]
    return [row for row in rows if median / factor <= row["pull"] <= median * factor]


def ladder_figure(rows: list[dict], method: str, reference: dict[str, dict[str, float]], path: Path) -> Path:
    """The students' mean gain with its 95% interval against the teacher's score, per probe (columns): every
    teacher (top row), and only those that pulled alike (bottom row, so that the pull is not what differs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(PROBES), figsize=(11, 8), squeeze=False)
    colours = {row["directory"]: f"C{i}" for i, row in enumerate(rows)}
    for panel_row, (shown, title) in zip(axes, ((rows, "every teacher"),
                                                (comparable_pull(rows), "teachers that pulled alike (first-epoch "
                                                                        "MGD loss within 2x of the median)"))):
        for axis, (key, probe) in zip(panel_row, PROBES):
            for row in shown:
                gains = row[key]
                if not gains:
                    continue
                mean, std, n = summarize(gains)
                half = (t_interval(gains)[1] - mean) if n > 1 else math.nan
                axis.errorbar(row["teacher"][key], mean, yerr=None if math.isnan(half) else half, fmt="o", capsize=4,
                              color=colours[row["directory"]],
                              markerfacecolor="white" if row["kind"].startswith("random") else None,
                              label=f"{teacher_name(row)}, pull {row['pull']:.0f}")
            axis.axhline(0.0, color="grey", linewidth=1)
            for name, style, text in (("baseline", "--", "baseline student"), ("random", ":", "random-weight student")):
                if name in reference:
                    axis.axvline(reference[name][key], color="grey", linestyle=style, linewidth=1, label=text)
            axis.set_title(title, fontsize=9)
            axis.set_xlabel(f"teacher's {probe} top-1")
            axis.set_ylabel(f"{method} minus baseline, {probe} top-1 (95% CI)")
            axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher_dirs", nargs="+", type=Path, metavar="TEACHER_DIR")
    parser.add_argument("--baseline-dir", type=Path, required=True)
    parser.add_argument("--method", default="mgd-amp", help="the student method whose gain is plotted")
    parser.add_argument("--output", type=Path, required=True, help="writes OUTPUT.md and OUTPUT.png")
    args = parser.parse_args(argv)
    rows = [teacher_row(d, args.baseline_dir, args.method) for d in args.teacher_dirs]
    table = ladder_table(rows, args.method)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text(table)
    figure = ladder_figure(rows, args.method, reference_scores(args.baseline_dir), args.output.with_suffix(".png"))
    print(table + f"figure: {figure}")


if __name__ == "__main__":
    main()
