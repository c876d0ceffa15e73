"""A training step never reads a tensor back to the host; the epoch reads only every -p steps.

Every host read of a tensor's value (``.item()``, ``float(t)``, ``int(t)``, ``if t:``, ``.tolist()``)
goes through one of the ATen ops counted here, on CPU as on CUDA, so counting them under a
dispatch mode is the CPU-side proof of what ``torch.cuda.set_sync_debug_mode`` checks on a GPU.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moco_mgd.losses.embedding import EmbeddingDistiller
from moco_mgd.losses.mgd_distiller import MGDistiller
from moco_mgd.training.matching import collect_matching_costs
from moco_mgd.models.moco import MoCo
from moco_mgd.models.resnet import build_resnet
from moco_mgd.training.distillation import Distillation, PretrainModel
from moco_mgd.training.engine import NonFiniteLossError, train_one_epoch, training_step
from tests.helpers import randomize_bn

READS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::equal"}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in READS:
            self.reads.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _setup(loss_factor=100.0):
    torch.manual_seed(0)
    teacher = randomize_bn(build_resnet("resnet18", num_classes=16), 0).eval().requires_grad_(False)
    moco = MoCo("resnet18", dim=16, K=32, m=0.99, T=0.2, mlp=True)
    mgd = MGDistiller.from_models(teacher, moco.encoder_q, loss_factor=loss_factor)
    images = torch.randn(8, 3, 32, 32)
    collect_matching_costs(mgd, moco.encoder_q, teacher, [images])
    mgd.update_matching()
    embedding = EmbeddingDistiller(16, 16, disco_weight=1.0, seed_weight=1.0, seed_queue=32)
    model = PretrainModel(moco, Distillation(teacher, mgd, embedding))
    params = [p for p in moco.parameters() if p.requires_grad] + list(mgd.parameters())
    optimizer = torch.optim.SGD(params, 0.03, momentum=0.9)
    return model, optimizer


def test_a_training_step_with_mgd_and_embedding_losses_reads_nothing_back():
    model, optimizer = _setup()
    im_q, im_k = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    training_step(model, optimizer, im_q, im_k)  # warm-up: lazy state of the optimizer
    with HostReads() as mode:
        training_step(model, optimizer, im_q, im_k)
    assert mode.reads == []


@pytest.mark.parametrize("print_freq", [0, 3])
def test_an_epoch_reads_back_once_per_print_and_once_at_the_end(print_freq):
    model, optimizer = _setup()
    batches = [((torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)), None) for _ in range(7)]
    with HostReads() as mode:
        means = train_one_epoch(model, optimizer, batches, 0, torch.device("cpu"), print_freq=print_freq)
    prints = len([i for i in range(7) if print_freq and (i % print_freq == 0 or i == 6)])  # iterations 0, 3, 6
    reads_per_read_back = len(mode.reads) / (prints + 1)
    assert reads_per_read_back == int(reads_per_read_back) and len(mode.reads) <= (prints + 1) * 50
    if print_freq:
        with HostReads() as mode0:
            train_one_epoch(model, optimizer, batches, 1, torch.device("cpu"), print_freq=0)
        assert len(mode.reads) == (prints + 1) * len(mode0.reads)
    assert {"loss", "infonce", "mgd", "mgd_layer4", "disco", "seed", "inst_acc"} <= means.keys()


def test_a_non_finite_loss_is_caught_at_the_next_read_and_names_its_first_iteration():
    model, optimizer = _setup(loss_factor=1e-45)   # MGD's loss overflows to inf
    batches = [((torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)), None) for _ in range(4)]
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 2 iteration 0: InfoNCE .*MGD inf"):
        train_one_epoch(model, optimizer, batches, 2, torch.device("cpu"), print_freq=0)
