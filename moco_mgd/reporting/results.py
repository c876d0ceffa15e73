"""Results of an experiment: what one run measured, and the table over methods and seeds.

An experiment script (``experiments/fashion_mnist.py``) writes one ``result.json`` per run
(one method, one seed); :func:`summarize` and :func:`results_table` turn them into the
mean +/- standard deviation table of ``RESULTS.md``.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from moco_mgd.runtime.logs import read_metrics

__all__ = ["RESULT_FILE", "last_record", "run_result", "write_result", "read_result", "summarize", "t_interval",
           "paired_differences", "results_table", "summary_line"]

RESULT_FILE = "result.json"
# (key in a result, column title, digits): the columns of the results table.
COLUMNS = (("knn_top1", "kNN top-1", 2), ("linear_top1", "linear top-1", 2), ("pretrain_seconds", "pretrain s", 0),
           ("eval_seconds", "eval s", 0))
# The two probes every study reports, as (result key, short name).
PROBES = (("knn_top1", "kNN"), ("linear_top1", "linear"))


def last_record(records: Sequence[Mapping], kind: str) -> Mapping:
    """The last record of ``kind``; ValueError naming the kind when the log has none."""
    for record in reversed(records):
        if record.get("kind") == kind:
            return record
    raise ValueError(f"no {kind!r} record in the log: the run did not finish (see its log.txt)")


def run_result(pretrain_dir: str | os.PathLike, lincls_dir: str | os.PathLike, **fields) -> dict:
    """What one run measured: the last kNN top-1 of its pretraining, the final linear top-1.

    The linear top-1 is the last epoch's, not the best one (MoCo prints the best, which is
    chosen on the validation set it reports).
    """
    knn = last_record(read_metrics(pretrain_dir), "knn")
    linear = last_record(read_metrics(lincls_dir), "epoch")
    return {**fields, "knn_top1": float(knn["top1"]), "knn_epoch": int(knn["epoch"]),
            "linear_top1": float(linear["top1"])}


def write_result(run_dir: str | os.PathLike, result: Mapping) -> Path:
    """Write ``run_dir/result.json`` atomically: its presence marks the run as done."""
    path = Path(run_dir) / RESULT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(result), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_result(run_dir: str | os.PathLike) -> dict | None:
    """The run's result, or None when it has not finished."""
    path = Path(run_dir) / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def summarize(values: Iterable[float]) -> tuple[float, float, int]:
    """``(mean, sample standard deviation, n)``; the deviation is NaN for a single value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("nothing to summarize: no finished run")
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std, len(values)


def t_interval(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float]:
    """The ``confidence`` t-interval of the mean of ``values`` (at least two): mean ± t * std / sqrt(n)."""
    from scipy.stats import t

    mean, std, n = summarize(values)
    if n < 2:
        raise ValueError("a t-interval needs at least two values")
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def spread_text(values: list[float], digits: int, signed: bool = False, interval: bool = False) -> str:
    """``mean ± std`` (just the mean for one value); with ``interval``, the 95% t-interval after it."""
    mean, std, n = summarize(values)
    sign = "+" if signed else ""
    if n == 1:
        return f"{mean:{sign}.{digits}f}"
    text = f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"
    if interval:
        low, high = t_interval(values)
        text += f" [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"
    return text


def paired_text(differences: list[float]) -> str:
    """Paired differences as a reader wants them: ``+mean ± std [95% t-interval]``, the mean alone
    (marked) for one seed, or "no paired seed"."""
    if not differences:
        return "no paired seed"
    if len(differences) == 1:
        return f"{differences[0]:+.2f} (1 seed)"
    return spread_text(differences, 2, signed=True, interval=True)


def paired_differences(results: Iterable[Mapping], method: str, key: str, reference: str = "baseline") -> list[float]:
    """``method`` minus ``reference`` on ``key``, seed by seed, over the seeds both have.

    A run and the reference run of the same seed share their initialisation and data order:
    their difference varies less than either number does over seeds.
    """
    results = list(results)
    reference_by_seed = {r["seed"]: r[key] for r in results if r["method"] == reference}
    return [r[key] - reference_by_seed[r["seed"]] for r in sorted(results, key=lambda r: r["seed"])
            if r["method"] == method and r["seed"] in reference_by_seed]


def results_table(results: Iterable[Mapping], methods: Sequence[str], titles: Mapping[str, str] | None = None,
                  reference: str = "baseline") -> str:
    """A markdown table: one row per method (in ``methods`` order), mean ± std over its seeds.

    When ``reference`` has results, two more columns give each method's top-1 minus the
    reference's of the same seed (:func:`paired_differences`): mean ± sample std over the shared
    seeds and, from two seeds on, the 95% t-interval of the mean difference in brackets.

    Args:
        results: run results with at least ``method``, ``seed`` and the :data:`COLUMNS` keys.
        methods: the rows; a method without results is left out.
        titles: a longer name for a method's row (default: the method).
        reference: the method the paired differences are taken against.
    """
    results = list(results)
    titles = titles or {}
    paired = any(r["method"] == reference for r in results)
    deltas = (("knn_top1", "Δ kNN"), ("linear_top1", "Δ linear")) if paired else ()
    header = [title for _, title, _ in COLUMNS[:2]] + [f"{t} vs {reference}" for _, t in deltas] \
        + [title for _, title, _ in COLUMNS[2:]]
    lines = ["| method | seeds | " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(header)]
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        cells = [spread_text([r[key] for r in runs], digits) for key, _, digits in COLUMNS[:2]]
        for key, _ in deltas:
            differences = paired_differences(results, method, key, reference)
            cells.append("" if method == reference or not differences
                         else spread_text(differences, 2, signed=True, interval=True))
        cells += [spread_text([r[key] for r in runs], digits) for key, _, digits in COLUMNS[2:]]
        lines.append(f"| {titles.get(method, method)} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def standing(differences: Sequence[float]) -> int:
    """+1 above, -1 below, 0 level: the sign of the mean of one difference, and from two
    differences on the side of 0 that the whole 95% t-interval lies on (0 when it spans 0)."""
    if len(differences) == 1:
        return (differences[0] > 0) - (differences[0] < 0)
    low, high = t_interval(differences)
    return 1 if low > 0 else -1 if high < 0 else 0


def difference_text(differences: Sequence[float], probe: str) -> str:
    text = f"{summarize(differences)[0]:+.2f} {probe}"
    if len(differences) > 1:
        low, high = t_interval(differences)
        text += f" (95% CI {low:+.2f} to {high:+.2f})"
    return text


def summary_line(results: Iterable[Mapping], student: str, titles: Mapping[str, str], teacher: str = "teacher",
                 reference: str = "baseline", floor: str = "random") -> str:
    """One sentence a newcomer reads first: is the teacher better, did ``student`` beat the baseline,
    and where does every trained row stand against the same network with random weights?

    Every comparison is paired by seed (:func:`paired_differences`). From two seeds on, a row
    beats (or is above) another only where the 95% t-interval of its differences is above 0, and
    is below only where the interval is below 0; one seed is read by the sign of its difference
    and said to be one seed. Rows without results are left out.
    """
    results = list(results)

    def mean(method: str, key: str = "knn_top1") -> float | None:
        values = [r[key] for r in results if r["method"] == method]
        return summarize(values)[0] if values else None

    def seeds(count: int) -> str:
        return f"{count} seed{'s' if count > 1 else ''}"

    def against(method: str, other: str) -> tuple[list[float], list[float]]:
        """Paired kNN and linear differences; a row that shares no seed with ``other`` (a teacher
        trained once) is compared with ``other``'s mean."""
        pairs = [paired_differences(results, method, key, other) for key, _ in PROBES]
        if not pairs[0]:
            pairs = [[mean(method, key) - mean(other, key)] for key, _ in PROBES]
        return pairs[0], pairs[1]

    parts = []
    teacher_knn, baseline_knn = mean(teacher), mean(reference)
    if teacher_knn is not None and baseline_knn is not None:
        verdict = "better" if teacher_knn > baseline_knn else "WORSE"
        parts.append(f"the {titles.get(teacher, teacher)} is {verdict} than the baseline student "
                     f"(kNN {teacher_knn:.2f} vs {baseline_knn:.2f})")
    knn = paired_differences(results, student, "knn_top1", reference)
    linear = paired_differences(results, student, "linear_top1", reference)
    if knn and student != reference:
        above = (standing(knn) > 0, standing(linear) > 0)
        verdict = {(True, True): "beats it on both probes", (True, False): "beats it on kNN only",
                   (False, True): "beats it on the linear probe only",
                   (False, False): "does not beat it"}[above]
        level = [probe for probe, differences, won in (("kNN", knn, above[0]), ("linear", linear, above[1]))
                 if not won and len(differences) > 1 and summarize(differences)[0] > 0]
        if level:
            verdict += f" (the {' and '.join(level)} gains' 95% CIs include 0)" \
                if len(level) > 1 else f" (its {level[0]} gain's 95% CI includes 0)"
        shown = [difference_text(knn, "kNN"), difference_text(linear, "linear top-1")]
        parts.append(f"{titles.get(student, student)} {verdict}: {', '.join(shown)} against the baseline of the "
                     f"same seed ({seeds(len(knn))})")
    if mean(floor) is not None:
        rows = []
        for method in dict.fromkeys([teacher, reference, student]):
            if mean(method) is None:
                continue
            knn_gap, linear_gap = against(method, floor)
            knn_side, linear_side = standing(knn_gap), standing(linear_gap)
            place = ("above them on both probes" if knn_side == linear_side == 1
                     else "BELOW them on both probes" if knn_side == linear_side == -1
                     else "above on kNN only" if knn_side == 1
                     else "above on the linear probe only" if linear_side == 1 else "not above them on either probe")
            rows.append(f"{titles.get(method, method)} {place} "
                        f"({difference_text(knn_gap, 'kNN')}, {difference_text(linear_gap, 'linear')})")
        parts.append(f"against random weights (kNN {mean(floor):.2f}, linear {mean(floor, 'linear_top1'):.2f}): "
                     + ", ".join(rows))
    return ("In short: " + "; ".join(parts) + ".") if parts else "In short: no finished run to compare."
