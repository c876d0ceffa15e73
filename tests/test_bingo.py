"""BINGO: the bags against a brute-force search, the loss against a hand computation, the CutMix,
runs in one and two processes, an exact mid-epoch resume, exact pairing with the baseline, and
every bad input refused before any work."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import main_moco_mgd
from moco_mgd.losses.bingo import bingo_loss, contrast_with_positives, cutmix
from moco_mgd.losses.embedding import BagViews, EmbeddingDistiller
from moco_mgd.checkpoints.files import file_sha256
from moco_mgd.training.bags import BAG_FILE, main as bags_main, search_bags
from tests.helpers import free_port, make_image_folder, moco_v2_checkpoint
from tests.test_pretrain import _assert_same_state, _fails, _load, _stop_at

REPO = Path(__file__).resolve().parents[1]


# --- the bags ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_bags_are_the_nearest_other_images_of_a_brute_force_search(backend):
    features = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    bags = search_bags(features, 5, backend=backend, chunk_size=7)
    unit = F.normalize(features, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-math.inf)
    assert torch.equal(bags, similarity.topk(5, dim=1).indices)


def test_a_duplicate_image_never_puts_an_image_in_its_own_bag():
    features = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    features[3] = features[7]                       # two identical images: either may come first
    bags = search_bags(features, 4)
    assert bags.shape == (10, 4)
    assert not (bags == torch.arange(10)[:, None]).any()
    assert 7 in bags[3].tolist() and 3 in bags[7].tolist()


def test_a_bag_larger_than_the_image_set_is_refused():
    with pytest.raises(ValueError, match="--bingo-k 10: a bag holds 1 to 9 other images of the 10"):
        search_bags(torch.randn(10, 4), 10)


# --- the loss ---------------------------------------------------------------------------

def _ce(query, positive, queue, tau):
    """-log softmax of the positive among [positive, queue] for one image, from the definition."""
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    norm = lambda a: [x / math.sqrt(dot(a, a)) for x in a]
    q, p = norm(query), norm(positive)
    logits = [dot(q, p) / tau] + [dot(q, column) / tau for column in queue]
    return -(logits[0] - math.log(sum(math.exp(v) for v in logits)))


def test_the_loss_is_the_released_codes_on_a_hand_computed_batch():
    g = torch.Generator().manual_seed(2)
    s_a, s_b, s_m, t_a, t_b = (torch.randn(3, 4, generator=g) for _ in range(5))
    queue = F.normalize(torch.randn(4, 6, generator=g), dim=0)
    tau, (w0, w1), lam = 0.2, (0.5, 0.5), 0.3
    columns = queue.T.tolist()
    expected = 0.0
    for i in range(3):
        own = lambda s, t: _ce(s[i].tolist(), t[i].tolist(), columns, tau)
        expected += (w0 * own(s_a, t_a) + w1 * own(s_a, t_b) + w0 * own(s_b, t_b) + w1 * own(s_b, t_a)
                     + lam * own(s_m, t_a) + (1 - lam) * own(s_m, t_b)) / 3
    loss = bingo_loss(s_a, s_b, t_a, t_b, queue, tau, (w0, w1), s_m, lam)
    assert loss.item() == pytest.approx(expected / 3, rel=1e-6)
    # Without the mix view the two queries' terms are averaged.
    no_mix = sum((w0 * _ce(s_a[i].tolist(), t_a[i].tolist(), columns, tau)
                  + w1 * _ce(s_a[i].tolist(), t_b[i].tolist(), columns, tau)
                  + w0 * _ce(s_b[i].tolist(), t_b[i].tolist(), columns, tau)
                  + w1 * _ce(s_b[i].tolist(), t_a[i].tolist(), columns, tau)) / 2 for i in range(3)) / 3
    assert bingo_loss(s_a, s_b, t_a, t_b, queue, tau, (w0, w1)).item() == pytest.approx(no_mix, rel=1e-6)


def test_the_loss_trains_the_student_only_and_its_warm_up_uses_the_own_key_alone():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 8, generator=g, requires_grad=True)
    teacher_a, teacher_b = torch.randn(4, 8, generator=g, requires_grad=True), torch.randn(4, 8, generator=g)
    queue = F.normalize(torch.randn(8, 16, generator=g), dim=0)
    contrast_with_positives(student, [teacher_a, teacher_b], [0.5, 0.5], queue, 0.2).backward()
    assert student.grad.abs().sum() > 0 and teacher_a.grad is None
    distiller = EmbeddingDistiller(8, 8, bingo_weight=1.0, bingo_queue=16, bingo_warmup_epochs=2)
    assert distiller.bingo_weights_now() == (1.0, 0.0)
    distiller.epoch = 2
    assert distiller.bingo_weights_now() == (0.5, 0.5)
    with pytest.raises(ValueError, match="BINGO needs the embeddings of each anchor's bag member"):
        distiller(student, teacher_b)
    before = distiller.bingo_queue.queue.clone()
    _, parts = distiller(student, teacher_b, bag=BagViews(student, teacher_b))
    assert set(parts) == {"bingo"} and not torch.equal(distiller.bingo_queue.queue, before)


def test_cutmix_pastes_one_box_of_the_member_and_reports_the_anchors_share():
    anchor, member = torch.zeros(2, 3, 32, 32), torch.ones(2, 3, 32, 32)
    shares = []
    for seed in range(20):
        mixed, share = cutmix(anchor, member, torch.Generator().manual_seed(seed))
        pasted = mixed[0, 0]
        assert share == pytest.approx(1 - pasted.mean().item())       # the share is the anchor's area
        assert torch.equal(mixed[0], mixed[1]) and torch.equal(anchor, torch.zeros_like(anchor))
        rows, cols = pasted.sum(1).nonzero(), pasted.sum(0).nonzero()
        if len(rows):   # one rectangle
            assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        shares.append(share)
    again, share = cutmix(anchor, member, torch.Generator().manual_seed(0))
    assert share == shares[0] and 0.05 < sum(shares) / len(shares) < 0.95


# --- runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(module_dir):
    """48 images: 6 iterations per epoch at -b 8."""
    return make_image_folder(str(module_dir("bingo_data")), splits=("train", "val"), per_class=24)


@pytest.fixture(scope="module")
def teacher(module_dir):
    """A ResNet-18 MoCo-v2 teacher with its MLP head (16-d embeddings)."""
    checkpoint, _ = moco_v2_checkpoint("resnet18", mlp=True, dim=16)
    path = module_dir("bingo_teacher") / "teacher.pth.tar"
    torch.save(checkpoint, path)
    return str(path)


def _args(data, out, teacher, *extra, epochs=2, bingo=True, mgd=False):
    args = [str(data), "-a", "resnet18", "--epochs", str(epochs), "-b", "8", "--moco-k", "16", "--moco-dim", "16",
            "-j", "0", "--image-size", "32", "--seed", "0", "--mlp", "--aug-plus", "-p", "1", "--lr", "0.01",
            "--output-dir", str(out), "--keep-checkpoints", "0"]
    if bingo:
        args += ["--teacher-arch", "resnet18", "--teacher-checkpoint", teacher, "--bingo-weight", "1",
                 "--bingo-k", "3", "--bingo-queue", "32", "--bingo-warmup-epochs", "1"]
        args += ["--mgd-samples", "16", "--mgd-schedule", "0"] if mgd else ["--no-mgd"]
    return args + list(extra)


def _train(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _same_run_state(a: dict, b: dict) -> None:
    _assert_same_state(a, b)
    assert a["embedding"].keys() == b["embedding"].keys() and "bingo_queue.queue" in a["embedding"]
    for key in a["embedding"]:
        assert torch.equal(a["embedding"][key], b["embedding"][key]), key
    assert torch.equal(a["bag_rng"], b["bag_rng"]) and a["bingo_bags_sha256"] == b["bingo_bags_sha256"]


def test_a_run_builds_its_bags_records_them_and_pairs_exactly_with_the_baseline(data, teacher, tmp_path):
    out, baseline = tmp_path / "bingo", tmp_path / "baseline"
    main_moco_mgd.main(_args(data, out, teacher, mgd=True))
    main_moco_mgd.main(_args(data, baseline, teacher, bingo=False))
    bags = torch.load(out / BAG_FILE, weights_only=True)
    assert bags["bags"].shape == (48, 3) and bags["teacher_sha256"] == file_sha256(teacher)
    state = _load(out / "checkpoint_0001.pth.tar")
    assert state["bingo_bags_sha256"] == file_sha256(out / BAG_FILE) and state["mgd"] is not None
    records = _train(out)
    assert all(math.isfinite(r["bingo"]) and r["bingo"] > 0 for r in records) and "mgd" in records[0]
    # Exact pairing: the anchors' views, initial weights and shuffle BN are the baseline's.
    assert records[0]["infonce"] == _train(baseline)[0]["infonce"]
    assert records[0]["neg_sim"] == _train(baseline)[0]["neg_sim"]
    log = (out / "log.txt").read_text()
    assert "BINGO bags: 48 images, k=3" in log and "embedding losses bingo" in log
    # The same teacher and images again: the bags are reused, not rebuilt.
    again = tmp_path / "again"
    again.mkdir()
    (again / BAG_FILE).write_bytes((out / BAG_FILE).read_bytes())
    main_moco_mgd.main(_args(data, again, teacher, epochs=1))
    assert f"BINGO: bags of 48 images (k=3) from {again / BAG_FILE}" in (again / "log.txt").read_text()


def test_a_resume_mid_epoch_is_bitwise_the_uninterrupted_run(data, teacher, tmp_path):
    reference = tmp_path / "reference"
    main_moco_mgd.main(_args(data, reference, teacher, "--bingo-mix"))
    out = tmp_path / "stopped"
    cmd = [sys.executable, "main_moco_mgd.py", *_args(data, out, teacher, "-j", "2")]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    assert _stop_at(cmd, out, (0, 3), lambda p: p.send_signal(signal.SIGUSR2), env) == 128 + signal.SIGUSR2
    assert _stop_at(cmd, out, (1, 2), lambda p: p.send_signal(signal.SIGTERM), env) == 128 + signal.SIGTERM
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _same_run_state(_load(out / "checkpoint_0001.pth.tar"), _load(reference / "checkpoint_0001.pth.tar"))
    assert [r["bingo"] for r in _train(out)] == [r["bingo"] for r in _train(reference)]


def test_two_processes_build_the_same_bags_and_queue_the_same_teacher_embeddings(data, teacher, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    main_moco_mgd.main(_args(data, one, teacher, epochs=1))
    result = subprocess.run([sys.executable, "main_moco_mgd.py", *_args(data, two, teacher, epochs=1),
                             "--multiprocessing-distributed", "--nproc-per-node", "2", "--dist-url",
                             f"tcp://127.0.0.1:{free_port()}"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(one / BAG_FILE, weights_only=True)["bags"],
                       torch.load(two / BAG_FILE, weights_only=True)["bags"])
    # Each step's global batch holds the same images in both (DistributedSampler deals one
    # permutation out); the teacher is in eval mode, so the queue holds the same embeddings, each
    # batch's columns in rank order instead of sampler order.
    queues = [_load(run / "checkpoint_0000.pth.tar")["embedding"]["bingo_queue.queue"] for run in (one, two)]
    for block in range(0, 32, 8):
        a, b = (q[:, block:block + 8] for q in queues)
        order = [0, 2, 4, 6, 1, 3, 5, 7]   # rank 0 took the even places of the batch, rank 1 the odd
        assert torch.allclose(a[:, order], b, atol=1e-5), block


# --- the command, and bad input ------------------------------------------------------------

def test_the_bag_command_writes_what_a_run_accepts_and_a_run_refuses_other_bags(data, teacher, tmp_path, capsys):
    bags = tmp_path / "shared_bags.pt"
    bags_main([str(data), "--teacher-arch", "resnet18", "--teacher-checkpoint", teacher, "--bingo-k", "3",
               "--output", str(bags), "--image-size", "32", "-b", "16", "-j", "0"])
    out = tmp_path / "run"
    main_moco_mgd.main(_args(data, out, teacher, "--bingo-bags", str(bags), epochs=1))
    assert not (out / BAG_FILE).exists() and _load(out / "checkpoint_0000.pth.tar")["bingo_bags_sha256"] == \
        file_sha256(bags)
    with pytest.raises(SystemExit, match="exists: choose another path"):
        bags_main([str(data), "--teacher-checkpoint", teacher, "--output", str(bags)])

    other_teacher = tmp_path / "other_teacher.pth.tar"
    torch.save(moco_v2_checkpoint("resnet18", mlp=True, dim=16, seed=1)[0], other_teacher)
    _fails(_args(data, tmp_path / "a", str(other_teacher), "--bingo-bags", str(bags)), capsys,
           f"--bingo-bags {bags} was built from another teacher")
    _fails(_args(data, tmp_path / "b", teacher, "--bingo-bags", str(bags), "--max-images", "40"), capsys,
           "another image set (max_images 0 there, 40 here", "num_images 48 there, 40 here")
    _fails(_args(data, tmp_path / "c", teacher, "--bingo-bags", str(bags), "--bingo-k", "4"), capsys,
           "holds bags of 3 images, not --bingo-k 4")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_bad_bingo_settings_are_refused_before_any_work(data, teacher, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(_args(data, out, teacher, "--bingo-k", "48"), capsys, "--bingo-k 48: a bag holds 1 to 47 other images")
    _fails(_args(data, out, teacher, "--bingo-queue", "20"), capsys, "--bingo-queue 20 is not divisible by the "
           "global batch size 8")
    _fails(_args(data, out, teacher, "--bingo-bags", str(tmp_path / "none.pt")), capsys, "no such file")
    _fails(_args(data, out, teacher, "--bingo-t", "0"), capsys, "--bingo-t")
    _fails(_args(data, out, teacher, "--moco-dim", "8"), capsys, "--bingo-weight compares embeddings")
    headless = moco_v2_checkpoint("resnet18", mlp=True, dim=16)[0]
    headless["state_dict"] = {k: v for k, v in headless["state_dict"].items() if ".fc." not in k}
    torch.save(headless, tmp_path / "headless.pth.tar")
    _fails(_args(data, out, str(tmp_path / "headless.pth.tar")), capsys, "has no projection head")
    _fails([*_args(data, out, teacher, bingo=False), "--bingo-bags", "x.pt"], capsys, "give --bingo-weight")
    assert not out.exists() or not any(out.iterdir())


def test_a_resume_refuses_bags_that_changed(data, teacher, tmp_path, capsys):
    out = tmp_path / "run"
    main_moco_mgd.main(_args(data, out, teacher, epochs=1))
    bags = torch.load(out / BAG_FILE, weights_only=True)
    bags["bags"] = bags["bags"].flip(1)
    torch.save(bags, out / BAG_FILE)
    saved = (out / "checkpoint_0000.pth.tar").read_bytes()
    with pytest.raises(ValueError, match="trained with the bags of sha256 .* is another file"):
        main_moco_mgd.main(_args(data, out, teacher, epochs=2))
    assert (out / "checkpoint_0000.pth.tar").read_bytes() == saved and not (out / "checkpoint_0001.pth.tar").exists()
