"""Benchmark of the MGD core at ResNet-50 -> ResNet-18 channel shapes.

Prints a markdown table with:
    * the time to solve the matching of all four stages (balanced for amp/rd/max/avg,
      sparse for sm), i.e. the Hungarian part of one matching update;
    * the time to accumulate the matching cost of one batch (the per-batch part of an update);
    * the time of the MGD loss (forward + backward) of one training batch, per reducer.

Features are random tensors of the shapes of 224 px inputs (56, 28, 14, 7), so this
measures MGD alone, not the networks. Usage::

    python benchmarks/bench_mgd.py                      # CPU, batch 32
    python benchmarks/bench_mgd.py --device cuda --batch-size 256
"""
from __future__ import annotations

import argparse

import torch


from moco_mgd.losses import mgd
from moco_mgd.losses.mgd_distiller import MGDistiller
from moco_mgd.reporting.timing import device_name, measure, print_table

STUDENT = (64, 128, 256, 512)       # resnet18 / resnet34
TEACHER = (256, 512, 1024, 2048)    # resnet50
SPATIAL = (56, 28, 14, 7)           # at 224 px


def _features(batch: int, device: torch.device, dtype: torch.dtype, scale: int):
    size = [max(1, s // scale) for s in SPATIAL]
    s = [torch.randn(batch, c, h, h, device=device, dtype=dtype) for c, h in zip(STUDENT, size)]
    t = [torch.randn(batch, c, h, h, device=device, dtype=dtype) for c, h in zip(TEACHER, size)]
    return s, t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the features (bf16 as under autocast on GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    margins = [-torch.rand(c) for c in TEACHER]
    rows = []

    for kind, solve in (("balanced", mgd.balanced_assignment), ("sparse", mgd.sparse_assignment)):
        costs = [torch.rand(cs, ct, dtype=torch.float64) for cs, ct in zip(STUDENT, TEACHER)]
        seconds, _ = measure(lambda: [solve(c) for c in costs], torch.device("cpu"), iters=args.repeats)
        rows.append((f"solve 4 stages, {kind} matching (scipy, CPU)", seconds, ""))

    s_feats, t_feats = _features(args.batch_size, device, dtype, scale=1)
    distiller = MGDistiller(STUDENT, TEACHER, margins).to(device)
    seconds, _ = measure(lambda: distiller.accumulate(s_feats, t_feats), device, iters=args.repeats)
    rows.append((f"accumulate matching cost, 1 batch of {args.batch_size}", seconds,
                 f"{args.batch_size / seconds:,.0f} img/s"))

    for reducer in mgd.REDUCERS:
        distiller = MGDistiller(STUDENT, TEACHER, margins, reducer=reducer).to(device)
        distiller.accumulate(s_feats, t_feats)
        distiller.update_matching()
        student = [f.detach().clone().requires_grad_(True) for f in s_feats]

        def step():
            loss, _ = distiller(student, t_feats)
            loss.backward()

        seconds, _ = measure(step, device, iters=args.repeats)
        rows.append((f"MGD loss fwd+bwd, {reducer}, batch {args.batch_size}", seconds,
                     f"{args.batch_size / seconds:,.0f} img/s"))

    name = device_name(device)
    print(f"device: {device.type} ({name}); torch {torch.__version__}; features {args.dtype}; "
          f"median of {args.repeats}")
    print_table(["what", "time (ms)", "throughput"],
                [(what, f"{1000 * seconds:,.1f}", extra) for what, seconds, extra in rows])


if __name__ == "__main__":
    main()
