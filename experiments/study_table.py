"""The evidence study's one table: every student row against the baseline and random weights of its seed,
and what each method adds to the others, with the 95% t-interval of every paired difference.

Each ROW_DIR is an ``experiments/fashion_mnist.py`` output directory (``seedN/METHOD/result.json``)
that was paired with ``--baseline-dir`` through ``--baseline-from``. A row is one method of one
directory; its teacher is the directory's own (``teacher/result.json``) or the one it adopted with
``--teacher-from``. Combinations are compared only under the same teacher: ``mgd-amp+X`` against
``X`` (what MGD-AMP adds to X) and against ``mgd-amp`` (what X adds to MGD-AMP), seed by seed.
Rows with fewer seeds than the baseline are shown, marked, and never called best.

    python experiments/study_table.py --baseline-dir OUT/final/base OUT/final/sup OUT/final/moco \\
        OUT/final/moco_bingo --controls OUT/final/random --output docs/study6/final_table
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from moco_mgd.reporting.results import PROBES, paired_differences, paired_text, read_result, spread_text, summarize

REFERENCES = ("baseline", "random")   # both live in the baseline directory, one run per seed


def _results_of(directory: Path) -> list[dict]:
    return [r for r in map(read_result, sorted(directory.glob("seed*/*"))) if r is not None]


def teacher_of(row_dir: Path) -> Path:
    """The directory whose ``teacher/`` the row's students learned from (follows ``--teacher-from``)."""
    recorded = row_dir / "results.json"
    if recorded.is_file():
        adopted = json.loads(recorded.read_text())["args"].get("teacher_from")
        if adopted:
            return Path(adopted)
    return row_dir


def read_rows(baseline_dir: Path, row_dirs: list[Path], controls: list[Path] = ()) -> tuple[list[dict], list[dict]]:
    """The baseline directory's runs and one entry per (row directory, student method); rows of the
    ``controls`` directories (random-weight teachers) are marked so."""
    references = [r for r in _results_of(baseline_dir) if r["method"] in REFERENCES]
    if not any(r["method"] == "baseline" for r in references):
        raise SystemExit(f"{baseline_dir} has no seed*/baseline/result.json: pass the directory the rows were "
                         "paired with (their --baseline-from)")
    rows = []
    for row_dir in [*row_dirs, *controls]:
        teacher_dir = teacher_of(row_dir)
        teacher = read_result(teacher_dir / "teacher")
        students = [r for r in _results_of(row_dir) if r["method"] not in (*REFERENCES, "teacher")]
        if not students:
            raise SystemExit(f"{row_dir} has no finished student (seed*/METHOD/result.json)")
        for method in dict.fromkeys(r["method"] for r in students):
            rows.append({"directory": row_dir.name, "teacher": teacher_dir.name,
                         "teacher_scores": None if teacher is None else {k: teacher[k] for k, _ in PROBES},
                         "method": method, "runs": [r for r in students if r["method"] == method],
                         "control": row_dir in controls})
    return references, rows


def _teacher_cell(row: dict, scores: bool = False) -> str:
    name = row["teacher"] if row["directory"] == row["teacher"] else f"{row['teacher']} (row {row['directory']})"
    own = row["teacher_scores"]
    return f"{name} ({own['knn_top1']:.2f} / {own['linear_top1']:.2f})" if scores and own else name


def _against(runs: list[dict], others: list[dict], method: str, other: str, key: str) -> list[float]:
    """``method`` minus ``other`` on ``key`` over the seeds both have (``other`` renamed apart if equal)."""
    renamed = [{**r, "method": "~reference"} for r in others if r["method"] == other]
    return paired_differences(runs + renamed, method, key, reference="~reference")


