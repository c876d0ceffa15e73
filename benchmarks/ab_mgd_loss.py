"""A/B of the MGD loss (reduction + partial L2) of the four R50 -> R18 stages, forward + backward.

'before' is the implementation of 5d162dd (one index_select of all groups, amax and amin over the
group dimension, autograd through ``pow`` and the mask); 'now' is ``moco_mgd.losses.mgd`` as it
is (a running max/min over the groups' columns, a custom backward). Both run interleaved in one
process (min and median of the rounds), after a check that they give bitwise the same loss and
gradients.

    OMP_NUM_THREADS=1 python benchmarks/ab_mgd_loss.py --image-size 64 --batch-size 16
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moco_mgd.losses import mgd

# Stage widths and strides of ResNet-50 (teacher) and ResNet-18 (student).
TEACHER, STUDENT, STRIDES = (256, 512, 1024, 2048), (64, 128, 256, 512), (4, 8, 16, 32)


def before_reduce(t: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    b, _, h, w = t.shape
    cs, alpha = groups.shape
    grouped = t.index_select(1, groups.reshape(-1)).view(b, cs, alpha, h, w)
    high, low = grouped.amax(2), grouped.amin(2)
    return torch.where(high >= -low, high, low)


def before_partial_l2(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    t = torch.maximum(t, margin.reshape(1, -1, 1, 1))
    diff = s - t
    return (diff.pow(2) * (torch.maximum(diff, t) > 0)).sum()


def now_reduce(t: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    return mgd.reduce_grouped(t, groups, "amp")


IMPLEMENTATIONS = {"before": (before_reduce, before_partial_l2), "now": (now_reduce, mgd.partial_l2)}


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    stages = []
    for ct, cs, stride in zip(TEACHER, STUDENT, STRIDES):
        hw = max(args.image_size // stride, 1)
        teacher = torch.randn(args.batch_size, ct, hw, hw)
        student = torch.randn(args.batch_size, cs, hw, hw, requires_grad=True)
        groups = torch.randperm(ct).view(cs, ct // cs).sort(1).values
        stages.append((student, teacher, groups, -torch.rand(cs)))

    def run(name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        reduce, partial_l2 = IMPLEMENTATIONS[name]
        for student, *_ in stages:
            student.grad = None
        total = sum(partial_l2(s, reduce(t, g), m) for s, t, g, m in stages)
        total.backward()
        return total.detach(), [s.grad.clone() for s, *_ in stages]

    (loss_a, grads_a), (loss_b, grads_b) = run("before"), run("now")
    same = torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    print(f"bitwise the same loss and gradients: {same}")
    times = {name: [] for name in IMPLEMENTATIONS}
    for r in range(args.rounds):
        for name in (IMPLEMENTATIONS if r % 2 else reversed(IMPLEMENTATIONS)):
            start = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - start)
    print(f"{torch.get_num_threads()} thread(s), {args.image_size} px, batch {args.batch_size}, {args.rounds} rounds")
    for name, t in times.items():
        print(f"{name}: min {1e3 * min(t):.2f} ms, median {1e3 * statistics.median(t):.2f} ms")
    if not same:
        raise SystemExit("the two implementations differ")
    return {name: statistics.median(t) for name, t in times.items()}


if __name__ == "__main__":
    main()
