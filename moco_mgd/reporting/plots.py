"""Figures of a run, made from its ``metrics.jsonl`` (PNG, no display needed).

* ``matching_cost.png``: the matching cost of each stage at each matching update (the MGD
  paper's Fig. 5; the costs should descend as the student learns).
* ``assignment_stability.png``: the teacher channel matched to a random sample of student
  channels at each update, and the fraction of teacher channels that changed student (Fig. 6;
  the targets change a lot at first, then settle).
* ``training_curves.png``: InfoNCE, MGD loss per stage, the embedding losses (CCKD, DisCo,
  SEED; runs that have them) and kNN top-1 per epoch of one or more runs (e.g. baseline vs
  MGD), with the teacher's kNN top-1 and any given reference (e.g. random weights) dashed.

The data extraction is pure (records in, arrays out); the ``plot_*`` functions only draw.
Regenerate from a log: ``python -m moco_mgd.reporting.plots RUN_DIR --compare baseline=OTHER_RUN_DIR``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # the object API draws with Agg, without pyplot's global state
from matplotlib.ticker import MaxNLocator

from moco_mgd.runtime.logs import MetricsLog, read_metrics
from moco_mgd.losses.embedding import EMBEDDING_LOSSES
from moco_mgd.losses.mgd import assignment_groups

__all__ = ["matching_costs", "changed_fractions", "group_representatives", "assignment_history",
           "epoch_curves", "teacher_knn_top1", "last_knn_top1", "plot_matching_cost", "plot_assignment_stability",
           "plot_training_curves", "write_run_figures"]

Records = Sequence[Mapping]
Curve = tuple[np.ndarray, np.ndarray]  # (x, y)
EMBEDDING_NAMES = {"cckd": "CCKD", "disco": "DisCo", "seed": "SEED", "bingo": "BINGO"}  # how a figure names each of EMBEDDING_LOSSES
logger = logging.getLogger("moco_mgd")


def _last_per_epoch(records: Records, kind: str) -> list[Mapping]:
    """Records of ``kind`` by epoch; a resumed run logs some epochs twice, the last one counts."""
    by_epoch = {int(r["epoch"]): r for r in records if r.get("kind") == kind}
    return [by_epoch[e] for e in sorted(by_epoch)]


def _per_update(records: Records, field: str, value) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    updates = _last_per_epoch(records, "matching")
    stages = list(updates[0][field]) if updates else []
    per_stage = {s: np.array([value(u, s) for u in updates], dtype=float) for s in stages}
    return np.array([int(u["epoch"]) for u in updates]), per_stage


def matching_costs(records: Records) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Epochs done before each matching update, and each stage's matching cost there."""
    return _per_update(records, "cost", lambda update, stage: float(update["cost"][stage]))


def changed_fractions(records: Records) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per update, the fraction of each stage's teacher channels whose student changed."""
    return _per_update(records, "changed",
                       lambda update, stage: update["changed"][stage] / len(update["assignment"][stage]))


def group_representatives(assignment: Sequence[int]) -> np.ndarray:
    """For each student channel, the smallest teacher channel matched to it (``[Cs]``)."""
    a = torch.tensor(list(assignment), dtype=torch.long)
    return assignment_groups(a, int(a.max()) + 1)[:, 0].numpy()