def row_table(references: list[dict], rows: list[dict]) -> tuple[str, list[dict]]:
    """One line per row: its scores, then its paired differences against the baseline and random weights."""
    seeds = len({r["seed"] for r in references if r["method"] == "baseline"})
    header = ("| teacher (its kNN / linear) | method | seeds | kNN | linear | Δ kNN vs baseline | Δ linear vs baseline "
              "| Δ kNN vs random weights | Δ linear vs random weights |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    stats = []
    for reference in REFERENCES:
        runs = [r for r in references if r["method"] == reference]
        if runs:
            # The baseline against random weights is the first question: does pretraining beat doing nothing?
            floor = ([paired_text(_against(runs, references, reference, "random", key)) for key, _ in PROBES]
                     if reference != "random" else ["", ""])
            cells = [spread_text([r[k] for r in runs], 2) for k, _ in PROBES] + ["", ""] + floor
            lines.append(f"| | {reference} | {len(runs)} | " + " | ".join(cells) + " |")
    for row in rows:
        runs, method = row["runs"], row["method"]
        differences = {(reference, key): _against(runs, references, method, reference, key)
                       for reference in REFERENCES for key, _ in PROBES}
        complete = len(runs) >= seeds
        stats.append({**{k: v for k, v in row.items() if k != "runs"}, "seeds": sorted(r["seed"] for r in runs),
                      "complete": complete,
                      "mean": {key: summarize([r[key] for r in runs])[0] for key, _ in PROBES},
                      "differences": {f"{ref} {key}": values for (ref, key), values in differences.items()}})
        scores = [spread_text([r[k] for r in runs], 2) for k, _ in PROBES]
        cells = [paired_text(differences[ref, key]) for ref in REFERENCES for key, _ in PROBES]
        marked = f"{len(runs)}" + ("" if complete else f" of {seeds}")
        name = _teacher_cell(row, scores=True) + (", control" if row["control"] else "")
        lines.append(f"| {name} | {method} | {marked} | " + " | ".join(scores + cells) + " |")
    return "\n".join(lines) + "\n", stats


def combination_table(rows: list[dict]) -> str:
    """For each ``mgd-amp+X`` under one teacher: what MGD-AMP adds to X, and what X adds to MGD-AMP."""
    by_teacher: dict[str, dict[str, list[dict]]] = {}
    # A teacher's own directory comes first, so its mgd-amp is the one a combination is compared with
    # (a row such as control (c) adopts the teacher with another loss factor).
    for row in sorted(rows, key=lambda r: r["directory"] != r["teacher"]):
        by_teacher.setdefault(row["teacher"], {}).setdefault(row["method"], row["runs"])
    lines = ["| teacher | combination | Δ kNN vs X alone | Δ linear vs X alone | Δ kNN vs MGD-AMP alone "
             "| Δ linear vs MGD-AMP alone |", "|---|---|---:|---:|---:|---:|"]
    for teacher, methods in by_teacher.items():
        for method, runs in methods.items():
            if not method.startswith("mgd-amp+"):
                continue
            alone = method.removeprefix("mgd-amp+")
            cells = [paired_text(_against(runs, methods[other], method, other, key)) if other in methods
                     else "not run" for other in (alone, "mgd-amp") for key, _ in PROBES]
            lines.append(f"| {teacher} | {method} (X = {alone}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def best_lines(stats: list[dict], rows: list[dict]) -> str:
    """Per probe: the complete row with the highest mean, its gain over the baseline and its paired margin
    over the runner-up (both with their interval). Controls are not candidates."""
    runs = {(row["directory"], row["method"]): row["runs"] for row in rows}
    complete = [s for s in stats if s["complete"] and not s["control"]]
    lines = []
    for key, probe in PROBES:
        if not complete:
            break
        ranked = sorted(complete, key=lambda s: s["mean"][key], reverse=True)
        best = ranked[0]
        text = (f"Best on {probe}: {best['method']} from the {_teacher_cell(best)} teacher, "
                f"{best['mean'][key]:.2f}, {paired_text(best['differences'][f'baseline {key}'])} against the baseline")
        if len(ranked) > 1:
            second = ranked[1]
            margin = _against(runs[best["directory"], best["method"]], runs[second["directory"], second["method"]],
                              best["method"], second["method"], key)
            text += (f"; ahead of {second['method']} ({_teacher_cell(second)}) by {paired_text(margin)}, "
                     "paired by seed")
        lines.append(text + ".")
    return "\n".join(lines) + ("\n" if lines else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("row_dirs", nargs="+", type=Path, metavar="ROW_DIR")
    parser.add_argument("--controls", nargs="+", type=Path, default=[], metavar="DIR",
                        help="rows of random-weight teachers: in the table, marked, never called best")
    parser.add_argument("--baseline-dir", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True, help="writes OUTPUT.md and OUTPUT.json")
    args = parser.parse_args(argv)
    references, rows = read_rows(args.baseline_dir, args.row_dirs, args.controls)
    table, stats = row_table(references, rows)
    text = ("Mean ± sample std [95% t-interval] of each paired difference, over the seeds both runs have; "
            "top-1 in %.\n\n" + table)
    combinations = combination_table(rows)
    if combinations:
        text += "\n" + combinations
    text += "\n" + best_lines(stats, rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text(text)
    args.output.with_suffix(".json").write_text(json.dumps({"rows": stats}, indent=1) + "\n")
    print(text, end="")


if __name__ == "__main__":
    main()
