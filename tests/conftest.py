"""Fixtures shared by the end-to-end tests (each test module gets its own copy)."""
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the cores: one thread each, and for the processes the tests start
    # (unless the caller chose a number).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from tests.helpers import make_image_folder, moco_v2_checkpoint


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), splits=("train", "val"), per_class=8)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    checkpoint, _ = moco_v2_checkpoint("resnet50", mlp=True)
    path = tmp_path_factory.mktemp("teacher") / "moco_v2_200ep_pretrain.pth.tar"
    torch.save(checkpoint, path)
    return str(path)
