"""kNN classification: faiss vs the torch reference, the weighted vote, the gathered features, the CLI."""
from __future__ import annotations

import logging
import math
import os
import shutil

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from moco_mgd.evaluation import knn
from moco_mgd.evaluation.features import extract_features
from tests.helpers import make_image_folder, moco_v2_checkpoint, run_distributed


def _random_problem(seed=0, bank=500, queries=120, dim=32, classes=10):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(bank, dim, generator=g), torch.randint(0, classes, (bank,), generator=g),
            torch.randn(queries, dim, generator=g))


def test_faiss_equals_torch_reference():
    train, labels, queries = _random_problem()
    s_f, i_f = knn.knn_search(train, queries, k=20, backend="faiss", chunk_size=32, use_gpu=False)
    s_t, i_t = knn.knn_search(train, queries, k=20, backend="torch", chunk_size=32)
    assert torch.equal(i_f, i_t)
    torch.testing.assert_close(s_f, s_t, atol=1e-5, rtol=1e-5)
    # and against an unchunked dense reference
    dense = nn.functional.normalize(queries, dim=1) @ nn.functional.normalize(train, dim=1).T
    assert torch.equal(i_t, dense.topk(20, dim=1).indices)
    scores = {b: knn.knn_classify(train, labels, queries, 10, k=20, temperature=0.07, backend=b, chunk_size=32,
                                  use_gpu=False) for b in knn.BACKENDS}
    torch.testing.assert_close(scores["faiss"], scores["torch"], rtol=1e-4, atol=1e-4)
    assert scores["faiss"].shape == (120, 10)


def test_torch_backend_merges_bank_blocks(monkeypatch):
    train, _, queries = _random_problem(seed=1, bank=505)
    dense = nn.functional.normalize(queries, dim=1) @ nn.functional.normalize(train, dim=1).T
    monkeypatch.setattr(knn, "_TORCH_BLOCK", 32 * 50)  # bank blocks of 50 rows, the last one of 5 < k
    sims, indices = knn.knn_search(train, queries, k=20, backend="torch", chunk_size=32)
    assert torch.equal(indices, dense.topk(20, dim=1).indices)
    torch.testing.assert_close(sims, dense.topk(20, dim=1).values)


def test_separated_clusters_are_all_right():
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.eye(8)[:4]
    train_labels = torch.arange(4).repeat_interleave(25)
    val_labels = torch.arange(4).repeat_interleave(5)
    train = centres[train_labels] + torch.randn(100, 8, generator=g)
    val = centres[val_labels] + torch.randn(20, 8, generator=g)
    scores = knn.knn_classify(train, train_labels, val, 4, k=10, use_gpu=False)
    assert knn.knn_accuracy(scores, val_labels) == {"top1": 100.0}


def test_weighted_vote_by_hand():
    query = torch.tensor([[1.0, 0.0]])
    # two class-0 neighbours at cosine 0.447, one class-1 neighbour at 0.995, one far class-1 point
    train = torch.tensor([[0.5, 1.0], [0.5, -1.0], [1.0, 0.1], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    low, high = 0.5 / 1.25 ** 0.5, 1 / 1.01 ** 0.5
    for backend in knn.BACKENDS:
        for temperature, winner in ((0.05, 1), (10.0, 0)):
            scores = knn.knn_classify(train, labels, query, 2, k=3, temperature=temperature, backend=backend,
                                      use_gpu=False)
            expected = torch.tensor([[2 * math.exp(low / temperature), math.exp(high / temperature)]])
            torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)
            assert scores.argmax().item() == winner


def test_k_larger_than_bank():
    train, labels, queries = _random_problem(bank=10)
    for backend in knn.BACKENDS:
        with pytest.raises(ValueError, match="k=11 is larger than the 10 train features"):
            knn.knn_classify(train, labels, queries, 10, k=11, backend=backend)


def test_accuracy_top5_only_with_5_classes():
    scores = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])
    assert knn.knn_accuracy(scores, torch.tensor([1, 5])) == {"top1": 50.0, "top5": 50.0}
    assert knn.knn_accuracy(scores[:, :3], torch.tensor([1, 2])) == {"top1": 50.0}


