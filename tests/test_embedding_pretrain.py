"""main_moco_mgd.py with the embedding losses (CCKD, DisCo, SEED), alone and with MGD, end to end."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main_moco_mgd
from tests.helpers import free_port
from tests.test_pretrain import REPO, _args, _assert_same_state, _fails, _load

# The conftest teacher is a ResNet-50 with a MoCo-v2 head of 128 outputs: DisCo and SEED need
# the student's embedding to match it. SEED's queue holds two global batches of 8.
ALL_LOSSES = ["--moco-dim", "128", "--cckd-weight", "1", "--disco-weight", "2", "--disco-both-views",
              "--mlp-hidden-dim", "64", "--seed-weight", "0.5", "--seed-queue", "16"]


@pytest.fixture(scope="module")
def combined_run(data_dir, teacher_path, module_dir):
    out = module_dir("combined_run")
    main_moco_mgd.main(_args(data_dir, out, teacher_path, epochs=2, extra=ALL_LOSSES))
    return out


def test_mgd_and_all_embedding_losses_train_together(combined_run):
    state = _load(combined_run / "checkpoint_0001.pth.tar")
    assert state["mgd"] is not None                                    # MGD still on
    assert state["state_dict"]["module.encoder_q.fc.0.weight"].shape == (64, 512)   # DisCo's wider head
    queue = state["embedding"]["seed_queue.queue"]
    assert queue.shape == (128, 16)
    assert torch.allclose(queue.norm(dim=0), torch.ones(16))           # filled with normalised teacher embeddings
    records = [json.loads(line) for line in (combined_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    for record in train:
        for name in ("infonce", "mgd", "cckd", "disco", "seed"):
            assert math.isfinite(record[name]), (name, record)
    assert all(r["disco"] <= 8.0 for r in train)                       # two views of a distance in [0, 4]
    log = (combined_run / "log.txt").read_text()
    assert "embedding losses cckd, disco, seed" in log and " seed " in log


def test_resume_restores_the_seed_queue_exactly(combined_run, data_dir, teacher_path, tmp_path):
    (tmp_path / "checkpoint_0000.pth.tar").write_bytes((combined_run / "checkpoint_0000.pth.tar").read_bytes())
    main_moco_mgd.main(_args(data_dir, tmp_path, teacher_path, epochs=2, extra=ALL_LOSSES))
    resumed, straight = _load(tmp_path / "checkpoint_0001.pth.tar"), _load(combined_run / "checkpoint_0001.pth.tar")
    _assert_same_state(resumed, straight)
    for key, value in straight["embedding"].items():
        assert torch.equal(resumed["embedding"][key], value), key


def test_embedding_loss_without_mgd(data_dir, teacher_path, tmp_path):
    main_moco_mgd.main(_args(data_dir, tmp_path, teacher_path, epochs=1,
                             extra=["--no-mgd", "--cckd-weight", "1", "--cckd-kernel", "cosine"]))
    state = _load(tmp_path / "checkpoint_0000.pth.tar")
    assert state["mgd"] is None and state["embedding"] == {}           # CCKD holds no state
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert '"cckd"' in metrics and '"kind": "matching"' not in metrics and '"mgd"' not in metrics


def _processes_running(fragment: str) -> list[str]:
    """The command lines of the live processes that name ``fragment`` (zombies have none)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:   # ended while we looked
            continue
        if fragment in text:
            found.append(text)
    return found


def test_a_run_without_mgd_ends_with_its_loader_worker(data_dir, teacher_path, tmp_path):
    """Issue 26's hang: a teacher, MGD off, an embedding loss and a loader worker. The finished run
    stayed alive forever, waiting for a worker that ignored multiprocessing's SIGTERM (7 of 7 runs)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "main_moco_mgd.py",
           *_args(data_dir, out, teacher_path, epochs=1, extra=["--no-mgd", "--cckd-weight", "1e-9", "-j", "1",
                                                                "-p", "1000"])]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("the run did not exit in 120 s: " + (out / "log.txt").read_text()[-1000:])
    ended = time.time()
    assert process.returncode == 0, err[-3000:]
    log = out / "log.txt"
    assert "figures: " in log.read_text().splitlines()[-1]
    assert ended - log.stat().st_mtime < 5.0   # the last log line, then the exit: no 5 s join of a stuck worker
    assert _processes_running(str(out)) == []


def test_two_processes_with_every_loss(data_dir, teacher_path, tmp_path):
    main_moco_mgd.main(_args(data_dir, tmp_path, teacher_path, epochs=1, extra=ALL_LOSSES) + [
        "--multiprocessing-distributed", "--nproc-per-node", "2", "--world-size", "1", "--rank", "0",
        "--dist-url", f"tcp://127.0.0.1:{free_port()}"])
    state = _load(tmp_path / "checkpoint_0000.pth.tar")
    assert "2 process(es) x 4 images" in (tmp_path / "log.txt").read_text()
    # Both ranks enqueue their teacher embeddings: the queue is full of unit columns after one epoch.
    assert torch.allclose(state["embedding"]["seed_queue.queue"].norm(dim=0), torch.ones(16))


def test_embedding_loss_without_a_teacher(data_dir, tmp_path, capsys):
    _fails(_args(data_dir, tmp_path, extra=["--seed-weight", "1"]), capsys, "pass --teacher-checkpoint")


def test_seed_queue_not_divisible_by_global_batch(data_dir, teacher_path, tmp_path, capsys):
    _fails(_args(data_dir, tmp_path, teacher_path, extra=["--moco-dim", "128", "--seed-weight", "1",
                                                            "--seed-queue", "20"]),
           capsys, "--seed-queue 20 is not divisible by the global batch size 8")


def test_wider_head_needs_the_mlp(data_dir, tmp_path, capsys):
    args = [a for a in _args(data_dir, tmp_path) if a != "--mlp"]
    _fails(args + ["--mlp-hidden-dim", "64"], capsys, "--mlp-hidden-dim 64 widens the MoCo-v2 MLP head: add --mlp")


def test_embedding_bn_needs_the_mlp(data_dir, tmp_path, capsys):
    args = [a for a in _args(data_dir, tmp_path) if a != "--mlp"]
    _fails(args + ["--embedding-bn"], capsys, "--embedding-bn is a layer of the MoCo-v2 MLP head: add --mlp")


def test_embedding_size_must_match_the_teacher_for_disco(data_dir, teacher_path, tmp_path, capsys):
    _fails(_args(data_dir, tmp_path, teacher_path, extra=["--disco-weight", "1"]), capsys,
           "--disco-weight compares embeddings", "set --moco-dim 128")


def test_teacher_without_head(data_dir, tmp_path, capsys):
    from moco_mgd.models.resnet import build_resnet

    path = tmp_path / "torchvision_resnet50.pth"
    torch.save({k: v for k, v in build_resnet("resnet50").state_dict().items() if not k.startswith("fc.")}, path)
    _fails(_args(data_dir, tmp_path / "out", str(path), extra=["--cckd-weight", "1"]), capsys,
           "has no projection head")


def test_resume_without_seed_queue_while_seed_is_on(data_dir, teacher_path, tmp_path, capsys):
    main_moco_mgd.main(_args(data_dir, tmp_path, teacher_path, epochs=1, extra=["--moco-dim", "128"]))
    _fails(_args(data_dir, tmp_path, teacher_path, epochs=2, extra=["--moco-dim", "128", "--seed-weight", "1",
                                                                     "--seed-queue", "16"]),
           capsys, "has no SEED queue while --seed-weight is on")
