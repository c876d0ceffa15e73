"""Training-step throughput: plain MoCo-v2 ResNet-18, the ResNet-50 teacher forward alone,
and MoCo-v2 + MGD ResNet-18 <- ResNet-50; the MGD overhead beyond the teacher's forward.

Synthetic images (no data loading), one process, the same step as main_moco_mgd.py.
Prints a markdown table. Usage::

    python benchmarks/bench_pretrain.py                                   # CPU, 64 px, batch 16
    python benchmarks/bench_pretrain.py --device cuda --image-size 224 --batch-size 256

On GPU it runs under bf16 autocast with channels_last (as the training script does) and
reports peak GPU memory (``torch.cuda.max_memory_allocated`` over the timed steps).

Each configuration runs in its own fresh child process (spawned), so the peak host memory
is that configuration's alone: the child's peak resident set size (``getrusage`` max RSS,
which includes Python, torch and the CUDA context) and, in brackets, its growth over the
RSS the child had after its imports, before building the models.
"""
from __future__ import annotations

import argparse
import multiprocessing
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moco_mgd.backbone import build_resnet  # noqa: E402
from moco_mgd.distiller import MGDistiller  # noqa: E402
from moco_mgd.engine import MGDTraining  # noqa: E402
from moco_mgd.moco import MoCo  # noqa: E402
from moco_mgd.taps import FeatureTaps  # noqa: E402
from timing import current_rss_bytes, measure, peak_rss_bytes  # noqa: E402

CONFIGS = ("moco", "teacher", "mgd")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--reducer", default="amp")
    return parser.parse_args()


def run_config(config: str, args: argparse.Namespace) -> tuple[str, float, float, int, int, int]:
    """Time one configuration in this (fresh) process.

    Returns ``(row name, seconds per step, peak GPU GiB, peak RSS bytes, RSS bytes before the
    models, torch threads)``.
    """
    rss_start = current_rss_bytes()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else None
    memory_format = torch.channels_last if gpu else torch.contiguous_format
    torch.manual_seed(0)
    b, s = args.batch_size, args.image_size
    im_q = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=memory_format)
    im_k = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=memory_format)
    criterion = torch.nn.CrossEntropyLoss()

    def make_moco():
        model = MoCo("resnet18", 128, 4096, mlp=True).to(device, memory_format=memory_format)
        return model, torch.optim.SGD(model.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)

    def make_teacher():
        teacher = build_resnet("resnet50").to(device, memory_format=memory_format).eval().requires_grad_(False)
        teacher.fc = torch.nn.Identity()
        return teacher

    if config == "moco":
        model, optimizer = make_moco()

        def moco_step():
            with torch.autocast(device.type, dtype=dtype, enabled=gpu):
                logits, labels = model(im_q, im_k)
                loss = criterion(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        name, step = "MoCo-v2 ResNet-18 train step", moco_step
    elif config == "teacher":
        teacher = make_teacher()

        def teacher_step():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=gpu):
                teacher(im_q)

        name, step = "ResNet-50 teacher forward (no grad)", teacher_step
    elif config == "mgd":
        teacher = make_teacher()
        model, optimizer = make_moco()
        teacher_taps = FeatureTaps(teacher)
        distiller = MGDistiller.from_models(teacher, model.encoder_q, reducer=args.reducer).to(device)
        mgd = MGDTraining(distiller, FeatureTaps(model.encoder_q), teacher, teacher_taps)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=gpu):
            model.eval()
            distiller.accumulate(mgd.student_taps(im_q), teacher_taps(im_q))
            model.train()
        distiller.update_matching()
        optimizer.add_param_group({"params": list(distiller.parameters())})

        def mgd_step():
            with torch.autocast(device.type, dtype=dtype, enabled=gpu):
                logits, labels = model(im_q, im_k)
                loss = criterion(logits.float(), labels)
                with torch.no_grad():
                    teacher_feats = teacher_taps(im_q)
                mgd_loss, _ = distiller(mgd.student_taps.pop(), teacher_feats)
                loss = loss + mgd_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        name, step = f"MoCo-v2 + MGD ({args.reducer}) ResNet-18 <- ResNet-50 train step", mgd_step
    else:
        raise ValueError(f"unknown configuration {config!r}")
    seconds, peak_gpu = measure(step, device, args.warmup, args.iters)
    return name, seconds, peak_gpu, peak_rss_bytes(), rss_start, torch.get_num_threads()


def main() -> None:
    args = _parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    b, s = args.batch_size, args.image_size
    rows = []
    spawn = multiprocessing.get_context("spawn")  # fresh process: its peak RSS is this configuration's
    for config in CONFIGS:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            rows.append(pool.submit(run_config, config, args).result())
    threads = rows[0][5]

    name = torch.cuda.get_device_name(device) if gpu else f"{platform.machine()}, {threads} threads"
    print(f"device: {device.type} ({name}); torch {torch.__version__}; {s} px; batch {b}; "
          f"{'bf16 autocast, channels_last' if gpu else 'fp32'}; median of {args.iters}; "
          f"each configuration in a fresh process")
    print("| step | ms | images/s | peak GPU memory (GiB) | peak host RSS (MiB) (+ growth over imports) |")
    print("|---|---:|---:|---:|---:|")
    for what, seconds, peak, rss_peak, rss_start, _ in rows:
        print(f"| {what} | {1000 * seconds:,.1f} | {b / seconds:,.1f} | {peak:.2f} | "
              f"{rss_peak / 2**20:,.0f} (+{max(rss_peak - rss_start, 0) / 2**20:,.0f}) |")
    plain, teacher_fwd, with_mgd = (r[1] for r in rows)
    overhead = with_mgd - plain - teacher_fwd
    print(f"\nMGD overhead beyond the teacher forward: {1000 * overhead:,.1f} ms per step "
          f"= {100 * overhead / plain:.1f}% of the plain MoCo step")


if __name__ == "__main__":
    main()
