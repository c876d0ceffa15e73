"""Training-step throughput: plain MoCo-v2 ResNet-18, the ResNet-50 teacher forward alone,
MoCo-v2 + MGD ResNet-18 <- ResNet-50, and each embedding loss (CCKD, DisCo, SEED) alone and
all with MGD; what each adds beyond the teacher's forward.

Synthetic images (no data loading), one process, the step of main_moco_mgd.py
(``moco_mgd.training.engine.training_step``).
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
from concurrent.futures import ProcessPoolExecutor

import torch


from moco_mgd.models.resnet import build_resnet
from moco_mgd.losses.mgd_distiller import MGDistiller
from moco_mgd.training.matching import collect_matching_costs
from moco_mgd.losses.embedding import EmbeddingDistiller
from moco_mgd.training.distillation import Distillation, PretrainModel
from moco_mgd.training.engine import training_step
from moco_mgd.models.moco import MoCo
from moco_mgd.reporting.timing import current_rss_bytes, device_name, measure, peak_rss_bytes, print_table

# (row name, MGD on, EmbeddingDistiller kwargs, student MLP hidden width): the training steps timed.
STEPS = {
    "moco": ("MoCo-v2 ResNet-18 train step", False, None, None),
    "mgd": ("MoCo-v2 + MGD ({reducer}) ResNet-18 <- ResNet-50 train step", True, None, None),
    "cckd": ("MoCo-v2 + CCKD (rbf-taylor, P=2)", False, {"cckd_weight": 1.0}, None),
    "disco": ("MoCo-v2 + DisCo (query view)", False, {"disco_weight": 1.0}, None),
    "disco2": ("MoCo-v2 + DisCo (both views, MLP hidden 2048)", False,
               {"disco_weight": 1.0, "disco_both_views": True}, 2048),
    "seed": ("MoCo-v2 + SEED (queue 4096)", False, {"seed_weight": 1.0, "seed_queue": 4096}, None),
    "bingo": ("MoCo-v2 + BINGO (member and CutMix views, queue 4096)", False,
              {"bingo_weight": 1.0, "bingo_queue": 4096}, None),
    "mgd+bingo": ("MoCo-v2 + MGD ({reducer}) + BINGO", True, {"bingo_weight": 1.0, "bingo_queue": 4096}, None),
    "mgd+all": ("MoCo-v2 + MGD ({reducer}) + CCKD + DisCo + SEED", True,
                {"cckd_weight": 1.0, "disco_weight": 1.0, "seed_weight": 1.0, "seed_queue": 4096}, None),
}
CONFIGS = ("moco", "teacher", *[name for name in STEPS if name != "moco"])


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--reducer", default="amp")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS,
                        help="what to time (moco and teacher are needed for the overhead lines)")
    return parser.parse_args()


def run_config(config: str, args: argparse.Namespace) -> tuple[str, float, float, int, int, int]:
    """Time one configuration in this (fresh) process: the training step of ``moco_mgd.training.engine``.

    Returns ``(row name, seconds per step, peak GPU GiB, peak RSS bytes, RSS bytes before the
    models, torch threads)``.
    """
    rss_start = current_rss_bytes()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else None
    memory_format = torch.channels_last if gpu else torch.contiguous_format
    b, s = args.batch_size, args.image_size
    torch.manual_seed(0)
    im_q = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=memory_format)
    im_k = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=memory_format)
    im_bag = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=memory_format)   # BINGO's member view

    def make_teacher(with_head: bool) -> torch.nn.Module:
        # Random weights: the cost does not depend on them. The MoCo-v2 head only where an
        # embedding loss reads it, as in training (MGD alone drops it).
        teacher = build_resnet("resnet50", num_classes=128)
        teacher.fc = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), teacher.fc) if with_head \
            else torch.nn.Identity()
        return teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)

    if config == "teacher":
        teacher = make_teacher(with_head=False)

        def teacher_step():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=gpu):
                teacher(im_q)

        seconds, peak_gpu = measure(teacher_step, device, args.warmup, args.iters)
        return ("ResNet-50 teacher forward (no grad)", seconds, peak_gpu, peak_rss_bytes(), rss_start,
                torch.get_num_threads())

    name, use_mgd, embedding, hidden = STEPS[config]
    model = MoCo("resnet18", 128, 4096, mlp=True, mlp_hidden_dim=hidden).to(device, memory_format=memory_format)
    teacher = None if config == "moco" else make_teacher(with_head=embedding is not None)
    mgd = embedding_losses = None
    if use_mgd:
        mgd = MGDistiller.from_models(teacher, model.encoder_q, reducer=args.reducer).to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=gpu):
            collect_matching_costs(mgd, model.encoder_q, teacher, [im_q])
        mgd.update_matching()
    if embedding:
        embedding_losses = EmbeddingDistiller(128, 128, **embedding).to(device)
    pretrain_model = PretrainModel(model, Distillation(teacher, mgd, embedding_losses))
    params = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if use_mgd:
        params.append({"params": list(mgd.parameters())})
    optimizer = torch.optim.SGD(params, 0.03, momentum=0.9, weight_decay=1e-4)
    model.train()

    def step():
        training_step(pretrain_model, optimizer, im_q, im_k, autocast_dtype=dtype, im_bag=im_bag)   # unused without BINGO

    seconds, peak_gpu = measure(step, device, args.warmup, args.iters)
    return name.format(reducer=args.reducer), seconds, peak_gpu, peak_rss_bytes(), rss_start, torch.get_num_threads()


def main() -> None:
    args = _parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    b, s = args.batch_size, args.image_size
    rows = []
    spawn = multiprocessing.get_context("spawn")  # fresh process: its peak RSS is this configuration's
    for config in args.configs:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            rows.append(pool.submit(run_config, config, args).result())
    threads = rows[0][5]

    name = device_name(device, threads)
    print(f"device: {device.type} ({name}); torch {torch.__version__}; {s} px; batch {b}; "
          f"{'bf16 autocast, channels_last' if gpu else 'fp32'}; median of {args.iters}; "
          f"each configuration in a fresh process")
    print_table(["step", "ms", "images/s", "peak GPU memory (GiB)", "peak host RSS (MiB) (+ growth over imports)"],
                [(what, f"{1000 * seconds:,.1f}", f"{b / seconds:,.1f}", f"{peak:.2f}",
                  f"{rss_peak / 2**20:,.0f} (+{max(rss_peak - rss_start, 0) / 2**20:,.0f})")
                 for what, seconds, peak, rss_peak, rss_start, _ in rows])
    seconds = dict(zip(args.configs, (r[1] for r in rows)))
    if "moco" in seconds and "teacher" in seconds:
        plain, teacher_fwd = seconds["moco"], seconds["teacher"]
        print("\nOverhead beyond the plain MoCo step and the teacher's forward (what the distillation itself costs):")
        for config, (what, _, _, _) in STEPS.items():
            if config in seconds and config != "moco":
                overhead = seconds[config] - plain - teacher_fwd
                print(f"- {what.format(reducer=args.reducer)}: {1000 * overhead:,.1f} ms per step "
                      f"= {100 * overhead / plain:.1f}% of the plain MoCo step")


if __name__ == "__main__":
    main()
