"""The embedding losses (CCKD, DisCo, SEED) against references written from their papers' formulas.

Each reference is an explicit loop over pairs or images; the 2-process tests check that the
distributed gather and queue give the single-process value and gradient.
"""
import math

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from moco_mgd.losses.cckd import correlation_congruence_loss, correlation_matrix
from moco_mgd.losses.embedding import EmbeddingDistiller
from moco_mgd.losses.disco import embedding_regression_loss
from moco_mgd.losses.seed import TeacherEmbeddingQueue, similarity_distribution_loss
from tests.helpers import run_distributed


def _unit(v):
    return v / v.norm()


def _kernel_reference(a, b, kernel, gamma, order):
    """CCKD Sec. 3.4 for one pair of (normalised) embeddings."""
    a, b = _unit(a), _unit(b)
    if kernel == "cosine":
        return float(a @ b)
    if kernel == "rbf":
        return math.exp(-gamma * float(((a - b) ** 2).sum()))
    dot = float(a @ b)
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot ** p for p in range(order + 1))


@pytest.mark.parametrize("kernel", ["rbf-taylor", "rbf", "cosine"])
def test_correlation_matrix_is_the_kernel_of_every_pair(kernel):
    z = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    matrix = correlation_matrix(z, kernel, gamma=0.4, order=2)
    reference = torch.tensor([[_kernel_reference(z[i], z[j], kernel, 0.4, 2) for j in range(5)] for i in range(5)])
    assert_close(matrix, reference, rtol=1e-5, atol=1e-6)


def test_taylor_expansion_converges_to_the_rbf_kernel():
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    rbf = correlation_matrix(z, "rbf", gamma=0.4)
    assert (correlation_matrix(z, "rbf-taylor", 0.4, order=2) - rbf).abs().max() > 1e-3   # P=2 is an approximation
    assert_close(correlation_matrix(z, "rbf-taylor", 0.4, order=12), rbf, rtol=1e-6, atol=1e-6)


def test_correlation_congruence_is_the_mean_squared_difference_of_the_matrices():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 9, generator=g)   # different sizes: only n x n compared
    reference = sum((_kernel_reference(s[i], s[j], "rbf-taylor", 0.4, 2)
                     - _kernel_reference(t[i], t[j], "rbf-taylor", 0.4, 2)) ** 2
                    for i in range(4) for j in range(4)) / 16
    assert math.isclose(float(correlation_congruence_loss(s, t)), reference, rel_tol=1e-5)


def test_correlation_congruence_is_zero_when_the_batch_is_related_the_same_way():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 4, generator=g)
    assert float(correlation_congruence_loss(s, s.clone())) == 0.0
    # A teacher that is a rotation of the student, in a wider space and at another scale:
    # the relations between instances are the same, so CCKD has nothing to transfer.
    rotation, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))
    teacher = 3.0 * s @ rotation[:4]
    for kernel in ("rbf-taylor", "rbf", "cosine"):
        assert float(correlation_congruence_loss(s, teacher, kernel)) < 1e-10


def test_disco_is_the_squared_distance_of_normalised_embeddings():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    reference = sum(float(((_unit(s[i]) - _unit(t[i])) ** 2).sum()) for i in range(5)) / 5
    assert math.isclose(float(embedding_regression_loss(s, t)), reference, rel_tol=1e-6)
    assert float(embedding_regression_loss(s, 2.5 * s)) < 1e-12          # the scale does not matter
    assert math.isclose(float(embedding_regression_loss(s, -s)), 4.0, rel_tol=1e-6)


def _seed_reference(s, t, queue, student_t, teacher_t):
    """SEED Eq. 2-4, image by image (a 0-d tensor, differentiable in ``s``)."""
    total = 0.0
    for i in range(s.shape[0]):
        si, ti = _unit(s[i]), _unit(t[i])
        bank = [ti] + [queue[:, k] for k in range(queue.shape[1])]
        student_logits = torch.stack([si @ d for d in bank]) / student_t
        teacher_logits = torch.stack([ti @ d for d in bank]) / teacher_t
        p_t = torch.softmax(teacher_logits.double(), 0)
        log_p_s = torch.log_softmax(student_logits.double(), 0)
        total = total - (p_t * log_p_s).sum()
    return total / s.shape[0]