def test_gpu_requested_without_gpu_warns_and_uses_cpu(caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    train, labels, queries = _random_problem()
    cpu = knn.knn_classify(train, labels, queries, 10, k=5, use_gpu=False)
    with caplog.at_level(logging.WARNING, logger="moco_mgd"):
        gpu = knn.knn_classify(train, labels, queries, 10, k=5, use_gpu=True)
    assert any("CPU index" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    torch.testing.assert_close(gpu, cpu)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def _tiny_sets():
    """11 train and 7 val images: odd counts, so the 2-rank sampler pads both."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(11) % 3
    train = TensorDataset(torch.randn(11, 3, 12, 12, generator=g) + labels.view(-1, 1, 1, 1), labels)
    val = TensorDataset(torch.randn(7, 3, 12, 12, generator=g) + labels[:7].view(-1, 1, 1, 1), labels[:7])
    return train, val


def _extract_worker(rank: int, world_size: int, out_dir: str) -> None:
    train, val = _tiny_sets()
    feats, labels = extract_features(_tiny_model(), train, batch_size=3, device="cpu")
    result = knn.knn_evaluate(_tiny_model(), train, val, 2, "cpu", k=4, backend="faiss")
    torch.save((feats, labels, result), os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_extraction_equals_single_process(tmp_path):
    run_distributed(_extract_worker, 2, str(tmp_path))
    train, val = _tiny_sets()
    feats, labels = extract_features(_tiny_model(), train, batch_size=3, device="cpu")
    single = knn.knn_evaluate(_tiny_model(), train, val, 2, "cpu", k=4, backend="torch")
    for rank in range(2):
        r_feats, r_labels, r_result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(r_feats, feats, rtol=1e-5, atol=1e-6)
        assert torch.equal(r_labels, labels)
        assert r_result == single


@pytest.fixture
def folders(tmp_path):
    make_image_folder(tmp_path / "data", splits=("train", "val"), classes=2, per_class=8, size=40)
    checkpoint, encoder = moco_v2_checkpoint("resnet18", mlp=True, seed=0)
    torch.save(checkpoint, tmp_path / "moco.pth.tar")
    torch.save({k: v for k, v in encoder.state_dict().items() if not k.startswith("fc")}, tmp_path / "tv.pth")
    return tmp_path


def _cli(folders, checkpoint, *extra):
    return knn.main([str(folders / "data"), "--pretrained", str(folders / checkpoint), "-k", "4", "-b", "8",
                     "-j", "0", "--image-size", "32", *extra])


@pytest.mark.parametrize("checkpoint", ["moco.pth.tar", "tv.pth"])
def test_cli_end_to_end(folders, checkpoint, capsys):
    _cli(folders, checkpoint, "--backend", "faiss" if checkpoint == "tv.pth" else "torch")
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("kNN (k=4, T=0.1) top-1 ")][-1]
    assert line.endswith("on 16 val images") and "top-5" not in line
    # Each class has its own colour in both splits: even random frozen features separate them.
    assert float(line.split()[4]) >= 75.0, line


def test_cli_random_init_on_a_subset_writes_metrics(tmp_path, capsys):
    from moco_mgd.runtime.logs import read_metrics
    from tests.helpers import write_fashion_mnist

    write_fashion_mnist(tmp_path / "fm", "train", n=40, structured=True)
    write_fashion_mnist(tmp_path / "fm", "t10k", n=20, seed=1, structured=True)
    args = [str(tmp_path / "fm"), "--dataset", "fashion-mnist", "--random-init", "--seed", "3", "--max-images", "30",
            "-k", "5", "-b", "16", "-j", "0", "--image-size", "32", "--output-dir", str(tmp_path / "out")]
    knn.main(args)
    assert "30 train, 20 val images" in capsys.readouterr().out
    knn.main(args)  # the same seed draws the same network and subset
    first, second = read_metrics(tmp_path / "out")
    assert first["kind"] == "knn" and first["top1"] == second["top1"]
    # The bars are separable even by random features: far above the 10% of chance.
    assert first["top1"] >= 50.0, first
    with pytest.raises(SystemExit):
        knn.main(args + ["--pretrained", "x.pth"])  # one source of weights, not two
    assert "not allowed with argument" in capsys.readouterr().err


def _cli_error(folders, checkpoint, capsys, *extra) -> str:
    with pytest.raises(SystemExit) as exc:
        _cli(folders, checkpoint, *extra)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_cli_bad_input(folders, capsys):
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, folders / "bad.pth")
    assert "encoder.weight" in _cli_error(folders, "bad.pth", capsys)
    assert "look like a resnet18" in _cli_error(folders, "moco.pth.tar", capsys, "-a", "resnet50")
    os.rename(folders / "data" / "val" / "class1", folders / "data" / "val" / "other")
    assert "classes of train/ and val/ differ" in _cli_error(folders, "moco.pth.tar", capsys)
    shutil.rmtree(folders / "data" / "val")
    assert "val/" in _cli_error(folders, "moco.pth.tar", capsys)


def test_cli_val_holdout_scores_held_out_training_images(tmp_path, capsys):
    from tests.helpers import write_fashion_mnist

    write_fashion_mnist(tmp_path / "fm", "train", n=100, structured=True)
    write_fashion_mnist(tmp_path / "fm", "t10k", n=20, seed=1, structured=True)
    knn.main([str(tmp_path / "fm"), "--dataset", "fashion-mnist", "--random-init", "--val-holdout", "0.3", "-k", "5",
              "-b", "16", "-j", "0", "--image-size", "32"])
    out = capsys.readouterr().out
    held = int(out.split(" val images")[0].split()[-1])
    assert 25 <= held <= 35 and f"{100 - held} train, {held} val images" in out   # not the 20 test images' count
    with pytest.raises(SystemExit):
        knn.main([str(tmp_path / "fm"), "--dataset", "fashion-mnist", "--random-init", "--val-holdout", "1"])
    assert "--val-holdout 1.0: must be > 0 and < 1" in capsys.readouterr().err


def test_extracting_through_a_trunk_view_leaves_a_frozen_teachers_layers_in_eval_mode():
    """resnet_trunk(teacher) is a new Sequential (training=True) around the teacher's layers: the
    extraction must put back each layer's own mode, or the teacher's BNs train from then on."""
    from moco_mgd.models.resnet import build_resnet, resnet_trunk

    teacher = build_resnet("resnet18", num_classes=8).eval()
    student = build_resnet("resnet18", num_classes=8).train()
    images = TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    for network, training in ((teacher, False), (student, True)):
        extract_features(resnet_trunk(network), images, batch_size=2, device="cpu")
        assert {m.training for m in network.modules()} == {training}
