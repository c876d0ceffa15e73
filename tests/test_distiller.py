import pytest
import torch

from moco_mgd.runtime import distributed

from moco_mgd.losses import mgd
from moco_mgd.models.resnet import build_resnet
from moco_mgd.losses.mgd_distiller import MGDistiller
from moco_mgd.training.matching import collect_matching_costs
from moco_mgd.models.stages import forward_with_stages
from tests.helpers import randomize_bn, run_distributed


def _pair(student_arch="resnet18", teacher_arch="resnet50", seed=0):
    torch.manual_seed(seed)
    teacher = randomize_bn(build_resnet(teacher_arch), seed).eval().requires_grad_(False)
    student = build_resnet(student_arch)
    return teacher, student


def _stages(network, x):
    return forward_with_stages(network, x)[1]


def _images(n, seed=1, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _matched(reducer="amp", **kwargs):
    teacher, student = _pair()
    distiller = MGDistiller.from_models(teacher, student, reducer=reducer, **kwargs)
    collect_matching_costs(distiller, student, teacher, _images(8).split(4))
    distiller.update_matching()
    return distiller, teacher, student


def test_matching_is_the_balanced_assignment_of_the_summed_costs():
    teacher, student = _pair()
    distiller = MGDistiller.from_models(teacher, student)
    batches = _images(8).split(4)
    assert collect_matching_costs(distiller, student, teacher, batches) == 8
    reports = distiller.update_matching()
    student.eval()
    with torch.no_grad():
        feats = [(_stages(student, b), _stages(teacher, b)) for b in batches]
    for i, assignment in enumerate(distiller.assignments()):
        cost = sum(mgd.channel_cost(s[i], t[i]).double() for s, t in feats)
        assert torch.equal(assignment, mgd.balanced_assignment(cost))
    assert [r.stage for r in reports] == ["layer1", "layer2", "layer3", "layer4"]
    assert all(0.0 <= r.cost <= 4.0 and r.num_images == 8 for r in reports)


def test_accumulated_costs_are_the_summed_channel_costs_and_a_copy():
    teacher, student = _pair()
    distiller = MGDistiller.from_models(teacher, student)
    batches = _images(8).split(4)
    collect_matching_costs(distiller, student, teacher, batches)
    costs = distiller.accumulated_costs()
    student.eval()  # as collect_matching_costs ran it
    with torch.no_grad():
        feats = [(_stages(student, b), _stages(teacher, b)) for b in batches]
    for i, cost in enumerate(costs):
        assert cost.dtype == torch.float64
        assert torch.equal(cost, sum(mgd.channel_cost(s[i], t[i]).double() for s, t in feats))
    costs[0].zero_()  # the caller's copy: the distiller's own totals stay
    reports = distiller.update_matching()
    assert reports[0].cost > 0
    with pytest.raises(RuntimeError, match="no matching statistics"):
        distiller.accumulated_costs()  # update_matching() starts a new round


def test_sparse_reducer_uses_one_to_one_matching():
    distiller, *_ = _matched(reducer="sm")
    for a, cs in zip(distiller.assignments(), distiller.student_channels):
        assert torch.bincount(a[a >= 0], minlength=cs).tolist() == [1] * cs


def test_a_second_update_on_the_same_images_changes_nothing():
    distiller, teacher, student = _matched()
    collect_matching_costs(distiller, student, teacher, _images(8).split(4))
    assert [r.changed for r in distiller.update_matching()] == [0, 0, 0, 0]
    assert int(distiller.num_matchings) == 2


def test_collect_respects_max_images_and_restores_train_mode():
    teacher, student = _pair()
    distiller = MGDistiller.from_models(teacher, student)
    student.train()
    assert collect_matching_costs(distiller, student, teacher, [(_images(4), None)] * 3, max_images=6) == 6
    assert student.training
    assert distiller.update_matching()[0].num_images == 6


def _reduced_by_hand(t, members, method, pick=None):
    """One student channel's target before the margin: its matched teacher channels ``members``
    (ascending) reduced at every image and position (section 3.3 of the paper)."""
    stacked = t[:, members]                                     # B x alpha x H x W
    if method == "sm":
        assert len(members) == 1
        return stacked[:, 0]
    if method == "max":
        return stacked.max(1).values
    if method == "avg":
        return stacked.sum(1) / len(members)
    if method == "amp":                                         # largest magnitude, sign kept; +v on a tie with -v
        largest = stacked.abs().max(1).values
        return torch.where((stacked == largest.unsqueeze(1)).any(1), largest, -largest)
    if method == "rd":                                          # the member drawn for each image and position
        return stacked.gather(1, pick.unsqueeze(1)).squeeze(1)
    raise AssertionError(method)


def _mgd_loss_by_hand(s_feats, t_feats, assignments, margins, bns, stage_weights, batch, loss_factor, method,
                      generator=None):
    """Eq. 3-5 of the paper written out channel by channel: BN (batch statistics), the teacher
    reduced onto each student channel, the mean margin of its group, the partial L2."""
    per_stage = []
    for s, t, assignment, margin, bn, weight in zip(s_feats, t_feats, assignments, margins, bns, stage_weights):
        b, cs, h, w = s.shape
        alpha = t.shape[1] // cs
        # Random drop draws one member per (image, channel, position), in this order, from the generator.
        picks = torch.randint(alpha, (b, cs, 1, h, w), generator=generator)[:, :, 0] if method == "rd" else None
        groups = [[] for _ in range(cs)]                        # each student channel's teacher channels, ascending
        for j, c in enumerate(assignment.tolist()):
            if c >= 0:
                groups[c].append(j)
        total = torch.zeros((), dtype=torch.float64)
        for c, members in enumerate(groups):
            x = s[:, c].double()
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + bn.eps) * bn.weight[c].double() + bn.bias[c].double()
            reduced = _reduced_by_hand(t.double(), members, method, picks[:, c] if picks is not None else None)
            target = torch.clamp(reduced, min=sum(margin[members].tolist()) / len(members))
            nothing_to_correct = (x <= target) & (target <= 0)
            total = total + torch.where(nothing_to_correct, 0.0, (target - x) ** 2).sum()
        per_stage.append(weight * total / (batch * loss_factor))
    return torch.stack(per_stage)


