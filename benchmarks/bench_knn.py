"""Benchmark of the kNN monitor: faiss vs torch search, and the feature extraction before it.

Prints a markdown table (with the command line, the device and the date) of:
    * ``knn_classify`` with the faiss backend and with the torch backend, on a random bank of
      ``--bank`` x ``--dim`` features (10 classes) and ``--queries`` queries, k=200, T=0.1,
      with how often the two agree;
    * ``extract_features`` of a ResNet-18 (fc = identity) over ``--extract-images`` random
      32x32 images (bf16 autocast on GPU, fp32 on CPU).
Memory is the peak during each step above the memory before it: on CPU of the process's RSS
(the peak is reset before each step through /proc/self/clear_refs; where that is refused, the
growth of ``getrusage``'s max RSS, 0 when a step stays under an earlier peak), on GPU of
``torch.cuda.max_memory_allocated`` (faiss's GPU memory is outside torch's allocator: not counted).
Usage::

    python benchmarks/bench_knn.py                      # CPU, 60000 x 512 bank, 10000 queries
    python benchmarks/bench_knn.py --device cuda --bank 1281167 --queries 50000 --extract-images 65536
"""
from __future__ import annotations

import argparse
import datetime
import resource
import shlex
import sys
import time

import torch
from torch.utils.data import TensorDataset


from moco_mgd.models.resnet import STEMS, build_resnet
from moco_mgd.evaluation.features import extract_features
from moco_mgd.evaluation.knn import knn_classify
from moco_mgd.reporting.timing import device_name, print_table


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # "VmHWM:   123 kB"


def _cpu_memory_start() -> tuple[int, bool]:
    """``(baseline, resettable)``: the RSS after resetting the peak, where Linux lets us (so
    each step gets its own peak), else the max RSS so far (``getrusage``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS (Linux >= 4.0)
        return _proc_status_bytes("VmRSS"), True
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False  # Linux reports KiB


def _measure(fn, device: torch.device):
    """``(result, seconds, peak bytes)`` of ``fn()``; see the module docstring for the memory."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base, resettable = _cpu_memory_start()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _proc_status_bytes("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result, seconds, max(peak - base, 0)


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", type=int, default=60000, help="train features in the bank")
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("-k", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=4096, help="queries per search call")
    parser.add_argument("--extract-images", type=int, default=2048, help="32x32 images for the extraction")
    parser.add_argument("--batch-size", type=int, default=256, help="extraction batch")
    parser.add_argument("--stem", default="small", choices=STEMS,
                        help="ResNet-18 stem of the extraction (small: what 32 px runs use)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "--device cuda but torch sees no GPU\n")
    for flag in ("bank", "queries", "extract_images", "batch_size", "k", "classes"):
        if getattr(args, flag) < 1:
            shown = "-k" if flag == "k" else "--" + flag.replace("_", "-")
            parser.error(f"{shown} {getattr(args, flag)}: must be at least 1")
    torch.manual_seed(0)
    rows = []

    # Noisy clusters (one centre per class): the accuracy is neither 100% nor chance, so the
    # agreement of the two backends means something.
    centres = 0.25 * torch.randn(args.classes, args.dim)
    bank_labels = torch.randint(0, args.classes, (args.bank,))
    query_labels = torch.randint(0, args.classes, (args.queries,))
    bank = (centres[bank_labels] + 2 * torch.randn(args.bank, args.dim)).to(device)
    queries = (centres[query_labels] + 2 * torch.randn(args.queries, args.dim)).to(device)
    bank_labels = bank_labels.to(device)
    what = f"{args.bank:,} x {args.dim} bank, {args.queries:,} queries, k={args.k}"
    scores = {}
    for backend in ("faiss", "torch"):
        # warm-up on a few queries: imports, BLAS / CUDA initialisation
        knn_classify(bank, bank_labels, queries[:8], args.classes, args.k, backend=backend,
                     use_gpu=device.type == "cuda")
        scores[backend], seconds, peak = _measure(
            lambda: knn_classify(bank, bank_labels, queries, args.classes, args.k, backend=backend,
                                 chunk_size=args.chunk_size, use_gpu=device.type == "cuda"), device)
        top1 = (scores[backend].argmax(1).cpu() == query_labels).float().mean().item() * 100
        rows.append((f"kNN {backend}, {what}", seconds, f"{args.queries / seconds:,.0f} queries/s", _mib(peak),
                     f"top-1 {top1:.2f}"))
    same = (scores["faiss"].argmax(1).cpu() == scores["torch"].argmax(1).cpu()).float().mean().item() * 100
    diff = ((scores["faiss"].cpu() - scores["torch"].cpu()).abs().max() / scores["torch"].abs().max()).item()
    rows[-1] = rows[-1][:4] + (rows[-1][4] + f"; same top-1 as faiss on {same:.2f}% of queries, "
                               f"max score difference {diff:.1e} (relative)",)
    del bank, queries, scores

    model = build_resnet("resnet18", stem=args.stem)
    model.fc = torch.nn.Identity()
    model = model.to(device)
    images = TensorDataset(torch.randn(args.extract_images, 3, 32, 32),
                           torch.randint(0, args.classes, (args.extract_images,)))
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    extract_features(model, TensorDataset(images.tensors[0][:8], images.tensors[1][:8]), 8, device,
                     autocast_dtype=autocast_dtype)  # warm-up
    (features, _), seconds, peak = _measure(
        lambda: extract_features(model, images, args.batch_size, device, autocast_dtype=autocast_dtype), device)
    rows.append((f"extract_features, ResNet-18 ({args.stem} stem), {args.extract_images:,} images 32x32, "
                 f"batch {args.batch_size}", seconds, f"{args.extract_images / seconds:,.0f} images/s", _mib(peak),
                 f"features {tuple(features.shape)}, {'bf16 autocast' if autocast_dtype else 'fp32'}"))

    import faiss

    name = device_name(device)
    print(f"command: `{shlex.join(['python'] + sys.argv)}`  ")
    print(f"device: {device.type} ({name}); torch {torch.__version__}; faiss {faiss.__version__}; "
          f"date {datetime.date.today().isoformat()}")
    print()
    print_table(["what", "time (s)", "throughput", "peak memory", "notes"],
                [(what, f"{seconds:,.2f}", speed, memory, notes) for what, seconds, speed, memory, notes in rows],
                align="lrrrl")


if __name__ == "__main__":
    main()
