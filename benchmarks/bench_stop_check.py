"""What the per-iteration stop check costs: ``StopRequest.poll()`` (one all-reduce of three int32
over the run's gloo group) next to a real DDP training step, in 2 processes of one thread each.

The step is the one main_moco_mgd.py runs (``moco_mgd.training.engine.training_step``):
MoCo-v2 ResNet-18, wrapped in DDP, synthetic images. Rounds alternate a step without and a step
followed by the poll, so drift of the machine hits both alike. Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_stop_check.py --rounds 20 --image-size 64 --batch-size 8
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from moco_mgd.models.moco import MoCo
from moco_mgd.runtime.launch import free_local_port
from moco_mgd.runtime.stopping import StopRequest
from moco_mgd.training.distillation import PretrainModel
from moco_mgd.training.engine import training_step


def _run(rank: int, args: argparse.Namespace, port: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        s, b = args.image_size, args.batch_size
        im_q, im_k = torch.randn(b, 3, s, s), torch.randn(b, 3, s, s)
        moco = MoCo("resnet18", 128, 4096, mlp=True)
        model = DistributedDataParallel(PretrainModel(moco))
        optimizer = torch.optim.SGD(moco.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
        with StopRequest.for_run() as stop:
            polls = []
            for _ in range(args.polls):
                start = time.perf_counter()
                stop.poll()
                polls.append(time.perf_counter() - start)
            for _ in range(args.warmup):
                training_step(model, optimizer, im_q, im_k)
            plain, checked = [], []
            for _ in range(args.rounds):
                dist.barrier()
                start = time.perf_counter()
                training_step(model, optimizer, im_q, im_k)
                plain.append(time.perf_counter() - start)
                dist.barrier()
                start = time.perf_counter()
                training_step(model, optimizer, im_q, im_k)
                stop.poll()
                checked.append(time.perf_counter() - start)
        if rank == 0:
            queue.put((statistics.median(polls), statistics.median(plain), statistics.median(checked)))
    finally:
        dist.destroy_process_group()



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="images per process")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--polls", type=int, default=2000)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_run, args=(args, free_local_port(), queue), nprocs=2, start_method="spawn")
    poll, plain, checked = queue.get()
    print(f"2 gloo processes x 1 thread, MoCo-v2 ResNet-18 under DDP, {args.image_size} px, "
          f"{args.batch_size} images per process; medians of {args.rounds} interleaved rounds\n")
    print("| | ms |\n|---|---:|")
    print(f"| `StopRequest.poll()` alone (median of {args.polls}) | {poll * 1e3:.3f} |")
    print(f"| training step | {plain * 1e3:.1f} |")
    print(f"| training step + poll | {checked * 1e3:.1f} |")
    print(f"\npoll / step: {poll / plain * 100:.3f}%; step+poll - step: {(checked - plain) * 1e3:+.1f} ms "
          f"(run-to-run noise of a whole step is larger)")


if __name__ == "__main__":
    main()
