"""Fixtures shared by the end-to-end tests (each test module gets its own copy)."""
import logging
import os
import shutil

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the cores: one thread each, and for the processes the tests start
    # (unless the caller chose a number).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from tests.helpers import make_image_folder, moco_v2_checkpoint


@pytest.fixture(autouse=True)
def _plain_package_logger():
    """Each test starts and ends with the package logger as Python leaves it.

    The CLIs run in-process call setup_logging, which stops propagation (caplog would miss
    the records of later tests) and writes to the test's captured stdout, closed once that
    test ends (a later record would fail with "I/O operation on closed file").
    """
    logger = logging.getLogger("moco_mgd")

    def reset():
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
            if isinstance(handler, logging.FileHandler):
                handler.close()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)

    reset()
    yield
    reset()


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    """``module_dir(name)`` makes a directory that lives as long as the test module, then goes.

    The module fixtures' runs and teachers hold checkpoints of 100-700 MB; kept to the session's
    end, two workers' worth of them filled a CI disk.
    """
    made = []

    def make(name: str):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def data_dir(module_dir):
    return make_image_folder(str(module_dir("data")), splits=("train", "val"), per_class=8)


@pytest.fixture(scope="module")
def teacher_path(module_dir):
    checkpoint, _ = moco_v2_checkpoint("resnet50", mlp=True)
    path = module_dir("teacher") / "moco_v2_200ep_pretrain.pth.tar"
    torch.save(checkpoint, path)
    return str(path)
