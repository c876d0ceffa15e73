"""Time of one full MGD matching update, in 1 process and in 2 processes of a real process group.

One update (what ``moco_mgd.training.engine.run_matching_update`` does):

    * collection: each rank feeds its shard of the N images through the ResNet-50 teacher and
      the ResNet-18 student (``forward_with_stages``) and accumulates the channel costs
      (``collect_matching_costs``);
    * solve + communication: ``MGDistiller.update_matching()`` all-reduces the costs, rank 0
      solves the four Hungarian assignments and broadcasts them.

Images are synthetic (standard-normal pixels, no data loading); the networks have random
weights (the cost of a forward does not depend on them). Timed on rank 0, with a barrier
before and after each part; one warm-up update of one batch per process first. World size 1
runs in its own process without a process group (as single-process training does); world
size 2 uses gloo on CPU, NCCL with one GPU per process on CUDA (needs 2 GPUs).
Prints a markdown table. Usage::

    python benchmarks/bench_matching_update.py                        # CPU, N=2048, 32 px, batch 64
    python benchmarks/bench_matching_update.py --device cuda --images 20000 --image-size 224 --batch-size 256
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


from moco_mgd.runtime import distributed
from moco_mgd.runtime.launch import free_local_port
from moco_mgd.models.resnet import STEMS, build_resnet
from moco_mgd.losses.mgd import REDUCERS
from moco_mgd.losses.mgd_distiller import MGDistiller
from moco_mgd.training.matching import collect_matching_costs


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, threads: int, result: str) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, **kwargs)
    try:
        _run(rank, world_size, device, args, threads, result)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _barrier(device: torch.device) -> None:
    _sync(device)
    distributed.barrier()


def _run(rank: int, world_size: int, device: torch.device, args: argparse.Namespace, threads: int,
         result: str) -> None:
    torch.manual_seed(0)  # the same networks on every rank
    teacher = build_resnet("resnet50").eval().requires_grad_(False)
    teacher.fc = torch.nn.Identity()
    student = build_resnet("resnet18", stem=args.stem)
    student.fc = torch.nn.Identity()
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    teacher.to(device, memory_format=memory_format)
    student.to(device, memory_format=memory_format)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    distiller = MGDistiller.from_models(teacher, student, reducer=args.reducer).to(device)

    shard = args.images // world_size  # this rank's images (a DistributedSampler shard)
    gen = torch.Generator().manual_seed(1 + rank)
    images = torch.randn(shard, 3, args.image_size, args.image_size, generator=gen)
    images = images.to(device).contiguous(memory_format=memory_format)
    batches = list(images.split(args.batch_size))

    def update(batch_list):
        _barrier(device)
        start = time.perf_counter()
        seen = collect_matching_costs(distiller, student, teacher, batch_list,
                                      device=device, autocast_dtype=autocast_dtype)
        _barrier(device)
        collected = time.perf_counter()
        reports = distiller.update_matching()
        _barrier(device)
        end = time.perf_counter()
        return collected - start, end - collected, end - start, seen, reports[0].num_images

    update(batches[:1])  # warm-up: allocations, thread pools, first communication
    runs = [update(batches) for _ in range(args.repeats)]
    if rank == 0:
        collect = statistics.median(r[0] for r in runs)
        solve = statistics.median(r[1] for r in runs)
        total = statistics.median(r[2] for r in runs)
        Path(result).write_text(json.dumps({
            "world_size": world_size, "threads": threads, "collect": collect, "solve": solve,
            "total": total, "per_rank": runs[0][3], "images": runs[0][4],
            "all_totals": [r[2] for r in runs]}))



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, default=2048, help="images per matching update (N), all ranks")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="per-process batch of the collection")
    parser.add_argument("--stem", default="imagenet", choices=STEMS, help="student stem")
    parser.add_argument("--reducer", default="amp", choices=REDUCERS,
                        help="amp/rd/max/avg: balanced matching; sm: sparse")
    parser.add_argument("--world-sizes", default="1,2", help="comma-separated process counts to time")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: CPU cores // processes, at least 1)")
    parser.add_argument("--repeats", type=int, default=1, help="timed updates per world size (median)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows, notes = [], []
    for world_size in (int(w) for w in args.world_sizes.split(",")):
        if args.device == "cuda" and torch.cuda.device_count() < world_size:
            notes.append(f"world size {world_size}: not measured, {torch.cuda.device_count()} GPU(s) here")
            continue
        threads = args.threads or max(1, cores // world_size)
        with tempfile.TemporaryDirectory() as tmp:
            result = os.path.join(tmp, "result.json")
            mp.spawn(_worker, args=(world_size, free_local_port(), args, threads, result), nprocs=world_size, join=True)
            rows.append(json.loads(Path(result).read_text()))

    if args.device == "cuda":
        hardware = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}; bf16 autocast, channels_last"
    else:
        hardware = f"{_cpu_model()}, {cores} CPU cores; fp32"
    print(f"hardware: {hardware}; torch {torch.__version__}; date {datetime.date.today().isoformat()}")
    print(f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}".rstrip())
    print(f"N = {args.images} synthetic images per update, {args.image_size} px, ResNet-50 -> ResNet-18 "
          f"({args.stem} stem), reducer {args.reducer}, batch {args.batch_size} per process, "
          f"median of {args.repeats} update(s) after a 1-batch warm-up")
    print("\n| processes | backend | torch threads / process | images / process | collection (s) "
          "| solve + communication (s) | total (s) | images/s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        backend = "none" if r["world_size"] == 1 else ("nccl" if args.device == "cuda" else "gloo")
        print(f"| {r['world_size']} | {backend} | {r['threads']} | {r['per_rank']:,} | {r['collect']:.2f} | "
              f"{r['solve']:.2f} | {r['total']:.2f} | {r['images'] / r['total']:,.0f} |")
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
