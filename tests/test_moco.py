"""MoCo: queue, momentum encoder, logits, shuffle BN (one process and a real 2-rank gloo group)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_mgd.models.resnet import build_resnet
from moco_mgd.models.moco import MoCo, apply_small_stem
from tests.helpers import run_distributed

ARCH, DIM, K, SIZE = "resnet18", 16, 32, 32


def _moco(seed: int = 0, **kwargs) -> MoCo:
    torch.manual_seed(seed)
    kwargs = {"dim": DIM, "K": K, **kwargs}
    return MoCo(ARCH, **kwargs)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def shared_model() -> MoCo:
    """One model for the checks that only read attributes (building two ResNets takes time)."""
    return _moco()


# ---- the queue ---------------------------------------------------------------------------

def test_queue_wraps_around():
    model = _moco(dim=4, K=12)
    batches = [torch.arange(16, dtype=torch.float32).view(4, 4) + 100 * i for i in range(4)]
    pointers = []
    for keys in batches:
        model._dequeue_and_enqueue(keys)
        pointers.append(int(model.queue_ptr))
    assert pointers == [4, 8, 0, 4]
    assert model.queue_ptr.dtype == torch.long and model.queue_ptr.shape == (1,)
    # The 4th batch overwrote the 1st; the 2nd and 3rd stay where they were written.
    assert torch.equal(model.queue[:, 0:4], batches[3].T)
    assert torch.equal(model.queue[:, 4:8], batches[1].T)
    assert torch.equal(model.queue[:, 8:12], batches[2].T)


def test_queue_size_not_divisible_by_batch_raises():
    model = _moco(dim=4, K=10)
    queue = model.queue.clone()
    with pytest.raises(ValueError, match=r"K=10 must be divisible by the global batch size 4"):
        model._dequeue_and_enqueue(torch.ones(4, 4))
    assert int(model.queue_ptr) == 0 and torch.equal(model.queue, queue)


def test_initial_state_follows_official_layout():
    model = _moco()
    assert model.queue.shape == (DIM, K)
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(K))
    assert model.queue_ptr.tolist() == [0]
    q_state, k_state = model.encoder_q.state_dict(), model.encoder_k.state_dict()
    assert all(torch.equal(q_state[name], k_state[name]) for name in q_state)
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    assert all(p.requires_grad for p in model.encoder_q.parameters())


# ---- the momentum encoder and the logits --------------------------------------------------

def test_momentum_update_is_exact():
    m = 0.9
    model = _moco(m=m)
    with torch.no_grad():  # make the key encoder differ from the query encoder
        for p in model.encoder_k.parameters():
            p.add_(0.01 * torch.randn_like(p))
    old_k = [p.detach().clone() for p in model.encoder_k.parameters()]
    q = [p.detach().clone() for p in model.encoder_q.parameters()]
    model(_images(4, 1), _images(4, 2))
    for p_k, k0, q0 in zip(model.encoder_k.parameters(), old_k, q):
        torch.testing.assert_close(p_k.detach(), m * k0 + (1 - m) * q0, rtol=1e-6, atol=1e-8)
    for p_q, q0 in zip(model.encoder_q.parameters(), q):
        assert torch.equal(p_q.detach(), q0)


def test_logits_labels_and_enqueued_keys():
    model = _moco(T=0.2).eval()  # eval: no BN batch effects, so keys can be recomputed by hand
    im_q, im_k = _images(4, 1), _images(4, 2)
    queue = model.queue.clone()
    logits, labels = model(im_q, im_k)[:2]
    assert logits.shape == (4, 1 + K)
    assert labels.shape == (4,) and labels.dtype == torch.long and not labels.any()
    with torch.no_grad():
        q = F.normalize(model.encoder_q(im_q), dim=1)
        k = F.normalize(model.encoder_k(im_k), dim=1)  # encoder_k already momentum-updated
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / 0.2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:, 1:], q @ queue / 0.2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.queue[:, :4], k.T, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.queue[:, 4:], queue[:, 4:])
    assert int(model.queue_ptr) == 4


def test_key_encoder_gets_no_gradient():
    model = _moco().train()
    logits, labels = model(_images(4, 1), _images(4, 2))[:2]
    nn.CrossEntropyLoss()(logits, labels).backward()
    for name, p in model.encoder_k.named_parameters():
        assert p.grad is None and not p.requires_grad, name
    for name, p in model.encoder_q.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not model.queue.requires_grad


def test_same_seed_gives_bitwise_identical_runs():
    def run():
        model = _moco(shuffle_bn_splits=2).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        outputs = []
        for step in range(2):
            logits, labels = model(_images(4, 10 + step), _images(4, 20 + step))[:2]
            optimizer.zero_grad()
            nn.CrossEntropyLoss()(logits, labels).backward()
            optimizer.step()
            outputs.append(logits.detach())
        return outputs, model.state_dict()

    (out_a, state_a), (out_b, state_b) = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(out_a, out_b))
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[n], state_b[n]) for n in state_a)


# ---- structure: MLP head, small stem -------------------------------------------------------

def test_mlp_head_and_state_dict_keys():
    model = _moco(mlp=True)
    state = model.state_dict()
    assert state["encoder_q.fc.0.weight"].shape == (512, 512)
    assert state["encoder_q.fc.2.weight"].shape == (DIM, 512)
    assert "encoder_k.fc.0.weight" in state and "encoder_k.fc.2.bias" in state
    assert "encoder_q.fc.weight" not in state
    expected = ({f"encoder_q.{n}" for n in model.encoder_q.state_dict()}
                | {f"encoder_k.{n}" for n in model.encoder_k.state_dict()} | {"queue", "queue_ptr"})
    assert set(state) == expected
    assert all(n.startswith(("encoder_q.", "encoder_k.")) or n in ("queue", "queue_ptr") for n in state)
    assert torch.equal(state["encoder_q.fc.0.weight"], state["encoder_k.fc.0.weight"])


def test_wider_mlp_hidden_layer_keeps_the_key_names():
    model = _moco(mlp=True, mlp_hidden_dim=64)
    state = model.state_dict()
    assert state["encoder_q.fc.0.weight"].shape == (64, 512) and state["encoder_q.fc.2.weight"].shape == (DIM, 64)
    assert torch.equal(state["encoder_q.fc.2.weight"], state["encoder_k.fc.2.weight"])
    with pytest.raises(ValueError, match="needs mlp=True"):
        _moco(mlp_hidden_dim=64)


def test_zero_init_residual_starts_every_block_as_the_identity():
    model = _moco(zero_init_residual=True)
    last_bns = [block.bn2 for layer in (model.encoder_q.layer1, model.encoder_q.layer4) for block in layer]
    assert last_bns and all(torch.count_nonzero(bn.weight) == 0 for bn in last_bns)
    assert torch.count_nonzero(_moco().encoder_q.layer1[0].bn2.weight) > 0  # off by default, as MoCo
    assert torch.equal(model.encoder_k.layer1[0].bn2.weight, model.encoder_q.layer1[0].bn2.weight)


def test_embedding_bn_centres_the_embedding_and_keeps_moco_key_names():
    model = _moco(mlp=True, embedding_bn=True)
    state = model.state_dict()
    assert "encoder_q.fc.3.running_mean" in state and "encoder_q.fc.3.weight" not in state  # no affine part
    assert state["encoder_q.fc.0.weight"].shape == (512, 512) and state["encoder_q.fc.2.weight"].shape == (DIM, 512)
    out = model(_images(8, 1), _images(8, 2))
    # q_raw is the BN output: centred over the batch, so the batch has no common direction
    assert out.query.mean(0).abs().max() < 1e-5
    with pytest.raises(ValueError, match="needs mlp=True"):
        _moco(embedding_bn=True)


def test_forward_returns_the_query_views_stage_features_and_the_key_view_query_as_values():
    from moco_mgd.models.stages import forward_with_stages

    model = _moco(mlp=True)
    model.train()
    im_q, im_k = _images(4, 1), _images(4, 2)
    out = model(im_q, im_k, query_on_key_view=True, with_stages=True)
    with torch.no_grad():  # train-mode BN uses the batch statistics: the same input gives the same output
        expected_q, expected_stages = forward_with_stages(model.encoder_q, im_q)
        expected_q_key_view = model.encoder_q(im_k)
    torch.testing.assert_close(out.query.detach(), expected_q)
    torch.testing.assert_close(out.query_key_view.detach(), expected_q_key_view)
    assert len(out.query_stages) == 4
    for got, expected in zip(out.query_stages, expected_stages):   # MGD reads the query view, not the key view
        torch.testing.assert_close(got.detach(), expected)
        assert got.requires_grad
    assert out.query.requires_grad and out.query_key_view.requires_grad
    # The InfoNCE positives are the normalised q against the keys.
    assert out.logits.shape == (4, 1 + K) and out.labels.tolist() == [0] * 4
    plain = model(im_q, im_k)
    assert plain.query_key_view is None and plain.query_stages is None


def test_small_stem():
    small, imagenet = _moco(stem="small"), _moco()
    for enc in (small.encoder_q, small.encoder_k):
        assert enc.conv1.kernel_size == (3, 3) and enc.conv1.stride == (1, 1)
        assert enc.conv1.padding == (1, 1) and enc.conv1.bias is None
        assert enc.conv1.out_channels == 64 and isinstance(enc.maxpool, nn.Identity)
    assert [n for n, _ in small.named_parameters()] == [n for n, _ in imagenet.named_parameters()]
    assert small.state_dict().keys() == imagenet.state_dict().keys()

    def layer4_shape(encoder):
        shapes = []
        handle = encoder.layer4.register_forward_hook(lambda mod, inp, out: shapes.append(out.shape))
        with torch.no_grad():
            encoder.eval()(_images(1, 0))
        handle.remove()
        return tuple(shapes[0])

    assert layer4_shape(small.encoder_q) == (1, 512, 4, 4)
    assert layer4_shape(imagenet.encoder_q) == (1, 512, 1, 1)
    # The public function gives other code (teacher, linear eval) the same stem.
    plain = build_resnet(ARCH)
    names = [n for n, _ in plain.named_parameters()]
    assert apply_small_stem(plain) is plain
    assert [n for n, _ in plain.named_parameters()] == names
    assert plain.conv1.kernel_size == (3, 3) and isinstance(plain.maxpool, nn.Identity)


# ---- shuffle BN in one process: split BN on a shuffled batch -------------------------------

@pytest.mark.parametrize("splits, batch, expected", [
    (8, 256, 8), (8, 16, 8), (8, 8, 4), (8, 9, 4), (8, 7, 3), (8, 4, 2), (8, 3, 1), (8, 2, 1),
    (8, 1, 1), (1, 256, 1),
])
def test_number_of_bn_splits_is_clipped(splits, batch, expected, shared_model):
    # A shallow copy: its own shuffle_bn_splits, the shared model's (read-only) modules; the
    # module-scoped fixture is left as the other tests expect it.
    model = copy.copy(shared_model)
    model.shuffle_bn_splits = splits
    assert model._num_bn_splits(batch) == expected
    assert shared_model.shuffle_bn_splits == 8


@pytest.mark.parametrize("batch, chunk_sizes", [(7, [3, 2, 2]), (3, [3])])
def test_every_bn_chunk_has_at_least_two_images(batch, chunk_sizes):
    model = _moco(shuffle_bn_splits=8, K=batch * 2).train()
    seen = []
    model.encoder_k.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    model(_images(batch, 1), _images(batch, 2))  # train-mode BN would raise on a 1-image chunk
    assert seen == chunk_sizes


def test_split_bn_keys_equal_encoder_on_each_chunk_of_the_permuted_batch():
    model = _moco(shuffle_bn_splits=4).train()
    im_k = _images(8, 3)
    torch.manual_seed(123)
    keys = model._compute_keys(im_k)

    torch.manual_seed(123)
    perm = torch.randperm(8)  # the one random draw of the helper
    with torch.no_grad():
        chunks = [model.encoder_k(c) for c in im_k[perm].tensor_split(4)]  # 4 chunks of 2
        expected = F.normalize(torch.cat(chunks), dim=1)[torch.argsort(perm)]
        full_batch = F.normalize(model.encoder_k(im_k), dim=1)
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-6)
    # Split BN does change the keys (each chunk has its own statistics).
    assert not torch.allclose(keys, full_batch, atol=1e-3)


def test_single_process_shuffle_is_undone():
    model = _moco(shuffle_bn_splits=4)
    x = _images(8, 4)
    shuffled, idx_unshuffle = model._batch_shuffle_single(x)
    assert not torch.equal(shuffled, x)
    assert torch.equal(model._batch_unshuffle_single(shuffled, idx_unshuffle), x)
    # With encoder_k in eval mode BN has no batch effects: the keys come back in input order.
    model.eval()
    with torch.no_grad():
        expected = F.normalize(model.encoder_k(x), dim=1)
    torch.testing.assert_close(model._compute_keys(x), expected, rtol=1e-5, atol=1e-6)


# ---- a real 2-process gloo group ----------------------------------------------------------

def _distributed_checks(rank: int, world_size: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    n = 4  # images per rank; the global batch is 8
    model = _moco(seed=0, K=16).train()  # same seed: the same model on every rank
    result = {"queue_init": model.queue.clone()}

    # (a) shuffle BN across ranks. Different RNG states per rank: only rank 0's permutation
    # must count (it is broadcast).
    x = _images(n, 100 + rank)
    torch.manual_seed(1000 + rank)
    shuffled, idx_unshuffle = model._batch_shuffle_ddp(x)
    result.update(x=x, shuffled=shuffled, idx_unshuffle=idx_unshuffle,
                  restored=model._batch_unshuffle_ddp(shuffled, idx_unshuffle))

    # (b) + (c) one training step of MoCo wrapped in DDP.
    ddp = DistributedDataParallel(model)
    recorded = []
    enqueue = model._dequeue_and_enqueue
    model._dequeue_and_enqueue = lambda keys: (recorded.append(keys.clone()), enqueue(keys))[1]
    logits, labels = ddp(_images(n, 10 + rank), _images(n, 20 + rank))[:2]
    nn.CrossEntropyLoss()(logits, labels).backward()
    result.update(keys=recorded[0], queue=model.queue.clone(), queue_ptr=int(model.queue_ptr),
                  grads={name: p.grad.clone() for name, p in model.encoder_q.named_parameters()},
                  k_grads_none=all(p.grad is None for p in model.encoder_k.parameters()))

    # Cross-rank unshuffle puts keys back in each rank's own order (eval: no BN batch effects).
    # Through DDP, which first broadcasts rank 0's buffers: the train step above left each rank
    # with its own BN running statistics, and shuffled keys are computed on another rank.
    ddp.eval()
    im_k = _images(n, 30 + rank)
    with torch.no_grad():
        ddp(_images(n, 40 + rank), im_k)
        result.update(keys_eval=recorded[1], keys_expected=F.normalize(model.encoder_k(im_k), dim=1))
    torch.save(result, f"{out_dir}/rank{rank}.pt")


def test_two_process_shuffle_bn_queue_and_ddp_gradients(tmp_path):
    run_distributed(_distributed_checks, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    # (a) shuffle / unshuffle: one permutation for both ranks, each rank holds its slice of
    # the permuted global batch, and unshuffle gives each rank back its own rows exactly.
    assert torch.equal(r0["idx_unshuffle"], r1["idx_unshuffle"])
    perm = torch.argsort(r0["idx_unshuffle"])
    global_batch = torch.cat([r0["x"], r1["x"]])
    assert torch.equal(torch.cat([r0["shuffled"], r1["shuffled"]]), global_batch[perm])
    for r in (r0, r1):
        assert torch.equal(r["restored"], r["x"])

    # (b) the queue holds rank 0's keys, then rank 1's, identically on both ranks.
    assert torch.equal(r0["queue"], r1["queue"])
    assert torch.equal(r0["queue"][:, :8], torch.cat([r0["keys"], r1["keys"]]).T)
    assert torch.equal(r0["queue"][:, 8:], r0["queue_init"][:, 8:])
    assert r0["queue_ptr"] == r1["queue_ptr"] == 8
    assert not torch.equal(r0["keys"], r1["keys"])

    # (c) DDP averaged the query encoder's gradients; the key encoder got none.
    assert r0["grads"].keys() == r1["grads"].keys()
    for name in r0["grads"]:
        assert torch.equal(r0["grads"][name], r1["grads"][name]), name
    assert r0["k_grads_none"] and r1["k_grads_none"]

    for r in (r0, r1):
        torch.testing.assert_close(r["keys_eval"], r["keys_expected"], rtol=1e-5, atol=1e-6)


def test_contrastive_diagnostics_tell_a_collapsed_embedding_from_a_spread_one():
    from moco_mgd.models.moco import MoCoOutput, contrastive_diagnostics

    T, n = 0.2, 4
    keys = torch.eye(n, 8)                        # orthogonal, normalised

    def output(queries, queue):
        q = nn.functional.normalize(queries, dim=1)
        logits = torch.cat([(q * keys).sum(1, keepdim=True), q @ queue], dim=1) / T
        return MoCoOutput(logits, torch.zeros(n, dtype=torch.long), queries, keys)

    spread = contrastive_diagnostics(output(3.0 * keys, torch.zeros(8, 6)), T)
    torch.testing.assert_close(spread["pos_sim"], torch.tensor(1.0))
    torch.testing.assert_close(spread["neg_sim"], torch.tensor(0.0))
    torch.testing.assert_close(spread["query_cos"], torch.tensor(0.0))
    torch.testing.assert_close(spread["inst_acc"], torch.tensor(100.0))

    # Every query points the same way (the collapse): cosine 1 within the batch, and only the
    # first query's own key is its nearest (argmax picks the first of equal scores).
    same = torch.zeros(n, 8)
    same[:, 0] = 1.0
    queue = -nn.functional.normalize(torch.ones(8, 6), dim=0)
    collapsed = contrastive_diagnostics(output(same, queue), T)
    torch.testing.assert_close(collapsed["query_cos"], torch.tensor(1.0))
    torch.testing.assert_close(collapsed["inst_acc"], torch.tensor(25.0))
    torch.testing.assert_close(collapsed["pos_sim"], torch.tensor(0.25))
    torch.testing.assert_close(collapsed["neg_sim"], torch.tensor(-8 ** -0.5))


def test_diagnostics_of_a_real_forward_match_the_cosines():
    from moco_mgd.models.moco import contrastive_diagnostics

    model = _moco(mlp=True)
    model.train()
    queue = model.queue.clone()                   # the negatives of this forward (it enqueues its keys)
    out = model(_images(4, 1), _images(4, 2))
    assert not torch.equal(model.queue, queue)
    n = 4
    q = [v / v.norm() for v in out.query.detach()]
    k = list(out.key)
    cos = lambda a, b: float(a @ b)
    d = {name: float(value) for name, value in contrastive_diagnostics(out, model.T).items()}
    assert d["pos_sim"] == pytest.approx(sum(cos(q[i], k[i]) for i in range(n)) / n, abs=1e-5)
    assert d["neg_sim"] == pytest.approx(sum(cos(q[i], queue[:, j]) for i in range(n) for j in range(K)) / (n * K),
                                         abs=1e-5)
    assert d["query_cos"] == pytest.approx(
        sum(cos(q[i], q[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1)), abs=1e-5)
    own_nearest = [max(range(n), key=lambda j: cos(q[i], k[j])) == i for i in range(n)]
    assert d["inst_acc"] == pytest.approx(100 * sum(own_nearest) / n)
    assert out.key.shape == (4, DIM) and not out.key.requires_grad
    torch.testing.assert_close(out.key.norm(dim=1), torch.ones(4))
