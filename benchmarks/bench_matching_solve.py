"""The solve of one MGD matching update (the four balanced assignments of ResNet-50 -> ResNet-18),
by three solvers in the same run, on the same costs:

    * ``moco_mgd.losses.mgd.balanced_assignment``: Jonker-Volgenant (``lap.lapjv``) on the stacked matrix;
    * scipy's ``linear_sum_assignment`` on the same stacked matrix (what the project used before);
    * the authors' procedure: OR-Tools' linear assignment fed arc by arc from a Python loop
      (their ``AddArcWithCost`` loop, on OR-Tools' current API ``SimpleLinearSumAssignment``,
      integer costs), only when ``ortools`` is installed (``pip install ortools``; it is not a
      dependency of the project).

Two kinds of cost: ``channel``, Eq. 6 summed over a batch of real network features (a random
ResNet-50 and ResNet-18 on random 32 px images, which is what an update solves: its columns
carry each teacher channel's own energy), and ``uniform`` (i.i.d. uniform entries, the easy
case). Each solver's total cost is checked against lapjv's (all three are exact). Prints a
markdown table. Usage::

    python benchmarks/bench_matching_solve.py                 # both kinds, all solvers
    python benchmarks/bench_matching_solve.py --no-ortools    # skip the (slow) authors' loop
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


from moco_mgd.losses import mgd
from moco_mgd.models.resnet import build_resnet
from moco_mgd.models.stages import forward_with_stages


def channel_costs(images: int, size: int) -> list[torch.Tensor]:
    """Eq. 6 summed over ``images`` random images, at the four stages of R50 -> R18."""
    torch.manual_seed(0)
    student, teacher = build_resnet("resnet18").eval(), build_resnet("resnet50").eval()
    x = torch.randn(images, 3, size, size)
    with torch.no_grad():
        s_feats, t_feats = forward_with_stages(student, x)[1], forward_with_stages(teacher, x)[1]
    return [mgd.channel_cost(s, t).double() for s, t in zip(s_feats, t_feats)]


def uniform_costs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(cs, 4 * cs, generator=g, dtype=torch.float64) for cs in (64, 128, 256, 512)]


def scipy_balanced(cost: torch.Tensor) -> torch.Tensor:
    c = cost.numpy()
    cs, ct = c.shape
    rows, cols = linear_sum_assignment(np.tile(c, (ct // cs, 1)))
    assignment = torch.full((ct,), -1, dtype=torch.long)
    assignment[torch.from_numpy(cols)] = torch.from_numpy(rows % cs)
    return assignment


def authors_ortools_balanced(cost: torch.Tensor) -> torch.Tensor:
    """The authors' arc-by-arc loop, on OR-Tools' current linear-assignment API."""
    from ortools.graph.python import linear_sum_assignment as ortools_lsa

    c = cost.numpy()
    cs, ct = c.shape
    stacked = np.tile(c, (ct // cs, 1))
    # integer costs, as OR-Tools needs: 1e9 steps over the range keeps the optimum of these costs
    scaled = np.rint((stacked - stacked.min()) / max(np.ptp(stacked), 1e-300) * 1e9).astype(np.int64)
    solver = ortools_lsa.SimpleLinearSumAssignment()
    for i in range(scaled.shape[0]):
        for j in range(ct):
            solver.add_arc_with_cost(i, j, int(scaled[i, j]))
    if solver.solve() != solver.OPTIMAL:
        raise RuntimeError("OR-Tools found no optimal assignment")
    assignment = torch.full((ct,), -1, dtype=torch.long)
    for i in range(scaled.shape[0]):
        assignment[solver.right_mate(i)] = i % cs
    return assignment


def total_cost(cost: torch.Tensor, assignment: torch.Tensor) -> float:
    matched = assignment >= 0
    return float(cost[assignment[matched], torch.nonzero(matched).squeeze(1)].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images summed into the channel costs")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--no-ortools", dest="ortools", action="store_false")
    args = parser.parse_args()

    solvers = {"lapjv (this project)": mgd.balanced_assignment, "scipy linear_sum_assignment": scipy_balanced}
    if args.ortools:
        try:
            import ortools  # noqa: F401
            solvers["authors' OR-Tools arc loop"] = authors_ortools_balanced
        except ImportError:
            print("ortools is not installed: the authors' procedure is skipped (pip install ortools)")
    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads; costs of R50 -> R18, 4 stages "
          f"(64x256, 128x512, 256x1024, 512x2048)")
    print("| costs | solver | seconds (4 stages) | largest stage (s) | total cost / lapjv's |")
    print("|---|---|---:|---:|---:|")
    for kind, costs in (("channel", channel_costs(args.images, args.image_size)), ("uniform", uniform_costs())):
        reference = None
        for name, solve in solvers.items():
            times, totals = [], []
            for cost in costs:
                start = time.perf_counter()
                assignment = solve(cost)
                times.append(time.perf_counter() - start)
                totals.append(total_cost(cost, assignment))
            reference = reference or totals
            ratio = sum(totals) / sum(reference)
            print(f"| {kind} | {name} | {sum(times):.3f} | {times[-1]:.3f} | {ratio:.12f} |", flush=True)


if __name__ == "__main__":
    main()
