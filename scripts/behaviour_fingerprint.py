#!/usr/bin/env python
"""SHA-256 of the final weights of two short fixed-seed CPU runs: the refactoring guard of issue 15.

MoCo-v2 + MGD-AMP + DisCo (both views), the same flags in one process and in 2 gloo processes,
on a small synthetic image folder and a randomly initialised ResNet-50 teacher in MoCo's
checkpoint layout. Only torch, torchvision, PIL and ``main_moco_mgd.py``'s command line are used,
so the script means the same before and after a change inside the package. A behaviour-preserving
change prints the same digests.

    python scripts/behaviour_fingerprint.py [--work-dir /tmp/fingerprint] [--json out.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

FLAGS = ["-a", "resnet18", "--teacher-arch", "resnet50", "--epochs", "2", "-b", "16", "--lr", "0.03",
         "--moco-k", "64", "--moco-m", "0.99", "--moco-t", "0.2", "--mlp", "--aug-plus", "--cos",
         "--image-size", "32", "--seed", "0", "-j", "0", "-p", "2", "--amp", "off",
         "--mgd-reducer", "amp", "--mgd-loss-factor", "100", "--mgd-schedule", "every:1", "--mgd-samples", "32",
         "--disco-weight", "1", "--disco-both-views", "--knn-freq", "2", "--knn-k", "5", "--knn-t", "0.1"]


def make_images(root: Path) -> None:
    """2 classes x 24 train and 8 val images, 36 px, from a fixed numpy seed."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 24), ("val", 8)):
        for label in range(2):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)
                pixels[..., label] //= 2  # a class signal the kNN monitor can find
                Image.fromarray(pixels).save(folder / f"{i}.png")


def make_teacher(path: Path) -> None:
    """A ResNet-50 with the MoCo-v2 head in the official checkpoint layout, non-trivial BNs."""
    torch.manual_seed(0)
    encoder = torchvision.models.resnet50(num_classes=128)
    encoder.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), encoder.fc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.2 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    state = {f"module.encoder_q.{k}": v for k, v in encoder.state_dict().items()}
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state}, path)


def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        if isinstance(value, torch.Tensor):
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(name: str, work: Path, extra: list[str]) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "main_moco_mgd.py"), str(work / "images"), *FLAGS,
           "--teacher-checkpoint", str(work / "teacher.pth"), "--output-dir", str(out), *extra]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    final = sorted(out.glob("checkpoint_*.pth.tar"))[-1]
    state = torch.load(final, map_location="cpu", weights_only=False)
    parts = {"state_dict": digest(state["state_dict"]), "mgd": digest(state["mgd"]),
             "embedding": digest(state["embedding"] or {})}
    return {"checkpoint": final.name, "sha256": parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="/tmp/moco_mgd_fingerprint")
    parser.add_argument("--json", default="", help="also write the digests here")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "images").exists():
        make_images(work / "images")
    make_teacher(work / "teacher.pth")
    port = 29500 + (hash(str(work)) % 1000)
    result = {
        "one_process": run("one_process", work, []),
        "two_gloo_processes": run("two_gloo_processes", work, [
            "--multiprocessing-distributed", "--nproc-per-node", "2", "--world-size", "1", "--rank", "0",
            "--dist-url", f"tcp://127.0.0.1:{port}", "--dist-backend", "gloo"]),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