@pytest.mark.parametrize("reducer", ["amp", "max", "avg", "sm", "rd"])
def test_loss_is_the_weighted_partial_l2_of_the_reduced_teacher(reducer):
    distiller, teacher, student = _matched(reducer=reducer, loss_factor=100.0)
    x = _images(4, seed=5)
    student.train()
    s_feats = _stages(student, x)
    with torch.no_grad():
        t_feats = _stages(teacher, x)
    loss, per_stage = distiller(s_feats, t_feats, generator=torch.Generator().manual_seed(11))
    expected = _mgd_loss_by_hand([f.detach() for f in s_feats], t_feats, distiller.assignments(), distiller.margins(),
                                 distiller.student_bns, distiller.stage_weights, 4, 100.0, reducer,
                                 torch.Generator().manual_seed(11))
    torch.testing.assert_close(per_stage.double(), expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss.detach(), per_stage.sum())
    assert distiller.stage_weights == [1 / 8, 1 / 4, 1 / 2, 1.0]
    if reducer == "rd":   # the draw matters: another seed, another target
        _, other = distiller(s_feats, t_feats, generator=torch.Generator().manual_seed(12))
        assert (other - per_stage).abs().max() > 1e-3 * per_stage.abs().max()


def test_gradients_reach_the_student_and_its_bns_never_the_teacher():
    distiller, teacher, student = _matched()
    x = _images(4, seed=6)
    student.train()
    s_feats = _stages(student, x)
    with torch.no_grad():
        t_feats = _stages(teacher, x)
    loss, _ = distiller(s_feats, t_feats)
    loss.backward()
    assert student.layer4[-1].conv2.weight.grad.abs().sum() > 0
    assert student.conv1.weight.grad.abs().sum() > 0
    assert all(bn.weight.grad.abs().sum() > 0 for bn in distiller.student_bns)
    assert all(p.grad is None for p in teacher.parameters())


