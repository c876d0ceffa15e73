"""MGD's own cost, side by side in one process: the ratio issue 17 asks for.

    overhead ratio = (MoCo+MGD step - plain MoCo step - teacher forward) / plain MoCo step

Five things are timed in interleaved rounds (each round runs each once, in a rotated order), so
that the machine's drift falls on all of them alike; the medians over the rounds give the ratio.
The fourth is MGD's own work timed directly: the student BNs, the reduction and the partial L2,
forward and backward, on one batch's real stage features. It is what the difference estimates,
without the difference's noise. The fifth is the MoCo+MGD step followed by reading every logged
value back to the host, as each step did before the losses stayed on the device: on a GPU, one
synchronisation per value and step.

    OMP_NUM_THREADS=1 python benchmarks/bench_mgd_overhead.py --image-size 64 --batch-size 16
    OMP_NUM_THREADS=1 python benchmarks/bench_mgd_overhead.py --image-size 224 --batch-size 4

The steps are those of main_moco_mgd.py (``moco_mgd.training.engine.training_step``) on synthetic
images, fp32 on CPU (bf16 autocast and channels_last on a GPU).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moco_mgd.losses.mgd_distiller import MGDistiller
from moco_mgd.training.matching import collect_matching_costs
from moco_mgd.models.moco import MoCo
from moco_mgd.models.resnet import build_resnet
from moco_mgd.models.stages import forward_with_stages
from moco_mgd.reporting.timing import sync
from moco_mgd.training.distillation import Distillation, PretrainModel
from moco_mgd.training.engine import training_step


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reducer", default="amp")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds timed (after 2 warm-up rounds)")
    parser.add_argument("--student", default="resnet18")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> dict:
    """The four timed calls, by name."""
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else None
    memory_format = torch.channels_last if gpu else torch.contiguous_format
    torch.manual_seed(0)
    im_q, im_k = (torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
                  .contiguous(memory_format=memory_format) for _ in range(2))
    teacher = build_resnet("resnet50", num_classes=128)
    teacher.fc = torch.nn.Identity()   # MGD alone drops the teacher's head, as in training
    teacher = teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)

    def moco_model() -> MoCo:
        torch.manual_seed(1)
        return MoCo(args.student, 128, 4096, mlp=True).to(device, memory_format=memory_format).train()

    def optimizer(*modules) -> torch.optim.Optimizer:
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        return torch.optim.SGD(params, 0.03, momentum=0.9, weight_decay=1e-4)

    plain = moco_model()
    plain_model, plain_opt = PretrainModel(plain), optimizer(plain)

    student = moco_model()
    mgd = MGDistiller.from_models(teacher, student.encoder_q, reducer=args.reducer).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=gpu):
        collect_matching_costs(mgd, student.encoder_q, teacher, [im_q])
    mgd.update_matching()
    mgd_model, mgd_opt = PretrainModel(student, Distillation(teacher, mgd)), optimizer(student, mgd)

    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=gpu):
        _, student_stages = forward_with_stages(student.encoder_q, im_q)
        _, teacher_stages = forward_with_stages(teacher, im_q)
    student_stages = [s.detach().clone().requires_grad_(True) for s in student_stages]

    def teacher_forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=gpu):
            forward_with_stages(teacher, im_q)

    def mgd_alone():
        with torch.autocast(device.type, dtype=dtype, enabled=gpu):
            loss, _ = mgd(student_stages, teacher_stages)
        loss.backward()

    def mgd_step():
        return training_step(mgd_model, mgd_opt, im_q, im_k, autocast_dtype=dtype)

    def mgd_step_read_back():
        # What every step did before issue 17: each logged value read to the host, one sync each.
        [value.item() for value in mgd_step().logged().values()]

    return {
        "plain MoCo-v2 step": lambda: training_step(plain_model, plain_opt, im_q, im_k, autocast_dtype=dtype),
        "teacher forward (stage features, no grad)": teacher_forward,
        "MoCo-v2 + MGD step": mgd_step,
        "MGD alone (student BNs + reduction + partial L2, fwd + bwd)": mgd_alone,
        "MoCo-v2 + MGD step, every logged value read back": mgd_step_read_back,
        "_device": device,
    }


def interleaved(calls: dict, device: torch.device, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    names = list(calls)
    times = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            start = time.perf_counter()
            calls[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict[str, float]:
    args = _parse_args(argv)
    calls = build(args)
    device = calls.pop("_device")
    times = interleaved(calls, device, args.rounds)
    median = {name: statistics.median(t) for name, t in times.items()}
    plain, teacher, step, alone, step_read_back = median.values()
    print(f"{args.device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {args.image_size} px, "
          f"batch {args.batch_size}, {args.student} <- resnet50, reducer {args.reducer}; median of {args.rounds} "
          f"interleaved rounds")
    print("| | ms (median) | ms (min) |\n|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {1000 * statistics.median(t):.1f} | {1000 * min(t):.1f} |")
    ratio = (step - plain - teacher) / plain
    print(f"\noverhead ratio (MoCo+MGD - MoCo - teacher) / MoCo = {100 * ratio:.1f}%; "
          f"MGD alone / MoCo = {100 * alone / plain:.1f}%")
    print(f"MoCo+MGD images/s: {args.batch_size / step:.2f} with no read-back in the step, "
          f"{args.batch_size / step_read_back:.2f} reading every logged value back each step")
    return {"ratio": ratio, "alone_ratio": alone / plain, **median}


if __name__ == "__main__":
    main()