def assignment_history(records: Records, stage: str, num_channels: int = 50,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The teacher channel matched to a random sample of student channels at each update.

    Returns:
        ``(epochs[U], channel_ids[N], matrix[N, U])``: the update epochs, the sampled student
        channels (ascending; all of them when the stage has at most ``num_channels``) and, per
        channel and update, the smallest teacher channel of its group.
    """
    updates = [u for u in _last_per_epoch(records, "matching") if stage in u.get("assignment", {})]
    if not updates:
        raise ValueError(f"no matching record with an assignment for {stage!r}: not an MGD run")
    representatives = [group_representatives(u["assignment"][stage]) for u in updates]
    num_students = len(representatives[0])
    rng = np.random.default_rng(seed)
    channel_ids = np.sort(rng.choice(num_students, size=min(num_channels, num_students), replace=False))
    matrix = np.stack([r[channel_ids] for r in representatives], axis=1)
    return np.array([int(u["epoch"]) for u in updates]), channel_ids, matrix


def epoch_curves(records: Records) -> dict[str, Curve]:
    """Per-epoch curves against epochs done: ``infonce``, ``mgd_<stage>`` (MGD runs), the
    embedding losses that were on (``cckd``, ``disco``, ``seed``) and ``knn_top1``."""
    epochs = _last_per_epoch(records, "epoch")
    done = np.array([int(r["epoch"]) + 1 for r in epochs])  # an epoch record's epoch is the 0-based index
    curves = {}
    for key in ["infonce", *sorted({k for r in epochs for k in r if k.startswith("mgd_")}), *EMBEDDING_LOSSES]:
        have = [i for i, r in enumerate(epochs) if key in r]
        if have:
            curves[key] = (done[have], np.array([float(epochs[i][key]) for i in have]))
    knn = _last_per_epoch(records, "knn")
    if knn:
        curves["knn_top1"] = (np.array([int(r["epoch"]) for r in knn]), np.array([float(r["top1"]) for r in knn]))
    return curves


def teacher_knn_top1(records: Records) -> float | None:
    """The teacher's kNN top-1 (record kind ``knn_teacher``), or None when it was not measured."""
    teacher = _last_per_epoch(records, "knn_teacher")
    return float(teacher[-1]["top1"]) if teacher else None


def last_knn_top1(records: Records) -> float:
    """The last kNN top-1 of a log (e.g. of ``python -m moco_mgd.evaluation.knn --random-init --output-dir``)."""
    knn = [r for r in records if r.get("kind") == "knn"]
    if not knn:
        raise ValueError("the log has no kNN record (kind 'knn') to draw as a reference")
    return float(knn[-1]["top1"])


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _every(num_points: int) -> int:
    """Mark at most ~20 points of a line, so long runs stay readable."""
    return max(1, num_points // 20)


def _plot_curve(ax, curve: Curve, **style) -> None:
    ax.plot(*curve, markevery=_every(len(curve[0])), **style)


def plot_matching_cost(records: Records, path: str | os.PathLike) -> Path:
    """Line plot of each stage's matching cost against the epoch of the matching update."""
    epochs, costs = matching_costs(records)
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    for stage, cost in costs.items():
        ax.plot(epochs, cost, marker="o", markevery=_every(len(epochs)), label=stage)
    ax.set(xlabel="epochs done before the matching update", ylabel="matching cost",
           title="MGD matching cost per stage")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the lines cross the whole axes
    return _save(figure, path)


def plot_assignment_stability(records: Records, path: str | os.PathLike, num_channels: int = 50,
                              seed: int = 0) -> Path:
    """Per stage, a grid of student channels x updates coloured by the matched teacher channel.

    Teacher indices are coloured through a fixed random permutation, so that neighbouring
    indices get unlike colours; a dot marks a cell whose target changed since the previous
    update. Below each grid: the fraction of all the stage's teacher channels that changed.
    """
    update_epochs, fractions = changed_fractions(records)
    stages = list(fractions)
    figure = Figure(figsize=(3.2 * len(stages) + 0.5, 8), layout="constrained")
    axes = figure.subplots(2, len(stages), squeeze=False, sharex="col", height_ratios=[4, 1])
    for column, stage in enumerate(stages):
        epochs, channel_ids, matrix = assignment_history(records, stage, num_channels, seed)
        last_assignment = _last_per_epoch(records, "matching")[-1]["assignment"][stage]
        num_teachers, num_students = len(last_assignment), max(last_assignment) + 1
        shuffled = np.random.default_rng(seed).permutation(num_teachers)[matrix] / max(num_teachers - 1, 1)
        grid, changed = axes[0, column], axes[1, column]
        grid.imshow(shuffled, cmap="turbo", aspect="auto", interpolation="nearest", vmin=0, vmax=1)
        rows, columns = np.nonzero(matrix[:, 1:] != matrix[:, :-1])
        # Dots shrink with the number of updates so that they stay inside their cells.
        grid.scatter(columns + 1, rows, s=12 * min(1.0, 12 / matrix.shape[1]), c="white",
                     edgecolors="black", linewidths=0.6 * min(1.0, 12 / matrix.shape[1]))
        grid.set_yticks([0, len(channel_ids) - 1], [str(channel_ids[0]), str(channel_ids[-1])])
        grid.set_title(f"{stage}: {len(channel_ids)} of {num_students} student ch.\n"
                       f"matched among {num_teachers} teacher ch.", fontsize=10)
        if column == 0:
            grid.set_ylabel("student channel (random sample)")
        changed.plot(np.arange(len(update_epochs)), fractions[stage], marker="o",
                     markevery=_every(len(update_epochs)), color="black")
        changed.set(ylim=(0, 1.05), xlabel="epochs done before the update",
                    ylabel="fraction of teacher\nch. that changed" if column == 0 else None)
        changed.grid(alpha=0.3)
        changed.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        ticks = [int(t) for t in changed.get_xticks() if 0 <= t < len(update_epochs)]
        changed.set_xticks(ticks, [str(update_epochs[t]) for t in ticks])
    figure.suptitle("Matched teacher channel per student channel and update\n"
                    "(colour = teacher channel, smallest of its group; dot = changed since last update)",
                    fontsize=10)
    return _save(figure, path)


def plot_training_curves(runs: Mapping[str, Records], path: str | os.PathLike,
                         references: Mapping[str, float] | None = None) -> Path:
    """InfoNCE, MGD loss per stage and embedding losses (runs that have them) and kNN top-1 per
    epoch, one colour per run; ``references`` (label -> kNN top-1) are dashed lines on the kNN panel."""
    curves = {label: epoch_curves(records) for label, records in runs.items()}
    colours = {label: f"C{i}" for i, label in enumerate(runs)}
    has_mgd = any(k.startswith("mgd_") for c in curves.values() for k in c)
    has_embedding = any(k in EMBEDDING_LOSSES for c in curves.values() for k in c)
    has_knn = any("knn_top1" in c for c in curves.values())
    panels = ["infonce", *(["mgd"] if has_mgd else []), *(["embedding"] if has_embedding else []),
              *(["knn"] if has_knn else [])]
    figure = Figure(figsize=(4.5 * len(panels), 4), layout="constrained")
    axes = dict(zip(panels, figure.subplots(1, len(panels), squeeze=False)[0]))
    markers = "osD^v<>p"
    teachers = {}  # one dashed line per distinct teacher value, not one per run of the same teacher
    for label, run in curves.items():
        line = {"color": colours[label]}
        if "infonce" in run:
            _plot_curve(axes["infonce"], run["infonce"], marker="o", label=label, **line)
        stages = [k for k in run if k.startswith("mgd_")]
        for i, key in enumerate(stages):
            _plot_curve(axes["mgd"], run[key], marker=markers[i % len(markers)], label=f"{label} {key[4:]}",
                        alpha=1 - 0.6 * i / len(stages), **line)
        for i, key in enumerate(k for k in EMBEDDING_LOSSES if k in run):
            name = EMBEDDING_NAMES[key]
            _plot_curve(axes["embedding"], run[key], marker=markers[i], linestyle=("-", "--", ":")[i],
                        label=label if label == name else f"{label} {name}", **line)
        if "knn_top1" in run:
            _plot_curve(axes["knn"], run["knn_top1"], marker="o", label=label, **line)
        teacher = teacher_knn_top1(runs[label])
        if teacher is not None and has_knn:
            teachers.setdefault(teacher, label)
    for value, label in teachers.items():
        axes["knn"].axhline(value, linestyle="--", color="0.3" if len(teachers) == 1 else colours[label],
                            label="teacher" if len(teachers) == 1 else f"teacher ({label} run)")
    for i, (name, value) in enumerate((references or {}).items()):
        if has_knn:
            axes["knn"].axhline(value, linestyle=(0, (1, 2 + i)), color="0.55", label=name)
    last_epoch = max((int(c[0].max()) for run in curves.values() for c in run.values() if len(c[0])), default=1)
    titles = {"infonce": ("InfoNCE loss", "loss"), "mgd": ("MGD loss per stage", "loss"),
              "embedding": ("embedding losses (unweighted)", "loss"), "knn": ("kNN top-1", "top-1 (%)")}
    if has_embedding and all(values.min() > 0 for run in curves.values()
                             for key, (_, values) in run.items() if key in EMBEDDING_LOSSES):
        # The losses differ by orders of magnitude (CCKD ~1e-5, SEED ~1): linear would flatten all but one.
        axes["embedding"].set_yscale("log")
    for name, ax in axes.items():
        ax.set(title=titles[name][0], ylabel=titles[name][1], xlabel="epochs done")
        ax.set_xlim(0.5, last_epoch + 0.5)  # the same epochs on every panel, even with one kNN point
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            # Below the panel: with several MGD runs the per-stage legend would hide the curves.
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    return _save(figure, path)


def write_run_figures(run_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None,
                      compare: Mapping[str, str | os.PathLike | Records] | None = None,
                      metrics_log: MetricsLog | None = None, label: str | None = None,
                      references: Mapping[str, str | os.PathLike | float] | None = None) -> list[Path]:
    """Write a run's figures; the matching ones only when the run did MGD matching.

    Args:
        run_dir: the run's output directory (holds ``metrics.jsonl``).
        output_dir: where the PNGs go (default ``run_dir``).
        compare: other runs for ``training_curves.png``, label -> run directory or records.
        metrics_log: when given with wandb on, the figures are also sent to wandb through it.
        label: this run's name in the legend (default the directory name).
        references: horizontal kNN lines, label -> a value or a run directory whose last kNN
            record gives it (e.g. the random-weights floor of ``python -m moco_mgd.evaluation.knn --random-init``).

    Returns:
        The paths written.
    """
    records = read_metrics(run_dir)
    runs = {label or Path(run_dir).resolve().name: records}
    for name, other in (compare or {}).items():  # all logs are read first: a bad one writes nothing
        runs[name] = read_metrics(other) if isinstance(other, (str, os.PathLike)) else other
    lines = {name: float(ref) if isinstance(ref, (int, float)) else last_knn_top1(read_metrics(ref))
             for name, ref in (references or {}).items()}
    output = Path(output_dir if output_dir is not None else run_dir)
    written = []
    if any(r.get("kind") == "matching" for r in records):
        written.append(plot_matching_cost(records, output / "matching_cost.png"))
        written.append(plot_assignment_stability(records, output / "assignment_stability.png"))
    else:
        logger.info("%s has no matching records (not an MGD run, or a fixed matching): no matching figures", run_dir)
    written.append(plot_training_curves(runs, output / "training_curves.png", lines))
    if metrics_log is not None:
        metrics_log.log_images({p.stem: p for p in written})
    return written


def _parse_runs(parser: argparse.ArgumentParser, items: Sequence[str], flag: str) -> dict[str, Path]:
    runs = {}
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            parser.error(f"{flag} {item!r}: expected LABEL=RUN_DIR, e.g. {flag} baseline=output/baseline")
        runs[name] = Path(directory)
    return runs


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m moco_mgd.reporting.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run's output directory (holds metrics.jsonl)")
    parser.add_argument("--compare", nargs="+", action="extend", default=[], metavar="LABEL=DIR",
                        help="other runs to draw on the training curves (repeatable)")
    parser.add_argument("--reference", nargs="+", action="extend", default=[], metavar="LABEL=DIR",
                        help="a dashed kNN line at a run's last kNN top-1, e.g. \"random init=RUN_DIR\" of "
                             "python -m moco_mgd.evaluation.knn --random-init --output-dir RUN_DIR")
    parser.add_argument("--label", help="this run's name in the legend (default: the directory name)")
    parser.add_argument("--output-dir", type=Path, help="where the PNGs go (default: RUN_DIR)")
    parser.add_argument("--wandb-project", help="also send the figures to this wandb project")
    args = parser.parse_args(argv)
    compare = _parse_runs(parser, args.compare, "--compare")
    references = _parse_runs(parser, args.reference, "--reference")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = write_run_figures(args.run_dir, args.output_dir, compare, label=args.label, references=references)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if args.wandb_project:
        metrics_log = MetricsLog(args.output_dir or args.run_dir, enabled=True,
                                 wandb_project=args.wandb_project, run_name=args.label)
        metrics_log.log_images({path.stem: path for path in written})
        metrics_log.close()
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