@pytest.mark.parametrize("teacher_t", [1e-4, 0.07, 0.5])
def test_seed_is_the_soft_cross_entropy_over_the_queue(teacher_t):
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    queue = nn.functional.normalize(torch.randn(6, 10, generator=g), dim=0)
    loss = similarity_distribution_loss(s, t, queue, student_t=0.2, teacher_t=teacher_t)
    assert math.isclose(float(loss), float(_seed_reference(s, t, queue, 0.2, teacher_t)), rel_tol=1e-5)


def test_seed_is_at_its_minimum_when_the_student_sees_the_queue_as_the_teacher_does():
    g = torch.Generator().manual_seed(6)
    t = torch.randn(4, 6, generator=g)
    queue = nn.functional.normalize(torch.randn(6, 10, generator=g), dim=0)
    s = t.clone().requires_grad_(True)
    loss = similarity_distribution_loss(s, t, queue, student_t=0.2, teacher_t=0.2)
    loss.backward()
    assert s.grad.abs().max() < 1e-6
    # The minimum is the entropy of the teacher's distribution (not 0: it is a cross-entropy).
    logits = torch.cat([torch.ones(4, 1), nn.functional.normalize(t, dim=1) @ queue], 1) / 0.2
    p = torch.softmax(logits, 1)
    assert math.isclose(float(loss.detach()), float(-(p * p.log()).sum(1).mean()), rel_tol=1e-5)


