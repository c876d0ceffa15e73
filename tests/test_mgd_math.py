"""The MGD functions against references written from the paper's equations."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import integrate, stats
from torch.testing import assert_close

from moco_mgd.losses import mgd


def _random_cost(cs, ct, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(cs, ct, generator=g, dtype=torch.float64)


def _cost_of(cost, assignment):
    return sum(float(cost[s, t]) for t, s in enumerate(assignment.tolist()) if s >= 0)


def _brute_force_balanced(cost):
    """Minimum of Eq. 9 over every assignment where each student has alpha teachers."""
    cs, ct = cost.shape
    alpha = ct // cs
    best = math.inf
    for labels in itertools.product(range(-1, cs), repeat=ct):
        if labels.count(-1) != ct - alpha * cs:
            continue
        if any(labels.count(s) != alpha for s in range(cs)):
            continue
        best = min(best, sum(float(cost[s, t]) for t, s in enumerate(labels) if s >= 0))
    return best


@pytest.mark.parametrize("cs,ct,seed", [(2, 4, 0), (2, 5, 1), (3, 6, 2), (3, 7, 3), (2, 7, 4), (3, 3, 5)])
def test_balanced_assignment_is_optimal_and_balanced(cs, ct, seed):
    cost = _random_cost(cs, ct, seed)
    a = mgd.balanced_assignment(cost)
    alpha = ct // cs
    assert a.dtype == torch.long and a.shape == (ct,)
    assert torch.bincount(a[a >= 0], minlength=cs).tolist() == [alpha] * cs
    assert int((a == -1).sum()) == ct - alpha * cs
    assert _cost_of(cost, a) == pytest.approx(_brute_force_balanced(cost), abs=1e-12)


@pytest.mark.parametrize("cs,ct", [(64, 256), (48, 200)])
def test_balanced_assignment_of_a_real_channel_cost_matches_scipy(cs, ct):
    """At a stage's size (too big for brute force), the same total cost as scipy's solver."""
    from scipy.optimize import linear_sum_assignment
    g = torch.Generator().manual_seed(cs)
    student = torch.randn(8, cs, 4, 4, generator=g)
    teacher = torch.randn(8, ct, 4, 4, generator=g) * torch.rand(1, ct, 1, 1, generator=g) * 3
    cost = mgd.channel_cost(student, teacher)
    a = mgd.balanced_assignment(cost)
    assert torch.bincount(a[a >= 0], minlength=cs).tolist() == [ct // cs] * cs
    stacked = np.tile(cost.double().numpy(), (ct // cs, 1))
    rows, cols = linear_sum_assignment(stacked)
    assert _cost_of(cost, a) == pytest.approx(float(stacked[rows, cols].sum()), rel=1e-12)


@pytest.mark.parametrize("cs,ct,seed", [(2, 5, 0), (3, 6, 1), (3, 7, 2), (4, 4, 3)])
def test_sparse_assignment_is_optimal_one_to_one(cs, ct, seed):
    cost = _random_cost(cs, ct, seed)
    a = mgd.sparse_assignment(cost)
    assert torch.bincount(a[a >= 0], minlength=cs).tolist() == [1] * cs
    best = min(
        sum(float(cost[s, t]) for s, t in enumerate(teachers))
        for teachers in itertools.permutations(range(ct), cs)
    )
    assert _cost_of(cost, a) == pytest.approx(best, abs=1e-12)


def test_assignment_rejects_more_student_than_teacher_channels():
    with pytest.raises(ValueError, match="more channels than the teacher"):
        mgd.balanced_assignment(torch.rand(5, 3))
    with pytest.raises(ValueError, match="Ct >= Cs"):
        mgd.sparse_assignment(torch.rand(5, 3))


def test_assignment_rejects_non_finite_cost():
    cost = torch.rand(2, 4)
    cost[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mgd.balanced_assignment(cost)


def test_channel_cost_euclidean_is_eq6_summed_over_batch():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 2, 4, 5, generator=g), torch.randn(3, 6, 4, 5, generator=g)
    cost = mgd.channel_cost(s, t, distance="euclidean")
    ref = torch.zeros(2, 6)
    for b in range(3):
        for i in range(2):
            for j in range(6):
                ref[i, j] += ((s[b, i] - t[b, j]) ** 2).sum()
    assert_close(cost, ref, rtol=1e-5, atol=1e-4)


def test_channel_cost_cosine_is_two_minus_two_cos():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 3, 3, generator=g), torch.randn(2, 6, 3, 3, generator=g)
    cost = mgd.channel_cost(s, t)
    ref = torch.zeros(3, 6)
    for b in range(2):
        for i in range(3):
            for j in range(6):
                ref[i, j] += 2 - 2 * torch.cosine_similarity(s[b, i].flatten(), t[b, j].flatten(), dim=0)
    assert_close(cost, ref, rtol=1e-5, atol=1e-5)
    # Cosine distance ignores the scale of a channel; Eq. 6 does not.
    assert_close(mgd.channel_cost(s, 7.0 * t), cost, rtol=1e-5, atol=1e-5)


def test_channel_cost_adds_over_batches():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 2, 4, 4, generator=g), torch.randn(6, 4, 4, 4, generator=g)
    for distance in mgd.DISTANCES:
        whole = mgd.channel_cost(s, t, distance)
        parts = mgd.channel_cost(s[:2], t[:2], distance) + mgd.channel_cost(s[2:], t[2:], distance)
        assert_close(whole, parts, rtol=1e-5, atol=1e-4)


def test_channel_cost_rejects_mismatched_spatial_size():
    with pytest.raises(ValueError, match="different spatial sizes"):
        mgd.channel_cost(torch.randn(2, 2, 4, 4), torch.randn(2, 4, 2, 2))


def test_channel_cost_rejects_unknown_distance():
    with pytest.raises(ValueError, match="unknown distance"):
        mgd.channel_cost(torch.randn(1, 2, 2, 2), torch.randn(1, 4, 2, 2), distance="l1")


# --- reductions --------------------------------------------------------------------

# Student 0 <- teachers {1, 4}, student 1 <- teachers {0, 3}; teacher 2 unmatched.
ASSIGNMENT = torch.tensor([1, 0, -1, 1, 0])
GROUPS = {0: [1, 4], 1: [0, 3]}


def _teacher_feature(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 3, 4, generator=g)


def test_assignment_groups_lists_matched_teachers_in_order():
    assert mgd.assignment_groups(ASSIGNMENT, 2).tolist() == [GROUPS[0], GROUPS[1]]


@pytest.mark.parametrize("ct, cs", [(8, 2), (7, 3), (4, 4)])
def test_fixed_assignment_hands_teacher_channels_out_in_order(ct, cs):
    alpha = ct // cs
    balanced = mgd.fixed_assignment(ct, cs)
    assert balanced.tolist() == [j // alpha if j < alpha * cs else -1 for j in range(ct)]
    assert mgd.assignment_groups(balanced, cs).tolist() == [list(range(i * alpha, (i + 1) * alpha))
                                                            for i in range(cs)]
    sparse = mgd.fixed_assignment(ct, cs, sparse=True)
    assert mgd.assignment_groups(sparse, cs).squeeze(1).tolist() == [i * alpha for i in range(cs)]


def test_fixed_assignment_rejects_a_wider_student():
    with pytest.raises(ValueError, match="student channels <= teacher channels"):
        mgd.fixed_assignment(4, 8)


def test_assignment_groups_rejects_unbalanced():
    with pytest.raises(ValueError, match="same number"):
        mgd.assignment_groups(torch.tensor([0, 0, 1, -1]), 2)
    with pytest.raises(ValueError, match="same number"):
        mgd.assignment_groups(torch.tensor([0, 0, -1, -1]), 2)


@pytest.mark.parametrize("method", ["amp", "max", "avg"])
def test_deterministic_reductions_element_by_element(method):
    t = _teacher_feature()
    out = mgd.reduce(t, ASSIGNMENT, 2, method)
    assert out.shape == (2, 2, 3, 4)
    for b, i, h, w in itertools.product(range(2), range(2), range(3), range(4)):
        values = [float(t[b, j, h, w]) for j in GROUPS[i]]
        if method == "amp":
            expected = max(values, key=abs)
        elif method == "max":
            expected = max(values)
        else:
            expected = sum(values) / len(values)
        assert float(out[b, i, h, w]) == pytest.approx(expected, abs=1e-6)


def test_amp_keeps_the_sign_of_the_largest_magnitude():
    t = torch.zeros(1, 5, 1, 1)
    t[0, [1, 4], 0, 0] = torch.tensor([0.5, -3.0])   # student 0
    t[0, [0, 3], 0, 0] = torch.tensor([2.0, -1.0])   # student 1
    out = mgd.reduce(t, ASSIGNMENT, 2, "amp").flatten().tolist()
    assert out == [-3.0, 2.0]
    assert mgd.reduce(t, ASSIGNMENT, 2, "max").flatten().tolist() == [0.5, 2.0]
    t[0, [1, 4], 0, 0] = torch.tensor([-3.0, 3.0])   # an exact tie in magnitude: +v wins
    assert mgd.reduce(t, ASSIGNMENT, 2, "amp").flatten().tolist() == [3.0, 2.0]


def test_random_drop_picks_a_matched_channel_independently_per_position():
    t = torch.arange(5.0).reshape(1, 5, 1, 1).expand(64, 5, 8, 8).contiguous()
    g = torch.Generator().manual_seed(0)
    out = mgd.reduce(t, ASSIGNMENT, 2, "rd", generator=g)
    for i in range(2):
        picked = out[:, i]
        assert set(picked.unique().tolist()) == set(float(j) for j in GROUPS[i])
        # Uniform over the two matched channels: about half each over 4096 positions.
        share = float((picked == GROUPS[i][0]).float().mean())
        assert 0.45 < share < 0.55
    # Independent draws: positions of one image do not share one choice.
    assert out[0, 0].unique().numel() == 2
    again = mgd.reduce(t, ASSIGNMENT, 2, "rd", generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_sparse_matching_reduction_takes_the_single_matched_channel():
    t = _teacher_feature(3)
    sparse = torch.tensor([-1, 1, -1, -1, 0])
    out = mgd.reduce(t, sparse, 2, "sm")
    assert torch.equal(out[:, 0], t[:, 4]) and torch.equal(out[:, 1], t[:, 1])


def test_sparse_matching_rejects_many_to_one_assignment():
    with pytest.raises(ValueError, match="sparse_assignment"):
        mgd.reduce(_teacher_feature(), ASSIGNMENT, 2, "sm")


def test_reduce_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown reduction method 'mean'"):
        mgd.reduce(_teacher_feature(), ASSIGNMENT, 2, "mean")


def test_reduce_margin_is_group_mean():
    margin = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    groups = mgd.assignment_groups(ASSIGNMENT, 2)
    assert mgd.reduce_margin(margin, groups).tolist() == [-3.5, -2.5]


# --- margin ------------------------------------------------------------------------

def _integrated_margin(mu, sigma):
    density = stats.norm(mu, sigma).pdf
    mass, _ = integrate.quad(density, -math.inf, 0.0)
    first_moment, _ = integrate.quad(lambda x: x * density(x), -math.inf, 0.0)
    return first_moment / mass, mass


def _bn(weights, biases):
    bn = nn.BatchNorm2d(len(weights))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(weights))
        bn.bias.copy_(torch.tensor(biases))
    return bn


def test_bn_margin_is_the_negative_conditional_mean():
    weights = [1.0, 0.5, -2.0, 0.1, 3.0]   # the sign of gamma does not change the spread
    biases = [0.0, -0.3, 1.0, 0.2, -4.0]
    margin = mgd.bn_margin(_bn(weights, biases))
    for k, (w, b) in enumerate(zip(weights, biases)):
        expected, mass = _integrated_margin(b, abs(w))
        assert mass > 1e-3
        assert float(margin[k]) == pytest.approx(expected, rel=1e-4)


def test_bn_margin_falls_back_where_negatives_are_rare():
    # P(x < 0) = Phi(-5) ~ 3e-7 for mu=5, sigma=1, and ~0 for mu=50, sigma=0.1.
    margin = mgd.bn_margin(_bn([1.0, 0.1, 1e-8], [5.0, 50.0, 0.0]))
    assert margin[:2].tolist() == pytest.approx([-3.0, -0.3])
    assert torch.isfinite(margin).all() and (margin <= 0).all()


# --- partial L2 --------------------------------------------------------------------

@pytest.mark.parametrize(
    "student,teacher,margin,expected",
    [
        (-2.0, -1.0, -3.0, 0.0),          # s <= t <= 0: nothing to correct
        (-1.0, -1.0, -3.0, 0.0),          # s == t <= 0
        (-0.5, -1.0, -3.0, 0.25),         # s > t, t <= 0
        (-2.0, 1.0, -3.0, 9.0),           # t > 0
        (3.0, 1.0, -3.0, 4.0),            # t > 0, s > t
        (-2.0, -5.0, -1.0, 0.0),          # teacher clipped to the margin, s below it
        (0.0, -5.0, -1.0, 1.0),           # teacher clipped to the margin, s above it
        (-3.0, 0.0, -1.0, 0.0),           # t == 0 counts as <= 0
    ],
)
def test_partial_l2_case_table_of_eq5(student, teacher, margin, expected):
    loss = mgd.partial_l2(
        torch.tensor([[[[student]]]]), torch.tensor([[[[teacher]]]]), torch.tensor([margin])
    )
    assert float(loss) == pytest.approx(expected)


def test_partial_l2_sums_with_a_margin_per_channel_and_only_trains_the_student():
    s = torch.tensor([[[[0.0]], [[0.0]]]], requires_grad=True)
    t = torch.tensor([[[[-5.0]], [[-5.0]]]], requires_grad=True)
    loss = mgd.partial_l2(s, t, torch.tensor([-1.0, -2.0]))
    assert float(loss.detach()) == pytest.approx(1.0 + 4.0)
    loss.backward()
    assert s.grad.flatten().tolist() == [2.0, 4.0]
    assert t.grad is None


def test_partial_l2_rejects_bad_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        mgd.partial_l2(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="margin must be"):
        mgd.partial_l2(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), torch.zeros(3))