def test_state_dict_restores_assignments_margins_and_bns_exactly():
    distiller, teacher, student = _matched(reducer="rd")
    with torch.no_grad():
        for bn in distiller.student_bns:
            bn.weight.uniform_(0.5, 1.5)
    state = distiller.state_dict()
    restored = MGDistiller.from_models(build_resnet("resnet50"), build_resnet("resnet18"), reducer="rd")
    restored.load_state_dict(state)
    assert restored.is_matched
    for a, b in zip(distiller.assignments() + distiller.margins(), restored.assignments() + restored.margins()):
        assert torch.equal(a, b)
    x = _images(2, seed=7)
    with torch.no_grad():
        student.eval()
        s_feats, t_feats = _stages(student, x), _stages(teacher, x)
    losses = [d.eval()(s_feats, t_feats, generator=torch.Generator().manual_seed(3))[0]
              for d in (distiller, restored)]
    assert torch.equal(losses[0], losses[1])


def test_student_wider_than_teacher_is_refused():
    with pytest.raises(ValueError, match="stage layer1: the student has more channels than the teacher"):
        MGDistiller.from_models(build_resnet("resnet18"), build_resnet("resnet50"))


def test_unknown_reducer_is_refused():
    with pytest.raises(ValueError, match="unknown reduction method 'median'"):
        MGDistiller.from_models(build_resnet("resnet50"), build_resnet("resnet18"), reducer="median")


def test_update_before_any_image_is_refused():
    distiller = MGDistiller.from_models(build_resnet("resnet50"), build_resnet("resnet18"))
    with pytest.raises(RuntimeError, match="no matching statistics"):
        distiller.update_matching()


def test_loss_before_any_matching_is_refused():
    teacher, student = _pair()
    distiller = MGDistiller.from_models(teacher, student)
    x = _images(2)
    with pytest.raises(RuntimeError, match="no matching yet"):
        distiller(_stages(student, x), _stages(teacher, x))


def test_features_of_different_spatial_size_are_refused():
    teacher, student = _pair()
    distiller = MGDistiller.from_models(teacher, student)
    with torch.no_grad():
        student.eval()
        s_feats, t_feats = _stages(student, _images(2, size=32)), _stages(teacher, _images(2, size=64))
    with pytest.raises(ValueError, match="stage layer1: student features are \\(8, 8\\) but teacher features are \\(16, 16\\)"):
        distiller.accumulate(s_feats, t_feats)


# --- distributed statistics --------------------------------------------------------

def _sharded_matching(rank, world_size, out_dir):
    teacher, student = _pair()
    distiller = MGDistiller.from_models(teacher, student)
    shard = _images(8).split(4)[rank]            # each rank sees only its half
    assert collect_matching_costs(distiller, student, teacher, [shard]) == 4
    reports = distiller.update_matching()
    torch.save({"assignments": distiller.assignments(), "images": reports[0].num_images,
                "world_size": distributed.get_world_size()}, f"{out_dir}/rank{rank}.pt")


def test_sharded_statistics_give_the_single_process_assignment(tmp_path):
    run_distributed(_sharded_matching, 2, str(tmp_path))
    teacher, student = _pair()
    single = MGDistiller.from_models(teacher, student)
    collect_matching_costs(single, student, teacher, _images(8).split(4))
    single.update_matching()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["world_size"] == 2 and result["images"] == 8
        for got, want in zip(result["assignments"], single.assignments()):
            assert torch.equal(got, want)
