"""The embedding losses alone (CCKD, DisCo, SEED), forward + backward, at ImageNet shapes.

What each costs beyond the networks: random 128-d student and teacher embeddings of one
batch (the MoCo-v2 head's output), SEED against a queue of 65,536 teacher embeddings (its
default, as MoCo's), then backward to the student embeddings. Whole training steps, with the
networks, are in ``bench_pretrain.py``; these numbers isolate the losses, which a step
timing on CPU cannot resolve. Usage::

    python benchmarks/bench_embedding_losses.py                       # CPU, batch 256
    python benchmarks/bench_embedding_losses.py --device cuda --batch-size 256
"""
from __future__ import annotations

import argparse

import torch


from moco_mgd.losses.embedding import EmbeddingDistiller
from moco_mgd.reporting.timing import device_name, measure, print_table

LOSSES = {
    "CCKD (rbf-taylor, P=2)": {"cckd_weight": 1.0},
    "CCKD (rbf, exact)": {"cckd_weight": 1.0, "cckd_kernel": "rbf"},
    "DisCo (one view)": {"disco_weight": 1.0},
    "SEED (queue {queue})": {"seed_weight": 1.0},
    "all three": {"cckd_weight": 1.0, "disco_weight": 1.0, "seed_weight": 1.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256, help="images whose embeddings are distilled")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queue", type=int, default=65536, help="SEED's queue")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.queue % args.batch_size:
        parser.error(f"--queue {args.queue} must be a multiple of --batch-size {args.batch_size}")
    generator = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(args.batch_size, args.dim, device=device, generator=generator, requires_grad=True)
    teacher = torch.randn(args.batch_size, args.dim, device=device, generator=generator)

    rows = []
    for name, settings in LOSSES.items():
        kwargs = {"seed_queue": args.queue, **settings}
        distiller = EmbeddingDistiller(args.dim, args.dim, **kwargs).to(device)

        def step():
            student.grad = None
            loss, _ = distiller(student, teacher)
            loss.backward()

        seconds, peak_gpu = measure(step, device, args.warmup, args.iters)
        rows.append((name.format(queue=f"{args.queue:,}"), seconds, peak_gpu))

    gpu = device.type == "cuda"
    where = device_name(device)
    print(f"device: {device.type} ({where}); torch {torch.__version__}; batch {args.batch_size}, dim {args.dim}; "
          f"fp32; median of {args.iters}")
    # Host memory of a step this small is lost in the process's own; bench_pretrain.py measures it.
    print_table(["loss, forward + backward", "ms", "peak GPU memory (GiB)"],
                [(name, f"{1000 * seconds:,.2f}", f"{peak:.3f}" if gpu else "n/a (CPU)") for name, seconds, peak in rows])


if __name__ == "__main__":
    main()
