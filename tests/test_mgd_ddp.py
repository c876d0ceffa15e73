"""MGD under DDP: 2 gloo processes train the student as one process on the global batch would.

MGD's student BNs are parameters of the one DDP-wrapped PretrainModel, so DDP must average
their gradients with the student's. The first test compares the gradients of the MGD loss
alone (MoCo's shuffle BN and queue make InfoNCE differ between 1 and 2 processes) with a
one-process reference on the whole batch; the second runs the real training_step on the
real PretrainModel and checks that both ranks end the step with the same trained MGD BNs.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from moco_mgd.losses.mgd_distiller import MGDistiller
from moco_mgd.training.matching import collect_matching_costs
from moco_mgd.models.moco import MoCo
from moco_mgd.models.resnet import build_resnet
from moco_mgd.models.stages import forward_with_stages
from moco_mgd.training.distillation import Distillation, PretrainModel
from moco_mgd.training.engine import training_step
from tests.helpers import randomize_bn, run_distributed

WORLD, PER_RANK, SIZE, DIM = 2, 4, 32, 16
GLOBAL = WORLD * PER_RANK


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _build(rank: int, world_size: int) -> tuple[MoCo, Distillation, PretrainModel]:
    """The same teacher, student and matched distiller on every rank (fixed seeds), as a run builds them
    (the default --mgd-loss-factor 1e4)."""
    torch.manual_seed(0)
    teacher = randomize_bn(build_resnet("resnet50", num_classes=DIM), seed=1).eval().requires_grad_(False)
    torch.manual_seed(1)
    moco = MoCo("resnet18", dim=DIM, K=2 * GLOBAL, mlp=True)
    randomize_bn(moco.encoder_q, seed=2)  # a student that is not at its init: BN weights differ per channel
    moco.encoder_k.load_state_dict(moco.encoder_q.state_dict())
    mgd = MGDistiller.from_models(teacher, moco.encoder_q)
    assert mgd.loss_factor == 1e4
    # Each rank matches on its own shard of the matching images; update_matching sums over ranks.
    match_images = _images(2 * GLOBAL, seed=3)
    shard = match_images.tensor_split(world_size)[rank]
    seen = collect_matching_costs(mgd, moco.encoder_q, teacher, [shard[:5], shard[5:]])
    reports = mgd.update_matching()
    assert seen == 2 * GLOBAL // world_size and reports[0].num_images == 2 * GLOBAL
    distillation = Distillation(teacher, mgd, match_epochs=[0])
    return moco, distillation, PretrainModel(moco, distillation)


class StudentMGDLoss(nn.Module):
    """The MGD loss of the student's stage features: the part of PretrainModel's forward MGD trains."""

    def __init__(self, encoder: nn.Module, mgd: MGDistiller):
        super().__init__()
        self.encoder = encoder
        self.mgd = mgd

    def forward(self, images: torch.Tensor, teacher_stages: list[torch.Tensor]) -> torch.Tensor:
        _, stages = forward_with_stages(self.encoder, images)
        return self.mgd(stages, teacher_stages)[0]


def _grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in module.named_parameters()}


def _mgd_gradient_worker(rank: int, world_size: int, out_dir: str) -> None:
    moco, distillation, pretrain_model = _build(rank, world_size)
    student = StudentMGDLoss(moco.encoder_q, pretrain_model.distillation.mgd)
    # Eval mode: BNs normalise with running statistics, so that a half batch and the whole
    # batch see the same per-image function (train-mode BN statistics are per rank).
    student.eval()
    reference = copy.deepcopy(student)   # one process, no DDP, the whole batch
    local = copy.deepcopy(student)       # this rank's half alone, without gradient averaging

    images = _images(GLOBAL, seed=4)     # the global batch, the same on every rank
    half = images.tensor_split(world_size)[rank]

    ddp = DistributedDataParallel(student, find_unused_parameters=True)  # the MLP head has no MGD gradient
    ddp_loss = ddp(half, distillation.teacher_targets(half, half).stages)
    ddp_loss.backward()

    local_loss = local(half, distillation.teacher_targets(half, half).stages)
    local_loss.backward()

    full_loss = reference(images, distillation.teacher_targets(images, images).stages)
    full_loss.backward()

    mean_loss = ddp_loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world_size
    torch.save({"world_size": dist.get_world_size(), "rank": dist.get_rank(),
                "ddp_loss": ddp_loss.detach(), "mean_loss": mean_loss, "full_loss": full_loss.detach(),
                "ddp": _grads(student), "reference": _grads(reference), "local": _grads(local)},
               f"{out_dir}/rank{rank}.pt")


def test_ddp_mgd_gradients_equal_one_process_on_the_global_batch(tmp_path):
    run_distributed(_mgd_gradient_worker, WORLD, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [r["world_size"] for r in results] == [WORLD] * WORLD
    assert [r["rank"] for r in results] == list(range(WORLD))

    # The MGD loss divides by the batch size: the mean of the half-batch losses is the full-batch loss,
    # so DDP's gradient average is the full-batch gradient.
    r0 = results[0]
    torch.testing.assert_close(r0["mean_loss"], r0["full_loss"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close((results[0]["ddp_loss"] + results[1]["ddp_loss"]) / 2, r0["full_loss"],
                               rtol=1e-6, atol=1e-7)
    assert not torch.allclose(results[0]["ddp_loss"], results[1]["ddp_loss"])  # the halves differ
    assert float(r0["full_loss"]) > 0

    names = list(r0["reference"])
    trained = [n for n in names if r0["reference"][n] is not None]
    # Every student backbone parameter and every MGD student BN weight and bias has an MGD gradient;
    # only the projection head (after the last stage) has none.
    assert {n for n in names if n not in trained} == {n for n in names if n.startswith("encoder.fc.")}
    mgd_bn = [n for n in names if n.startswith("mgd.student_bns.")]
    assert len(mgd_bn) == 8 and set(mgd_bn) <= set(trained)
    assert len([n for n in trained if n.startswith("encoder.")]) == len(list(build_resnet("resnet18").parameters())) - 2

    for result in results:
        assert result["ddp"].keys() == result["reference"].keys()
        for name in names:
            if name not in trained:
                assert result["ddp"][name] is None, name
                continue
            ddp, reference = result["ddp"][name], result["reference"][name]
            scale = reference.abs().max()
            assert scale > 0, name
            torch.testing.assert_close(ddp, reference, rtol=1e-6, atol=1e-7,
                                       msg=lambda m, name=name: f"{name}: {m}")
            # The same, independent of the loss's scale: float32 round-off of the batch sums only
            # (measured: at most 7.5e-7 of the largest entry).
            assert (ddp - reference).abs().max() <= 5e-6 * scale, name
    # Both ranks hold the same averaged gradient ...
    for name in trained:
        assert torch.equal(results[0]["ddp"][name], results[1]["ddp"][name]), name
    # ... which is not what either half alone gives (by far more than the tolerance above): the
    # comparison would catch a gradient that was not averaged over the ranks.
    for result in results:
        same = [n for n in trained
                if (result["local"][n] - result["reference"][n]).abs().max() <= 1e-4 * result["reference"][n].abs().max()]
        assert not same, same


def _training_step_worker(rank: int, world_size: int, out_dir: str) -> None:
    moco, distillation, pretrain_model = _build(rank, world_size)
    mgd = distillation.mgd
    initial = {n: p.detach().clone() for n, p in mgd.named_parameters()}
    # As the run builds it: MoCo's parameters, then the distillation losses' (MGD's student BNs).
    optimizer = torch.optim.SGD([{"params": [p for p in moco.parameters() if p.requires_grad]},
                                 {"params": list(pretrain_model.distillation.parameters())}],
                                lr=0.5, momentum=0.9, weight_decay=0.0)
    ddp = DistributedDataParallel(pretrain_model)
    ddp.train()
    im_q = _images(GLOBAL, seed=5).tensor_split(world_size)[rank]
    im_k = _images(GLOBAL, seed=6).tensor_split(world_size)[rank]
    out = training_step(ddp, optimizer, im_q, im_k)
    torch.save({"world_size": dist.get_world_size(), "mgd_loss": out.mgd, "loss": out.loss,
                "initial": initial, "after": {n: p.detach().clone() for n, p in mgd.named_parameters()},
                "mgd_grads": _grads(mgd),
                "student": {n: p.detach().clone() for n, p in moco.encoder_q.named_parameters()}},
               f"{out_dir}/rank{rank}.pt")


def test_one_ddp_training_step_trains_the_mgd_bns_identically_on_both_ranks(tmp_path):
    run_distributed(_training_step_worker, WORLD, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["world_size"] == r1["world_size"] == WORLD
    # Each rank computed MGD on its own half of the batch.
    assert torch.isfinite(r0["mgd_loss"]) and float(r0["mgd_loss"]) > 0 and float(r1["mgd_loss"]) > 0
    assert not torch.equal(r0["mgd_loss"], r1["mgd_loss"])

    names = list(r0["after"])
    assert sorted(names) == sorted(f"student_bns.{i}.{w}" for i in range(4) for w in ("weight", "bias"))
    for name in names:
        # Averaged by DDP: the same gradient, so the same step, on both ranks (a BN outside DDP
        # would get each rank's own half-batch gradient and the ranks would drift apart).
        assert r0["mgd_grads"][name] is not None and r0["mgd_grads"][name].abs().max() > 0, name
        assert torch.equal(r0["mgd_grads"][name], r1["mgd_grads"][name]), name
        assert torch.equal(r0["after"][name], r1["after"][name]), name
        # ... and trained (no weight decay: only a gradient moves them).
        assert torch.equal(r0["initial"][name], r1["initial"][name]), name
        assert not torch.allclose(r0["after"][name], r0["initial"][name]), name
    for name in r0["student"]:
        assert torch.equal(r0["student"][name], r1["student"][name]), name
