"""Small builders shared by the tests: checkpoints on disk, a real process group, mounts."""
from __future__ import annotations

import gzip
import os
import struct
import subprocess
from contextlib import contextmanager
from typing import NoReturn

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from moco_mgd.models.resnet import build_resnet
from moco_mgd.runtime.launch import free_local_port


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give every BN non-default affine weights and running stats, as a trained net has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.2 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model


def moco_v2_checkpoint(arch: str = "resnet50", mlp: bool = True, seed: int = 0, dim: int = 128,
                       queue_size: int = 64) -> tuple[dict, nn.Module]:
    """A checkpoint in the official MoCo layout, and the query encoder it holds.

    Like ``moco_v2_200ep_pretrain.pth.tar``: ``module.encoder_q.*`` (with the MLP head
    ``fc.0``/``fc.2`` when ``mlp``), ``module.encoder_k.*`` with *different* weights, the
    queue, ``arch``, ``epoch`` and an ``optimizer`` entry.
    """
    torch.manual_seed(seed)
    encoder_q = randomize_bn(build_resnet(arch, num_classes=dim), seed)
    encoder_k = randomize_bn(build_resnet(arch, num_classes=dim), seed + 1)
    if mlp:
        for enc in (encoder_q, encoder_k):
            hidden = enc.fc.weight.shape[1]
            enc.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), enc.fc)
    state = {f"module.encoder_q.{k}": v for k, v in encoder_q.state_dict().items()}
    state.update({f"module.encoder_k.{k}": v for k, v in encoder_k.state_dict().items()})
    state["module.queue"] = nn.functional.normalize(torch.randn(dim, queue_size), dim=0)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    checkpoint = {"epoch": 200, "arch": arch, "state_dict": state,
                  "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0]}]}}
    return checkpoint, encoder_q


free_port = free_local_port


def _worker(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes of a gloo group.

    ``fn`` must be a module-level function; it reports results through files.
    """
    mp.spawn(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def make_image_folder(root, splits=("train",), classes=2, per_class=8, size=40, seed=0):
    """ImageNet-style folders ``root/SPLIT/CLASS/*.png`` of small random images.

    Each class has its own mean colour, so a classifier can tell them apart.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    bases = rng.integers(0, 256, size=(classes, 3))  # one colour per class, the same in every split
    for split in splits:
        for c, base in enumerate(bases):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                pixels = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"img{i}.png"))
    return root


def write_idx(path, magic, array, gz):
    payload = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape) + array.tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)


def write_fashion_mnist(root, prefix="train", n=5, gz=True, seed=0, structured=False):
    """IDX files as Fashion-MNIST ships them; returns the images and labels written.

    ``structured``: class ``c`` is a bright bar at row ``2c + 4`` on noise, so that features
    of even a random network classify above chance; otherwise pure noise.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    images = rng.integers(0, 256 if not structured else 80, size=(n, 28, 28), dtype=np.uint8)
    if structured:
        for image, label in zip(images, labels):
            image[2 * label + 4: 2 * label + 7, 3:25] = 255
    ext = ".gz" if gz else ""
    os.makedirs(root, exist_ok=True)
    write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte{ext}"), 2051, images, gz)
    write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte{ext}"), 2049, labels, gz)
    return images, labels


def cannot_run_here(reason: str) -> NoReturn:
    """Skip a test that this machine cannot run, saying why; under CI (``CI`` set) fail instead:
    CI must run every test, and a skip there would hide that it no longer does."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so this test must run, but: {reason}", pytrace=False)
    pytest.skip(reason)


@contextmanager
def tmpfs_mounted(directory, options: str):
    """A tmpfs mounted with ``options`` (``size=2m``, ``ro``, ...) on ``directory`` for the block.

    Root can do it, in CI too; elsewhere the test is skipped (see :func:`cannot_run_here`).
    """
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                                capture_output=True, text=True, timeout=30)
        reason = result.stderr.strip() or f"exit code {result.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        result, reason = None, str(exc)
    if result is None or result.returncode != 0:
        cannot_run_here(f"mounting a tmpfs is not allowed here: {reason}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True, timeout=30)
