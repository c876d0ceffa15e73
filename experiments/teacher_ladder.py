"""Student against teacher: does what MGD transfers grow with what the teacher knows?

Each TEACHER_DIR is an ``experiments/fashion_mnist.py`` output directory with one teacher (its
``teacher/result.json``) and its students (``seedN/METHOD/result.json``); the baselines are those of
``--baseline-dir`` (the directory the others were paired with through ``--baseline-from``). For every
teacher it writes one row: the teacher's own kNN and linear top-1, and its students' paired gain over
the baseline of the same seed (mean, sample std, 95% t-interval). The figure plots the gain against the
teacher's score, one point per teacher. What transfer predicts: the gain grows with the teacher's score,
and a teacher no better than random weights gives none.

    python experiments/teacher_ladder.py --baseline-dir output/s6/base output/s6/sup1 output/s6/sup6 \\
        output/s6/random --output docs/study6/ladder
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from moco_mgd.reporting.results import PROBES, paired_differences, paired_text, read_result, summarize, t_interval



def teacher_row(teacher_dir: Path, baseline_dir: Path, method: str) -> dict:
    """One teacher: its own scores and its ``method`` students' paired gains (refuses an unfinished teacher)."""
    teacher = read_result(teacher_dir / "teacher")
    if teacher is None:
        raise SystemExit(f"{teacher_dir / 'teacher' / 'result.json'} is missing: that teacher did not finish")
    students = [r for r in map(read_result, sorted(teacher_dir.glob(f"seed*/{method}"))) if r is not None]
    baselines = [r for r in map(read_result, sorted(baseline_dir.glob("seed*/baseline"))) if r is not None]
    row = {"directory": str(teacher_dir), "kind": teacher.get("teacher_kind", "moco"),
           "epochs": teacher.get("epochs"), "teacher": {key: teacher[key] for key, _ in PROBES}}
    for key, _ in PROBES:
        gains = paired_differences(students + baselines, method, key)
        row[key] = gains
    return row


def ladder_table(rows: list[dict], method: str) -> str:
    lines = [f"| teacher | its kNN | its linear | {method} Δ kNN vs baseline | {method} Δ linear vs baseline | seeds |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: r["teacher"]["knn_top1"]):
        name = f"{row['kind']}" + (f", {row['epochs']} epochs" if row["epochs"] else "") + f" ({row['directory']})"
        lines.append(f"| {name} | {row['teacher']['knn_top1']:.2f} | {row['teacher']['linear_top1']:.2f} | "
                     f"{paired_text(row['knn_top1'])} | {paired_text(row['linear_top1'])} | {len(row['knn_top1'])} |")
    return "\n".join(lines) + "\n"


def ladder_figure(rows: list[dict], method: str, path: Path) -> Path:
    """Two panels (kNN, linear): the students' mean gain with its 95% interval against the teacher's score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PROBES), figsize=(10, 4))
    for axis, (key, probe) in zip(axes, PROBES):
        for row in rows:
            gains = row[key]
            if not gains:
                continue
            mean, std, n = summarize(gains)
            half = (t_interval(gains)[1] - mean) if n > 1 else math.nan
            axis.errorbar(row["teacher"][key], mean, yerr=None if math.isnan(half) else half, fmt="o", capsize=4,
                          label=f"{row['kind']}" + (f" {row['epochs']} ep" if row["epochs"] else ""))
        axis.axhline(0.0, color="grey", linewidth=1)
        axis.set_xlabel(f"teacher's {probe} top-1")
        axis.set_ylabel(f"{method} minus baseline, {probe} top-1 (95% CI)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
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
    figure = ladder_figure(rows, args.method, args.output.with_suffix(".png"))
    print(table + f"figure: {figure}")


if __name__ == "__main__":
    main()