@pytest.mark.parametrize("loss_fn", [
    lambda s, t: correlation_congruence_loss(s, t),
    lambda s, t: embedding_regression_loss(s, t),
    lambda s, t: similarity_distribution_loss(s, t, nn.functional.normalize(torch.randn(4, 8), dim=0)),
])
def test_gradients_reach_the_student_only(loss_fn):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(3, 4, generator=g, requires_grad=True)
    t = torch.randn(3, 4, generator=g, requires_grad=True)
    loss_fn(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_seed_reads_a_copy_of_the_queue_so_enqueueing_before_backward_is_safe():
    torch.manual_seed(9)       # the queue's random start
    g = torch.Generator().manual_seed(9)
    queue = TeacherEmbeddingQueue(dim=4, size=2)
    before = queue.queue.clone()
    s = torch.randn(2, 4, generator=g, requires_grad=True)
    t = torch.randn(2, 4, generator=g)
    loss = similarity_distribution_loss(s, t, queue.queue, student_t=0.2, teacher_t=0.5)
    queue.enqueue(t)           # in place, as every training step does before backward: the whole queue is new
    loss.backward()
    # The value and the gradient are those of the queue as it was when the loss was computed.
    reference_s = s.detach().clone().requires_grad_(True)
    reference = _seed_reference(reference_s, t, before, 0.2, 0.5)
    reference.backward()
    assert math.isclose(loss.item(), reference.item(), rel_tol=1e-5)
    assert_close(s.grad, reference_s.grad.float(), rtol=1e-4, atol=1e-6)
    # ... and not those of the queue after the enqueue (the test can tell the two apart).
    after_s = s.detach().clone().requires_grad_(True)
    _seed_reference(after_s, t, queue.queue, 0.2, 0.5).backward()
    assert (after_s.grad.float() - s.grad).abs().max() > 1e-2


def test_teacher_queue_enqueues_normalised_embeddings_and_wraps_around():
    queue = TeacherEmbeddingQueue(dim=3, size=4)
    first, second, third = (torch.randn(2, 3) * 5 for _ in range(3))
    queue.enqueue(first)
    queue.enqueue(second)
    assert_close(queue.queue.T, nn.functional.normalize(torch.cat([first, second]), dim=1))
    queue.enqueue(third)                                   # overwrites the oldest two
    assert_close(queue.queue[:, :2].T, nn.functional.normalize(third, dim=1))
    assert int(queue.queue_ptr) == 2
    with pytest.raises(ValueError, match="divisible by the global batch size 3"):
        queue.enqueue(torch.randn(3, 3))


def test_embedding_distiller_weights_and_combines_the_losses():
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    sk, tk = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    distiller = EmbeddingDistiller(8, 8, cckd_weight=2.0, disco_weight=3.0, disco_both_views=True,
                                   seed_weight=0.5, seed_queue=8)
    queue = distiller.seed_queue.queue.clone()
    loss, parts = distiller(s, t, sk, tk)
    assert list(parts) == ["cckd", "disco", "seed"] and distiller.needs_key_view
    expected = {"cckd": correlation_congruence_loss(s, t),
                "disco": embedding_regression_loss(s, t) + embedding_regression_loss(sk, tk),
                "seed": similarity_distribution_loss(s, t, queue)}
    for name, value in expected.items():
        assert_close(parts[name], value)
    assert_close(loss, 2.0 * expected["cckd"] + 3.0 * expected["disco"] + 0.5 * expected["seed"])
    assert_close(distiller.seed_queue.queue[:, :4].T, nn.functional.normalize(t, dim=1))   # t was enqueued


def test_embedding_distiller_holds_state_only_for_seed():
    assert set(EmbeddingDistiller(8, 16, cckd_weight=1.0).state_dict()) == set()
    assert set(EmbeddingDistiller(8, 8, seed_weight=1.0, seed_queue=4).state_dict()) == {
        "seed_queue.queue", "seed_queue.queue_ptr"}


def test_embedding_distiller_rejects_bad_settings():
    with pytest.raises(ValueError, match="no embedding loss is on"):
        EmbeddingDistiller(8, 8)
    with pytest.raises(ValueError, match="must be >= 0"):
        EmbeddingDistiller(8, 8, disco_weight=-1.0)
    with pytest.raises(ValueError, match="set --moco-dim 16"):
        EmbeddingDistiller(8, 16, seed_weight=1.0)
    with pytest.raises(ValueError, match="unknown --cckd-kernel"):
        EmbeddingDistiller(8, 8, cckd_weight=1.0, cckd_kernel="laplace")
    EmbeddingDistiller(8, 16, cckd_weight=1.0)         # CCKD compares n x n matrices: any sizes
    with pytest.raises(ValueError, match="key view"):
        EmbeddingDistiller(8, 8, disco_weight=1.0, disco_both_views=True)(torch.randn(2, 8), torch.randn(2, 8))


# ---- two processes ------------------------------------------------------------------------

DIM, PER_RANK, WORLD = 6, 4, 2


def _problem():
    """A student (a linear map with trainable weights), inputs, teacher embeddings: same on every rank."""
    g = torch.Generator().manual_seed(9)
    inputs = torch.randn(WORLD * PER_RANK, 5, generator=g)
    teacher = torch.randn(WORLD * PER_RANK, DIM, generator=g)
    torch.manual_seed(10)
    student = nn.Linear(5, DIM)
    return student, inputs, teacher


def _distiller():
    torch.manual_seed(11)   # the same initial SEED queue in every process
    return EmbeddingDistiller(DIM, DIM, cckd_weight=2.0, disco_weight=1.0, seed_weight=0.5,
                              seed_queue=WORLD * PER_RANK * 2)


def _distributed_worker(rank, world_size, out_path):
    student, inputs, teacher = _problem()
    model = nn.parallel.DistributedDataParallel(student)
    distiller = _distiller()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    loss, parts = distiller(model(inputs[rows]), teacher[rows])
    loss.backward()
    if rank == 0:
        torch.save({"cckd": parts["cckd"], "disco": parts["disco"], "seed": parts["seed"],
                    "grads": [p.grad for p in student.parameters()], "queue": distiller.seed_queue.queue},
                   out_path)


def test_two_processes_give_the_single_process_losses_gradients_and_queue(tmp_path):
    out_path = tmp_path / "rank0.pt"
    run_distributed(_distributed_worker, WORLD, str(out_path))
    distributed = torch.load(out_path, weights_only=True)

    student, inputs, teacher = _problem()
    distiller = _distiller()
    loss, parts = distiller(student(inputs), teacher)
    loss.backward()
    # CCKD is over the global batch: every rank sees the whole n x n matrices.
    assert_close(distributed["cckd"], parts["cckd"])
    # DDP averages gradients over ranks: CCKD's gather passes the summed gradient back, the
    # per-image means of DisCo and SEED average to the mean over the global batch.
    for got, expected in zip(distributed["grads"], [p.grad for p in student.parameters()]):
        assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # SEED's queue got both ranks' teacher embeddings, in rank order.
    assert_close(distributed["queue"], distiller.seed_queue.queue)
