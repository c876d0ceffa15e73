#!/usr/bin/env python
"""The GPU acceptance run in one call: versions, step throughput and memory, MGD's overhead, kNN
search, an end-to-end pretrain with resume and a linear evaluation; a JSON report and a markdown table.

    python scripts/gpu_acceptance.py --output-dir gpu_report          # on a GPU: 224 px, batch 256, 1.28M kNN bank
    python scripts/gpu_acceptance.py --size tiny --output-dir /tmp/r  # anywhere (CI runs it on CPU)

On a GPU the steps run as training does: bf16 autocast and channels_last. Writes
``OUTPUT_DIR/gpu_report.json`` and ``OUTPUT_DIR/gpu_report.md``; every section that fails is
recorded with its error and the run goes on, so one call always gives a whole report (the exit
code is 1 if any section failed).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from moco_mgd.evaluation.knn import knn_classify
from moco_mgd.losses.embedding import EmbeddingDistiller
from moco_mgd.losses.mgd_distiller import MGDistiller
from moco_mgd.training.matching import collect_matching_costs
from moco_mgd.models.moco import MoCo
from moco_mgd.models.resnet import build_resnet
from moco_mgd.training.distillation import Distillation, PretrainModel
from moco_mgd.reporting.timing import measure, sync
from moco_mgd.training.engine import training_step

ROOT = Path(__file__).resolve().parent.parent

# Dense bf16 tensor-core peaks (NVIDIA datasheets), for the step's fraction of the FLOP bound.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12,
                   "H100 NVL": 835e12, "A100": 312e12}

SIZES = {  # image px, batch, timed steps, kNN bank, kNN dim, kNN queries, end-to-end images
    "full": dict(image_size=224, batch_size=256, iters=10, bank=1_281_167, dim=512, queries=50_000, e2e_images=512),
    "tiny": dict(image_size=32, batch_size=8, iters=2, bank=4096, dim=128, queries=256, e2e_images=32),
}
STEPS = {  # name: (MGD on, embedding-loss weights)
    "MoCo-v2 R18": (False, None),
    "MoCo-v2 + MGD-AMP": (True, None),
    "MoCo-v2 + MGD + DisCo + SEED": (True, {"disco_weight": 1.0, "seed_weight": 1.0, "seed_queue": 4096}),
    "MoCo-v2 + MGD + BINGO": (True, {"bingo_weight": 1.0, "bingo_queue": 4096}),
}


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def versions(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    import torchvision

    info["torchvision"] = torchvision.__version__
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_gpus"] = faiss.get_num_gpus()
    except ImportError as exc:
        info["faiss"] = f"not importable: {exc}"
    info["torch_sees_gpu"] = torch.cuda.is_available()
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    # faiss-gpu links the CUDA 12 runtime, torch its own: both in this one process, both on the GPU?
    info["faiss_and_torch_share_the_gpu"] = bool(info["torch_sees_gpu"] and info.get("faiss_gpus", 0) > 0)
    return info


def _teacher(device, memory_format, with_head: bool) -> nn.Module:
    teacher = build_resnet("resnet50", num_classes=128)
    teacher.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), teacher.fc) if with_head else nn.Identity()
    return teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)


def step_benchmarks(device: torch.device, size: dict) -> dict:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else None
    memory_format = torch.channels_last if gpu else torch.contiguous_format
    b, s = size["batch_size"], size["image_size"]
    torch.manual_seed(0)
    im_q = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=memory_format)
    im_k = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=memory_format)
    im_bag = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=memory_format)   # BINGO's member view
    rows = {}

    teacher = _teacher(device, memory_format, with_head=False)

    def teacher_forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=gpu):
            teacher(im_q)
    seconds, peak = measure(teacher_forward, device, warmup=2, iters=size["iters"])
    rows["R50 teacher forward"] = {"seconds": seconds, "images_per_s": b / seconds, "peak_gib": peak,
                                   "flops": flops_of(teacher_forward)}
    for name, (use_mgd, embedding) in STEPS.items():
        moco = MoCo("resnet18", 128, 64 * b, m=0.999, T=0.2, mlp=True).to(device, memory_format=memory_format)
        mgd = embedding_losses = None
        step_teacher = None
        if use_mgd or embedding:
            step_teacher = _teacher(device, memory_format, with_head=embedding is not None)
        if use_mgd:
            mgd = MGDistiller.from_models(step_teacher, moco.encoder_q, loss_factor=1e4).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=gpu):
                collect_matching_costs(mgd, moco.encoder_q, step_teacher, [im_q])
            mgd.update_matching()
        if embedding:
            embedding_losses = EmbeddingDistiller(128, 128, **embedding).to(device)
        distillation = Distillation(step_teacher, mgd, embedding_losses)
        model = PretrainModel(moco, distillation)
        params = [p for p in moco.parameters() if p.requires_grad] + list(distillation.parameters())
        optimizer = torch.optim.SGD(params, 0.03, momentum=0.9, weight_decay=1e-4)

        def step():
            training_step(model, optimizer, im_q, im_k, autocast_dtype=dtype, im_bag=im_bag)   # unused without BINGO
        seconds, peak = measure(step, device, warmup=2, iters=size["iters"])
        rows[name] = {"seconds": seconds, "images_per_s": b / seconds, "peak_gib": peak, "flops": flops_of(step)}
    plain, teacher_s = rows["MoCo-v2 R18"]["seconds"], rows["R50 teacher forward"]["seconds"]
    overhead = (rows["MoCo-v2 + MGD-AMP"]["seconds"] - plain - teacher_s) / plain
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if gpu and k in torch.cuda.get_device_name(device)), None)
    for row in rows.values():
        row["flop_fraction"] = row["flops"] / row["seconds"] / peak_flops if peak_flops else None
    return {"image_size": s, "batch_size": b, "autocast": str(dtype), "channels_last": gpu, "rows": rows,
            "mgd_overhead_ratio": overhead, "peak_bf16_flops": peak_flops}


def knn_benchmark(device: torch.device, size: dict) -> dict:
    generator = torch.Generator().manual_seed(0)
    classes = 100
    centres = torch.nn.functional.normalize(torch.randn(classes, size["dim"], generator=generator), dim=1)
    bank_labels = torch.randint(0, classes, (size["bank"],), generator=generator)
    query_labels = torch.randint(0, classes, (size["queries"],), generator=generator)
    noise = 0.5 / size["dim"] ** 0.5  # a noise vector of norm ~0.5 around unit centres: a sane top-1
    bank = centres[bank_labels] + noise * torch.randn(size["bank"], size["dim"], generator=generator)
    queries = centres[query_labels] + noise * torch.randn(size["queries"], size["dim"], generator=generator)
    bank, queries = bank.to(device), queries.to(device)
    result = {"bank": size["bank"], "dim": size["dim"], "queries": size["queries"], "k": 20}
    for backend in ("faiss", "torch"):
        def search():
            return knn_classify(bank, bank_labels.to(device), queries, classes, 20, 0.07, backend,
                                use_gpu=device.type == "cuda")
        scores = search()
        sync(device)
        start = time.perf_counter()
        scores = search()
        sync(device)
        seconds = time.perf_counter() - start
        top1 = float((scores.argmax(1).cpu() == query_labels).float().mean() * 100)
        result[backend] = {"seconds": seconds, "queries_per_s": size["queries"] / seconds, "top1": top1}
    return result


def _image_folder(root: Path, images: int) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", max(images // 4, 8))):
        for label in range(2):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count // 2):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                pixels[..., label] //= 2
                Image.fromarray(pixels).save(folder / f"{i}.png")


def end_to_end(work: Path, device: torch.device, size: dict) -> dict:
    """Pretrain 1 epoch, resume to 2, then 1 epoch of main_lincls.py: real entry points, subprocesses."""
    data, out = work / "data", work / "pretrain"
    _image_folder(data, size["e2e_images"])
    teacher = build_resnet("resnet50")
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in teacher.state_dict().items()}},
               work / "teacher.pth")
    batch, workers = (32, "4") if device.type == "cuda" else (8, "0")
    common = [str(data), "-a", "resnet18", "-b", str(batch), "--moco-k", str(batch * 4), "--mlp", "--aug-plus",
              "--cos", "--image-size", "32", "-j", workers, "--seed", "0", "--teacher-checkpoint",
              str(work / "teacher.pth"), "--mgd-schedule", "every:1", "--mgd-samples", "64",
              "--mgd-loss-factor", "100", "--output-dir", str(out), "-p", "1"]
    runs = {}
    for epochs in (1, 2):  # the second call resumes from the first's checkpoint
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "main_moco_mgd.py"), *common, "--epochs", str(epochs)],
                              capture_output=True, text=True, cwd=ROOT)
        runs[f"pretrain_to_epoch_{epochs}"] = {"returncode": proc.returncode, "seconds": time.perf_counter() - start,
                                               "tail": (proc.stdout + proc.stderr)[-1500:]}
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    runs["resumed"] = "resumed from" in log
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "main_lincls.py"), str(data), "-a", "resnet18", "--pretrained",
                           str(out / "checkpoint_0001.pth.tar"), "--epochs", "1", "-b", str(batch), "--lr", "5",
                           "--image-size", "32", "-j", workers, "--output-dir", str(work / "lincls")],
                          capture_output=True, text=True, cwd=ROOT)
    runs["lincls_1_epoch"] = {"returncode": proc.returncode, "seconds": time.perf_counter() - start,
                              "tail": (proc.stdout + proc.stderr)[-1500:]}
    runs["ok"] = runs["resumed"] and all(r["returncode"] == 0 for k, r in runs.items() if isinstance(r, dict))
    return runs


def markdown(report: dict) -> str:
    v = report["versions"]
    lines = [f"# GPU acceptance report ({report['size']}, {report['date']})", "",
             f"device {v['device']}; torch {v['torch']} (CUDA {v['torch_cuda']}), torchvision {v['torchvision']}, "
             f"faiss {v.get('faiss')} ({v.get('faiss_gpus', 0)} GPU(s)); faiss and torch share the GPU: "
             f"{v['faiss_and_torch_share_the_gpu']}; {v.get('nvidia_smi', 'no nvidia-smi')}", ""]
    steps = report.get("steps")
    if isinstance(steps, dict) and "rows" in steps:
        lines += [f"Steps at {steps['image_size']} px, batch {steps['batch_size']}, autocast {steps['autocast']}, "
                  f"channels_last {steps['channels_last']}:", "",
                  "| what | ms / step | images/s | peak GPU GiB | GFLOPs / step | fraction of bf16 peak |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, row in steps["rows"].items():
            fraction = f"{row['flop_fraction']:.1%}" if row["flop_fraction"] is not None else "n/a"
            lines.append(f"| {name} | {row['seconds'] * 1e3:.1f} | {row['images_per_s']:.0f} | {row['peak_gib']:.2f} "
                         f"| {row['flops'] / 1e9:.1f} | {fraction} |")
        lines += ["", f"MGD's own overhead (MoCo+MGD - MoCo - teacher forward) / MoCo: "
                      f"{steps['mgd_overhead_ratio']:.1%}", ""]
    knn = report.get("knn")
    if isinstance(knn, dict) and "faiss" in knn:
        lines += [f"kNN, {knn['bank']:,} x {knn['dim']} bank, {knn['queries']:,} queries, k={knn['k']}: "
                  + "; ".join(f"{b} {knn[b]['seconds']:.2f} s ({knn[b]['queries_per_s']:,.0f} queries/s, "
                              f"top-1 {knn[b]['top1']:.2f})" for b in ("faiss", "torch")), ""]
    e2e = report.get("end_to_end")
    if isinstance(e2e, dict) and "ok" in e2e:
        lines += [f"End to end: pretrain 1 epoch + resume to 2 + 1-epoch lincls: {'ok' if e2e['ok'] else 'FAILED'} "
                  f"({sum(r['seconds'] for r in e2e.values() if isinstance(r, dict)):.0f} s)", ""]
    for section, error in report["errors"].items():
        lines += [f"**{section} failed:** `{error.splitlines()[-1]}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="full" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", default="gpu_report")
    args = parser.parse_args(argv)
    device, size = torch.device(args.device), SIZES[args.size]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"size": args.size, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "errors": {}}
    report["versions"] = versions(device)
    sections = {"steps": lambda: step_benchmarks(device, size), "knn": lambda: knn_benchmark(device, size),
                "end_to_end": lambda: end_to_end(out / "work", device, size)}
    for name, run in sections.items():
        start = time.perf_counter()
        try:
            report[name] = run()
        except Exception:  # noqa: BLE001 - a failed section is part of the report, the others still run
            report["errors"][name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - start:.1f} s{' FAILED' if name in report['errors'] else ''}",
              flush=True)
    if isinstance(report.get("end_to_end"), dict) and not report["end_to_end"].get("ok"):
        report["errors"]["end_to_end"] = "a run failed or did not resume: see end_to_end in gpu_report.json"
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_report.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
