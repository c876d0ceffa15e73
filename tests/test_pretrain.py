"""main_moco_mgd.py end to end on tiny generated images, in 1 and 2 processes."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main_moco_mgd
from moco_mgd.models.resnet import build_resnet
from moco_mgd.checkpoints.files import list_checkpoints
from moco_mgd.runtime.logs import read_metrics
from moco_mgd.training.engine import NonFiniteLossError
from moco_mgd.training.schedules import learning_rate
from tests.helpers import free_port, make_image_folder

REPO = Path(__file__).resolve().parents[1]
KNN = ["--knn-freq", "1", "--knn-k", "4"]


def _args(data_dir, out, teacher=None, epochs=2, extra=()):
    args = [data_dir, "-a", "resnet18", "--epochs", str(epochs), "-b", "8", "--moco-k", "16",
            "--moco-dim", "16", "-j", "0", "--image-size", "32", "--seed", "0", "--mlp", "--aug-plus",
            "--output-dir", str(out), "-p", "1", "--keep-checkpoints", "0", "--lr", "0.01"]
    if teacher:
        args += ["--teacher-checkpoint", teacher, "--mgd-samples", "12", "--mgd-schedule", "0,1"]
    return args + list(extra)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_state(a, b):
    assert a["epoch"] == b["epoch"]
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    if a["mgd"] is not None:
        for key in a["mgd"]:
            assert torch.equal(a["mgd"][key], b["mgd"][key]), key


@pytest.fixture(scope="module")
def mgd_run(data_dir, teacher_path, module_dir):
    out = module_dir("mgd_run")
    main_moco_mgd.main(_args(data_dir, out, teacher_path, epochs=2, extra=KNN))
    return out


def test_mgd_pretraining_writes_moco_layout_checkpoints(mgd_run):
    checkpoints = list_checkpoints(mgd_run)
    assert [p.name for p in checkpoints] == ["checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar"]
    state = _load(checkpoints[-1])
    assert state["epoch"] == 2 and state["arch"] == "resnet18"
    keys = state["state_dict"].keys()
    assert {"module.queue", "module.queue_ptr"} <= keys
    assert all(k.startswith(("module.encoder_q.", "module.encoder_k.", "module.queue")) for k in keys)
    # MoCo's main_lincls.py rule: keep module.encoder_q minus fc, strip the prefix.
    backbone = {k[len("module.encoder_q."):]: v for k, v in state["state_dict"].items()
                if k.startswith("module.encoder_q.") and not k.startswith("module.encoder_q.fc")}
    result = build_resnet("resnet18").load_state_dict(backbone, strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys
    assert state["mgd"]["assignment3"].shape == (2048,) and int(state["mgd"]["num_matchings"]) == 2
    assert state["config"]["teacher_arch"] == "resnet50" and state["config"]["mgd_reducer"] == "amp"
    assert {"torch", "python", "numpy"} <= state["rng"].keys()


def test_logs_and_metrics_are_written(mgd_run):
    import json

    records = [json.loads(line) for line in (mgd_run / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"train", "epoch", "matching"} <= kinds
    train = [r for r in records if r["kind"] == "train"][0]
    assert {"infonce", "mgd", "mgd_layer1", "mgd_layer4", "acc1", "images_per_s"} <= train.keys()
    # The contrastive diagnostics, every -p iterations and as epoch means, and in the log lines.
    diagnostics = {"pos_sim", "neg_sim", "query_cos", "inst_acc"}
    for record in [r for r in records if r["kind"] in ("train", "epoch")]:
        assert diagnostics <= record.keys()
        assert all(-1 - 1e-5 <= record[k] <= 1 + 1e-5 for k in ("pos_sim", "neg_sim", "query_cos"))
        assert 0 <= record["inst_acc"] <= 100
    log = (mgd_run / "log.txt").read_text()
    assert "cos(q,k+)" in log and "cos(q,queue)" in log and "cos(q,q')" in log and "inst-acc" in log
    knn = [r for r in records if r["kind"] == "knn"]
    assert [r["epoch"] for r in knn] == [1, 2] and all(0 <= r["top1"] <= 100 for r in knn)
    assert len([r for r in records if r["kind"] == "knn_teacher"]) == 1
    matching = [r for r in records if r["kind"] == "matching"]
    assert [m["epoch"] for m in matching] == [0, 1]
    # The whole assignment of every update is logged (the stability figure reads it); the last equals
    # the checkpoint's.
    final = _load(mgd_run / "checkpoint_0001.pth.tar")["mgd"]
    for i, stage in enumerate(["layer1", "layer2", "layer3", "layer4"]):
        assert matching[-1]["assignment"][stage] == final[f"assignment{i}"].tolist()
    log = (mgd_run / "log.txt").read_text()
    assert "matching after 0 epoch(s)" in log and "InfoNCE" in log and "img/s" in log
    # The run draws its figures at the end, from this log.
    for name in ("matching_cost.png", "assignment_stability.png", "training_curves.png"):
        assert (mgd_run / name).read_bytes()[:4] == b"\x89PNG", name
    assert "figures: " in log


def test_resume_gives_the_same_result_as_not_stopping(mgd_run, data_dir, teacher_path, tmp_path):
    # The straight run's epoch-0 checkpoint is exactly what a run stopped after 1 epoch leaves.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "checkpoint_0000.pth.tar").write_bytes((mgd_run / "checkpoint_0000.pth.tar").read_bytes())
    main_moco_mgd.main(_args(data_dir, stopped, teacher_path, epochs=2, extra=KNN))   # resumes by itself
    _assert_same_state(_load(stopped / "checkpoint_0001.pth.tar"), _load(mgd_run / "checkpoint_0001.pth.tar"))
    # The resumed run re-evaluates nothing it had done: no second teacher reference line.
    assert "knn_teacher" not in (stopped / "metrics.jsonl").read_text()
    assert "resumed from" in (stopped / "log.txt").read_text()


def test_mgd_without_matching_keeps_the_in_order_assignment(data_dir, teacher_path, tmp_path):
    main_moco_mgd.main(_args(data_dir, tmp_path, teacher_path, epochs=1, extra=["--mgd-schedule", "none"]))
    state = _load(tmp_path / "checkpoint_0000.pth.tar")["mgd"]
    # ResNet-50 layer1 has 256 channels, ResNet-18's 64: teacher channel j goes to student j // 4.
    assert state["assignment0"].tolist() == [j // 4 for j in range(256)]
    assert int(state["num_matchings"]) == 1
    assert '"kind": "matching"' not in (tmp_path / "metrics.jsonl").read_text()
    assert "never matched" in (tmp_path / "log.txt").read_text()


def test_a_stage_of_weight_zero_is_left_out_of_the_loss(data_dir, teacher_path, tmp_path):
    main_moco_mgd.main(_args(data_dir, tmp_path, teacher_path, epochs=1,
                             extra=["--mgd-stage-weights", "0.125", "0.25", "0.5", "0"]))
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert train and all(r["mgd_layer4"] == 0 for r in train)
    assert all(r["mgd_layer1"] > 0 and r["mgd_layer3"] > 0 for r in train)
    assert all(r["mgd"] == pytest.approx(r["mgd_layer1"] + r["mgd_layer2"] + r["mgd_layer3"], rel=1e-4) for r in train)
    assert _load(tmp_path / "checkpoint_0000.pth.tar")["config"]["mgd_stage_weights"] == [0.125, 0.25, 0.5, 0.0]


def test_plain_moco_without_teacher_on_the_cosine_schedule(data_dir, tmp_path):
    main_moco_mgd.main(_args(data_dir, tmp_path, epochs=3, extra=["--cos"]))
    state = _load(tmp_path / "checkpoint_0002.pth.tar")
    assert state["mgd"] is None and state["config"]["cos"] is True
    # --cos: the half-cosine from --lr 0.01 over 3 epochs, 0.01, 0.0075, 0.0025, not the step
    # schedule's constant 0.01 (its milestones 120, 160 are past the end).
    epochs = [r for r in read_metrics(tmp_path) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    for record in epochs:
        assert record["lr"] == pytest.approx(learning_rate(0.01, record["epoch"], 3, True, [120, 160]), rel=1e-12)
    assert [r["lr"] for r in epochs] == pytest.approx([0.01, 0.0075, 0.0025], rel=1e-12)
    # The optimizer really ran at that rate: the last checkpoint's groups hold the last epoch's.
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([0.0025], rel=1e-12)
    assert "lr 0.0075" in (tmp_path / "log.txt").read_text()


def _records(out: Path, kind: str = "train") -> list[tuple[int, int]]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [(r["epoch"], r["iteration"]) for r in map(json.loads, lines) if r["kind"] == kind]


def _stop_at(cmd, out: Path, point: tuple[int, int], send, env) -> int:
    """Start ``cmd``; once it has logged training past ``point`` (epoch, iteration), ``send(process)``
    a signal; return its exit code."""
    with open(out.parent / f"{out.name}-{point}.log", "w") as log:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not any(r >= point for r in _records(out)):
            assert process.poll() is None and time.monotonic() < deadline, (out.parent / f"{out.name}-{point}.log").read_text()[-3000:]
            time.sleep(0.05)
        send(process)
        return process.wait(timeout=300)


def _stops_and_resumes(out: Path) -> tuple[list, list]:
    log = (out / "log.txt").read_text()
    stops = re.findall(r"(SIG\w+): every process stopped after epoch (\d+) iteration (\d+)/", log)
    resumes = re.findall(r"resumed from \S+ at epoch (\d+)(?: iteration (\d+))? \((\d+) iteration", log)
    return stops, [(None, e, i or "0", redone) for e, i, redone in resumes]


@pytest.fixture(scope="module")
def six_step_data(module_dir):
    """48 images: 6 iterations per epoch at -b 8, room to stop in the middle of one."""
    return make_image_folder(str(module_dir("data48")), splits=("train",), per_class=24)


def test_signals_stop_mid_epoch_and_the_resumed_run_ends_bitwise_equal(six_step_data, teacher_path, tmp_path):
    """USR2, SIGTERM and Ctrl-C at real moments of one process (with 2 loader workers, which the
    signals do not kill): each saves mid-epoch and exits with 128 + the signal; the same command
    then goes on. The end is the uninterrupted -j 0 run's, bit for bit: a sample's augmentations do
    not depend on the loader workers either."""
    reference = tmp_path / "reference"
    main_moco_mgd.main(_args(six_step_data, reference, teacher_path, epochs=2))
    out = tmp_path / "stopped"
    cmd = [sys.executable, "main_moco_mgd.py", *_args(six_step_data, out, teacher_path, epochs=2, extra=["-j", "2"])]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}   # the reference's arithmetic
    for point, signum in (((0, 1), signal.SIGUSR2), ((0, 4), signal.SIGTERM), ((1, 2), signal.SIGINT)):
        code = _stop_at(cmd, out, point, lambda p: p.send_signal(signum), env)
        assert code == 128 + signum, (out / "log.txt").read_text()[-3000:]
    final = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    _assert_same_state(_load(out / "checkpoint_0001.pth.tar"), _load(reference / "checkpoint_0001.pth.tar"))
    stops, resumes = _stops_and_resumes(out)
    assert [s[0] for s in stops] == ["SIGUSR2", "SIGTERM", "SIGINT"]
    assert [(e, i) for _, e, i in stops] == [(e, i) for _, e, i, _ in resumes]
    assert [r[3] for r in resumes] == ["0", "0", "0"]          # nothing trained twice
    # The epoch means come out the same too: a resumed epoch carries the sums of its first part.
    epochs = lambda out: [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(out)
                          if r["kind"] == "epoch"]
    assert epochs(out) == epochs(reference)
    assert not list(out.glob("checkpoint_*_iter*"))            # superseded by the epoch ends
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar"]


def test_two_processes_stopped_and_resumed_across_launchers(six_step_data, teacher_path, tmp_path):
    """torchrun runs the reference; an mp.spawn run (--multiprocessing-distributed) gets a Ctrl-C
    on its whole process group, as from a terminal; torchrun resumes it and gets a SIGTERM on its
    own process (it passes it on); mp.spawn finishes it. Same weights as the reference."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = lambda out: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(free_port()), "main_moco_mgd.py", *_args(six_step_data, out, teacher_path),
                            "--dist-url", "env://", "--dist-backend", "gloo"]
    spawn = lambda out: [sys.executable, "main_moco_mgd.py", *_args(six_step_data, out, teacher_path),
                         "--multiprocessing-distributed", "--nproc-per-node", "2", "--world-size", "1", "--rank", "0",
                         "--dist-url", f"tcp://127.0.0.1:{free_port()}"]
    reference = tmp_path / "reference"
    result = subprocess.run(torchrun(reference), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (reference / "log.txt").read_text()
    assert "2 process(es) x 4 images" in log
    assert "matching after 0 epoch(s): 12 images (6 on this rank)" in log  # both ranks' shards summed
    matching = [r for r in read_metrics(reference) if r["kind"] == "matching"]
    assert [(m["epoch"], m["num_images"]) for m in matching] == [(0, 12), (1, 12)]

    out = tmp_path / "stopped"
    assert _stop_at(spawn(out), out, (0, 1), lambda p: os.killpg(p.pid, signal.SIGINT), env) == 130
    _stop_at(torchrun(out), out, (1, 1), lambda p: p.send_signal(signal.SIGTERM), env)  # torchrun's own code
    result = subprocess.run(spawn(out), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _assert_same_state(_load(out / "checkpoint_0001.pth.tar"), _load(reference / "checkpoint_0001.pth.tar"))
    stops, resumes = _stops_and_resumes(out)
    assert [s[0] for s in stops] == ["SIGINT", "SIGTERM"]
    assert [(e, i) for _, e, i in stops] == [(e, i) for _, e, i, _ in resumes]
    assert [r[3] for r in resumes] == ["0", "0"]


# --- bad input: a clear error before training, nothing saved is overwritten ---------

def _fails(args, capsys, *fragments):
    with pytest.raises(SystemExit) as info:
        main_moco_mgd.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_missing_or_empty_data(tmp_path, capsys):
    _fails(_args(str(tmp_path / "nope"), tmp_path / "o1"), capsys, "nope")
    (tmp_path / "empty").mkdir()
    _fails(_args(str(tmp_path / "empty"), tmp_path / "o2"), capsys, "train")
    (tmp_path / "hollow" / "train").mkdir(parents=True)
    _fails(_args(str(tmp_path / "hollow"), tmp_path / "o3"), capsys, "train")


def test_queue_not_divisible_by_global_batch(data_dir, tmp_path, capsys):
    _fails(_args(data_dir, tmp_path, extra=["--moco-k", "20"]), capsys, "--moco-k 20 is not divisible",
           "global batch size 8")


def test_batch_smaller_than_processes(data_dir, tmp_path, capsys):
    _fails(_args(data_dir, tmp_path, extra=["-b", "1", "--multiprocessing-distributed", "--nproc-per-node", "2"]),
           capsys, "smaller than the 2 processes")


def test_teacher_of_another_architecture(data_dir, teacher_path, tmp_path, capsys):
    _fails(_args(data_dir, tmp_path, teacher_path, extra=["--teacher-arch", "resnet101"]), capsys,
           "does not fit resnet101", "look like a resnet50")


def test_output_dir_not_writable(data_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _fails(_args(data_dir, blocker / "out"), capsys, "is not writable")


def test_resume_from_another_architecture(mgd_run, data_dir, teacher_path, tmp_path, capsys):
    _fails(_args(data_dir, tmp_path, teacher_path, extra=["-a", "resnet34", "--resume",
                                                           str(mgd_run / "checkpoint_0000.pth.tar")]),
           capsys, "cannot resume", "'resnet18' vs 'resnet34'")


def test_resume_a_plain_moco_run_with_mgd_on(data_dir, teacher_path, tmp_path, capsys):
    main_moco_mgd.main(_args(data_dir, tmp_path, epochs=1))
    _fails(_args(data_dir, tmp_path, teacher_path, epochs=2), capsys, "without MGD while MGD is on")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(mgd_run, data_dir, teacher_path, tmp_path):
    (tmp_path / "checkpoint_0000.pth.tar").write_bytes((mgd_run / "checkpoint_0000.pth.tar").read_bytes())
    digest = hashlib.sha256((tmp_path / "checkpoint_0000.pth.tar").read_bytes()).hexdigest()
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 1 iteration 0"):
        main_moco_mgd.main(_args(data_dir, tmp_path, teacher_path, extra=["--mgd-loss-factor", "1e-45"]))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_0000.pth.tar"]
    assert hashlib.sha256((tmp_path / "checkpoint_0000.pth.tar").read_bytes()).hexdigest() == digest
