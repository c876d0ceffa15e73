"""Does self-supervised pretraining beat doing nothing? The recipe search's curves and table.

Reads the runs of ``docs/study6/lanes/recipe.sh`` (``ROOT/NAME/seed0``: the pretraining's
``metrics.jsonl`` with its kNN records, and ``lincls/metrics.jsonl``) and the random-weight floor
of each input shape (``ROOT/random/SHAPE/seed0/lincls``), and writes a table (each run's kNN after
every monitored epoch, its final linear top-1, and both against the floor of its shape) and a
figure of kNN against training steps with the floors as lines.

    python experiments/recipe_curves.py /work/study6_out --output docs/study6/recipe
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from moco_mgd.runtime.logs import read_metrics


def _command(run_dir: Path) -> str:
    """The run's command line, as the lane wrote it first in its stdout.txt."""
    lines = (run_dir / "stdout.txt").read_text().splitlines() if (run_dir / "stdout.txt").is_file() else []
    return next((line[2:] for line in lines if line.startswith("$ ")), "")


def _flag(command: str, name: str, default: str) -> str:
    words = command.split()
    return words[words.index(name) + 1] if name in words else default


def read_run(run_dir: Path) -> dict | None:
    """One finished run: its kNN curve (epoch, top-1), final linear top-1, steps per epoch and shape."""
    lincls = [r for r in read_metrics(run_dir / "lincls") if r.get("kind") == "epoch"] \
        if (run_dir / "lincls" / "metrics.jsonl").is_file() else []
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    knn = [(r["epoch"], r["top1"]) for r in records if r.get("kind") == "knn"]
    if not lincls or not knn:
        return None
    command = _command(run_dir)
    batch, images = int(_flag(command, "-b", "256")), int(_flag(command, "--max-images", "0"))
    shape = f"--image-size {_flag(command, '--image-size', '224')} --stem {_flag(command, '--stem', 'imagenet')}"
    return {"knn": knn, "linear": lincls[-1]["top1"], "steps_per_epoch": images // batch, "shape": shape,
            "command": command}


def read_floor(root: Path, shape: str) -> dict:
    directory = root / "random" / shape.replace(" ", "").replace("-", "") / "seed0" / "lincls"
    knn = [line for line in (directory / "log.txt").read_text().splitlines() if "of the cached features: top1" in line]
    linear = [r for r in read_metrics(directory) if r.get("kind") == "epoch"]
    return {"knn": float(knn[-1].split("top1 ")[1].split()[0]), "linear": linear[-1]["top1"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the recipe lane's output directory")
    parser.add_argument("--output", type=Path, required=True, help="writes OUTPUT.md, OUTPUT.png and OUTPUT.json")
    args = parser.parse_args(argv)
    runs = {d.parent.name: run for d in sorted(args.root.glob("*/seed0"))
            if d.parent.name != "random" and (run := read_run(d)) is not None}
    if not runs:
        raise SystemExit(f"no finished run under {args.root} (ROOT/NAME/seed0 with metrics.jsonl and lincls/)")
    floors = {shape: read_floor(args.root, shape) for shape in {run["shape"] for run in runs.values()}}
    lines = ["| run | kNN by epoch | last kNN − random | linear | linear − random |", "|---|---|---:|---:|---:|"]
    for name, run in runs.items():
        floor = floors[run["shape"]]
        curve = " ".join(f"{epoch}:{top1:.2f}" for epoch, top1 in run["knn"])
        lines.append(f"| {name} | {curve} | {run['knn'][-1][1] - floor['knn']:+.2f} | {run['linear']:.2f} | "
                     f"{run['linear'] - floor['linear']:+.2f} |")
    lines.append("")
    lines += [f"Random weights, {shape}: kNN {floor['knn']:.2f}, linear {floor['linear']:.2f}"
              for shape, floor in floors.items()]
    table = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text(table)
    args.output.with_suffix(".json").write_text(json.dumps({"runs": runs, "floors": floors}, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for name, run in runs.items():
        axis.plot([epoch * run["steps_per_epoch"] for epoch, _ in run["knn"]], [top1 for _, top1 in run["knn"]],
                  marker="o", label=name)
    for (shape, floor), style in zip(floors.items(), ("--", ":", "-.")):
        axis.axhline(floor["knn"], linestyle=style, color="grey", label=f"random weights, {shape}")
    axis.set_xlabel("training steps")
    axis.set_ylabel("kNN top-1 on the held-out images")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.output.with_suffix(".png"), dpi=120)
    plt.close(figure)
    print(table + f"figure: {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
