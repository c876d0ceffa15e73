"""MoCo's learning-rate schedule and MGD's matching schedule (moco_mgd.training.schedules)."""
import math

import pytest
import torch

from moco_mgd.training.schedules import (AUTHORS_MATCHING_EPOCHS, learning_rate, matching_epochs,
                                         set_learning_rate)

# ---- learning_rate: half-cosine -----------------------------------------------------------

BASE = 0.03


def test_cosine_starts_at_the_base_rate_and_is_half_of_it_halfway():
    assert learning_rate(BASE, 0, 200, True, [120, 160]) == BASE
    assert learning_rate(BASE, 100, 200, True, [120, 160]) == pytest.approx(BASE / 2, rel=1e-12)
    assert learning_rate(BASE, 5, 10, True, []) == pytest.approx(BASE / 2, rel=1e-12)


def test_cosine_at_a_hand_computed_epoch():
    # epoch 50 of 200: 0.5 * (1 + cos(pi / 4)) = 0.5 + sqrt(2) / 4 = 0.853553...
    assert learning_rate(BASE, 50, 200, True, [120, 160]) == pytest.approx(BASE * (0.5 + math.sqrt(2) / 4),
                                                                            rel=1e-12)
    assert learning_rate(1.0, 50, 200, True, []) == pytest.approx(0.8535533905932737, rel=1e-12)
    # epoch 1 of 3: 0.5 * (1 + cos(pi / 3)) = 0.75
    assert learning_rate(0.01, 1, 3, True, []) == pytest.approx(0.0075, rel=1e-12)


def test_cosine_decreases_monotonically_and_ignores_the_milestones():
    rates = [learning_rate(BASE, e, 200, True, [120, 160]) for e in range(200)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert rates[-1] > 0
    # No step at the milestones: the milestones are for the step schedule only.
    assert rates[120] == pytest.approx(learning_rate(BASE, 120, 200, True, []), rel=1e-15)
    assert rates[119] / rates[120] < 1.05


# ---- learning_rate: x0.1 at each milestone ---------------------------------------------------

def test_step_schedule_multiplies_by_a_tenth_at_each_milestone():
    lr = [learning_rate(BASE, e, 200, False, [120, 160]) for e in range(200)]
    assert lr[0] == lr[119] == BASE
    assert lr[120] == pytest.approx(BASE * 0.1, rel=1e-12) and lr[159] == lr[120]
    assert lr[160] == pytest.approx(BASE * 0.01, rel=1e-12) and lr[199] == lr[160]
    assert len(set(lr)) == 3


def test_step_schedule_with_unsorted_and_empty_milestones():
    unsorted = [learning_rate(BASE, e, 200, False, [160, 120]) for e in range(200)]
    assert unsorted == [learning_rate(BASE, e, 200, False, [120, 160]) for e in range(200)]
    assert learning_rate(BASE, 130, 200, False, [160, 120]) == pytest.approx(BASE * 0.1, rel=1e-12)
    assert learning_rate(BASE, 170, 200, False, [160, 120]) == pytest.approx(BASE * 0.01, rel=1e-12)
    assert all(learning_rate(BASE, e, 200, False, []) == BASE for e in range(200))
    # A milestone at 0 applies from the start.
    assert learning_rate(BASE, 0, 10, False, [0]) == pytest.approx(BASE * 0.1, rel=1e-12)


def test_set_learning_rate_sets_every_param_group():
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.2},
                                 {"params": [params[2]]}], lr=0.3, momentum=0.9)
    set_learning_rate(optimizer, 0.0123)
    assert [group["lr"] for group in optimizer.param_groups] == [0.0123] * 3
    # The step uses the new rate: SGD without momentum history moves a parameter by lr * grad.
    for p in params:
        p.grad = torch.ones(2)
    optimizer.step()
    for p in params:
        assert torch.allclose(p.detach(), torch.full((2,), -0.0123))


# ---- matching_epochs ------------------------------------------------------------------------

def test_authors_schedule_is_cut_below_the_number_of_epochs():
    assert AUTHORS_MATCHING_EPOCHS == (0, 1, 2, 3, 6, 9, 15, 26, 43, 74, 126)
    assert matching_epochs("authors", 200) == list(AUTHORS_MATCHING_EPOCHS)
    assert matching_epochs("authors", 127) == list(AUTHORS_MATCHING_EPOCHS)
    assert matching_epochs("authors", 126) == list(AUTHORS_MATCHING_EPOCHS[:-1])
    assert matching_epochs("authors", 10) == [0, 1, 2, 3, 6, 9]
    assert matching_epochs("authors", 9) == [0, 1, 2, 3, 6]
    assert matching_epochs("authors", 1) == [0]
    assert matching_epochs("  authors ", 10) == [0, 1, 2, 3, 6, 9]


def test_every_n_epochs():
    assert matching_epochs("every:1", 10) == list(range(10))
    assert matching_epochs("every:3", 10) == [0, 3, 6, 9]
    assert matching_epochs("every:4", 10) == [0, 4, 8]
    assert matching_epochs("every:20", 10) == [0]


def test_none_is_no_matching():
    assert matching_epochs("none", 10) == []
    assert matching_epochs(" none ", 200) == []


def test_explicit_lists_are_sorted_deduplicated_and_cut():
    assert matching_epochs("0,1,2,3,6", 10) == [0, 1, 2, 3, 6]
    assert matching_epochs("6,0,3,1,2", 10) == [0, 1, 2, 3, 6]
    assert matching_epochs("3,3,0,3,0", 10) == [0, 3]
    assert matching_epochs("0,5,10,11", 10) == [0, 5]
    assert matching_epochs("0, 2 ,  4", 10) == [0, 2, 4]
    assert matching_epochs(" 1,2, ", 10) == [1, 2]  # an empty trailing entry is ignored
    assert matching_epochs("7", 10) == [7]
    assert matching_epochs("12,15", 10) == []  # all past the end: valid, nothing left


@pytest.mark.parametrize("spec", ["every:0", "every:-1", "every:x", "every:", "", "   ", ",", "a,b", "-1,2",
                                  "bogus", "0,1.5"])
def test_a_bad_schedule_names_the_flag_and_the_valid_forms(spec):
    with pytest.raises(ValueError) as info:
        matching_epochs(spec, 10)
    message = str(info.value)
    assert "--mgd-schedule" in message
    for form in ("'authors'", "'every:N'", "'none'", "comma-separated list", "0,1,2,3,6"):
        assert form in message, message
    assert repr(spec.strip()) in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
