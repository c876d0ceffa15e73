"""slurm/submit.py: argument handling (no SLURM needed) and jobs on a real single-node SLURM cluster.

The cluster tests stand the cluster up with ``slurm/local_cluster.sh setup`` (root + apt-get; about
15 s once the packages are installed) and tear it down at the end; a cluster that already answers is
reused and left running. Where SLURM cannot be installed they skip, saying why, except under CI
(``CI`` set): there they fail.
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from moco_mgd.checkpoints.files import checkpoint_path, list_checkpoints
from slurm import submit
from tests.helpers import free_port, make_image_folder, moco_v2_checkpoint

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
JOB_TIMEOUT = 240  # seconds a tiny CPU job may take, queueing included


def _train_args(data, teacher=None, epochs=2, extra=()):
    args = [str(data), "-a", "resnet18", "--epochs", str(epochs), "-b", "8", "--moco-k", "16", "--moco-dim", "16",
            "-j", "0", "--image-size", "32", "--seed", "0", "--mlp", "--aug-plus", "-p", "1",
            "--keep-checkpoints", "0", "--lr", "0.01"]
    if teacher:
        args += ["--teacher-checkpoint", teacher, "--mgd-samples", "12", "--mgd-schedule", "0,1"]
    return args + list(extra)


def _cpu_cluster_args(job_dir, tasks=1, extra=()):
    return ["--ngpus", "0", "--tasks-per-node", str(tasks), "--cpus-per-task", "1", "--mem-gb", "2",
            "--timeout", "60", "--job-dir", str(job_dir), *extra]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# --- argument handling: no SLURM needed ---------------------------------------------------

@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An ``sbatch`` on PATH that fails if anything actually submits."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'fake sbatch: nothing should be submitted' >&2\nexit 99\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return sbatch


def test_cluster_flags_parse_and_training_flags_pass_through(data_dir, teacher_path, tmp_path):
    plan = submit.prepare("pretrain", _train_args(data_dir, teacher_path, extra=[
        "--moco-t", "0.2", "--mgd-reducer", "sm", "--cos", "--nodes", "2", "--ngpus", "4", "--partition", "learnfair",
        "--timeout", "600", "--account", "acc", "--qos", "high", "--constraint", "volta32gb", "--comment", "c",
        "--mem-per-gpu", "32", "--max-requeues", "5", "--job-dir", str(tmp_path / "jobs" / "%j"),
        "-b", "16", "--moco-k", "128"]))
    c = plan.config
    assert (c.arch, c.moco_t, c.mgd_reducer, c.cos, c.batch_size, c.moco_k) == ("resnet18", 0.2, "sm", True, 16, 128)
    assert c.teacher_checkpoint == teacher_path and c.data == os.path.abspath(data_dir)
    assert plan.world_size == 8 and plan.tasks_per_node == 4
    s = plan.slurm
    assert (s["nodes"], s["tasks_per_node"], s["gpus_per_node"], s["cpus_per_task"], s["timeout_min"]) == (2, 4, 4, 10, 600)
    assert (s["slurm_partition"], s["slurm_account"], s["slurm_qos"], s["slurm_constraint"], s["slurm_comment"]) == (
        "learnfair", "acc", "high", "volta32gb", "c")
    assert s["slurm_mem_per_gpu"] == "32G" and "mem_gb" not in s and plan.args.max_requeues == 5


def test_defaults_and_cpu_tasks(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = submit.prepare("pretrain", _train_args(data_dir, extra=["-b", "64", "--moco-k", "512"]))
    assert plan.tasks_per_node == 8 and plan.slurm["gpus_per_node"] == 8 and plan.slurm["cpus_per_task"] == 10
    assert plan.slurm["timeout_min"] == 4320 and "slurm_partition" not in plan.slurm
    assert plan.job_dir == str(tmp_path / "runs" / "%j")
    plan = submit.prepare("pretrain", _train_args(data_dir, extra=["--ngpus", "0", "--mem-gb", "3"]))
    assert plan.tasks_per_node == 1 and "gpus_per_node" not in plan.slurm and plan.slurm["mem_gb"] == 3
    assert plan.slurm["cpus_per_task"] == 1


def test_job_id_in_job_dir_and_output_dir(data_dir, tmp_path):
    plan = submit.prepare("pretrain", _train_args(data_dir, extra=_cpu_cluster_args(tmp_path / "exp_%j" / "run")))
    assert plan.config.output_dir == str(tmp_path / "exp_%j" / "run")   # resolved inside the job
    assert submit.resolve_job_id(plan.config.output_dir, "123") == str(tmp_path / "exp_123" / "run")
    assert not list(tmp_path.glob("exp_*"))                              # nothing created before the id is known
    assert not list(tmp_path.glob(".submit-check-*"))                    # the scratch check dir is gone
    explicit = tmp_path / "elsewhere"
    plan = submit.prepare("pretrain", _train_args(data_dir, extra=[*_cpu_cluster_args(tmp_path / "%j"),
                                                                   "--output-dir", str(explicit)]))
    assert plan.config.output_dir == str(explicit) and plan.job_dir == str(tmp_path / "%j")


def _below_ephemeral_ports(ports) -> bool:
    """All in 20000-32767 and below this machine's ephemeral range (where CI once found its port taken)."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return all(20000 <= port < min(32768, ephemeral_low) for port in ports)


def test_rendezvous_port_avoids_ephemeral_ports_and_moves_on_requeue():
    """CI once failed a requeue with EADDRINUSE: the job-id port (then up to 60000) was held as the local
    port of some outgoing connection. The port now stays below this machine's ephemeral range."""
    for job_id in [str(i) for i in range(1000)] + ["42_3", "123456789"]:
        ports = [submit.rendezvous_port(job_id, restart) for restart in range(12)]
        assert _below_ephemeral_ports(ports), (job_id, ports)
        assert len(set(ports)) == len(ports), (job_id, ports)          # each requeue its own port
        assert ports[0] == submit.rendezvous_port(job_id)              # every task computes the same


def test_free_local_port_is_below_the_ephemeral_range_and_binds():
    """The one-machine rendezvous of the tests and benchmarks follows the same rule, and a store binds it."""
    import datetime

    import torch.distributed as dist

    ports = {free_port() for _ in range(20)}
    assert _below_ephemeral_ports(ports), ports
    assert len(ports) > 1                                              # drawn, not one fixed port
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=10))
    store.set("k", "v")
    assert store.get("k") == b"v"


def test_checkpoint_requeues_the_same_configuration(data_dir, tmp_path):
    import submitit

    plan = submit.prepare("pretrain", _train_args(data_dir, extra=_cpu_cluster_args(tmp_path / "%j")))
    trainer = submit.Trainer("pretrain", plan.config)
    delayed = trainer.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function.config == plan.config and delayed.function.requeued
    # after a requeue, an explicit --resume never wins over what the job saved since
    out = tmp_path / "out"
    out.mkdir()
    config = dataclasses.replace(plan.config, output_dir=str(out), resume="/old.pth.tar")
    assert delayed.function._resume_point(config).resume == "/old.pth.tar"   # nothing saved yet
    torch.save({"epoch": 1}, out / "checkpoint_0000.pth.tar")
    assert delayed.function._resume_point(config).resume == ""               # pretrain() picks the newest
    assert trainer._resume_point(config).resume == "/old.pth.tar"             # the first run: as asked


def test_the_requeue_outlives_the_sigterm_slurm_sends_for_it():
    """SLURM answers ``scontrol requeue`` with SIGTERM to every process of the step, scontrol included.
    In one CI run it landed first: scontrol died and submitit recorded the requeued job as failed. Here
    the requeue handler (submitit's in a job) runs a child that gets that SIGTERM before it is done."""
    seen = {}

    def requeue(signum, frame):
        child = subprocess.run(["sh", "-c", "kill -TERM $$; echo requeued"], capture_output=True, text=True)
        seen["child"] = (child.returncode, child.stdout.strip())
        raise SystemExit(0)   # submitit exits once the job is requeued

    handlers = signal.signal(signal.SIGUSR2, requeue), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            submit.Trainer._after_stop(frozenset({signal.SIGUSR2}))
        assert seen["child"] == (0, "requeued")
        assert signal.getsignal(signal.SIGTERM) is handlers[1]   # put back afterwards
    finally:
        signal.signal(signal.SIGUSR2, handlers[0])


def test_lincls_flags_pass_through(data_dir, tmp_path):
    checkpoint, _ = moco_v2_checkpoint("resnet18", mlp=True)
    torch.save(checkpoint, tmp_path / "moco.pth.tar")
    plan = submit.prepare("lincls", [str(data_dir), "-a", "resnet18", "-b", "8", "--image-size", "32", "--lr", "5",
                                     "--pretrained", str(tmp_path / "moco.pth.tar"), "--cached-features",
                                     *_cpu_cluster_args(tmp_path / "%j", tasks=2)])
    c = plan.config
    assert (c.arch, c.lr, c.cached_features, c.pretrained) == ("resnet18", 5.0, True, str(tmp_path / "moco.pth.tar"))
    assert plan.world_size == 2 and plan.slurm["tasks_per_node"] == 2


def _fails(argv, capsys, *fragments):
    with pytest.raises(SystemExit) as info:
        submit.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_no_sbatch_on_path(data_dir, tmp_path):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    result = subprocess.run([sys.executable, str(REPO / "slurm" / "submit.py"), "pretrain",
                             *_train_args(data_dir, extra=_cpu_cluster_args(tmp_path / "%j"))],
                            env={**os.environ, "PATH": str(empty)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "no SLURM on this machine (sbatch is not on PATH)" in result.stderr
    assert "main_moco_mgd.py" in result.stderr and "torchrun" in result.stderr


def test_unknown_entry_point(capsys):
    _fails(["train"], capsys, "pretrain or lincls")


def test_job_dir_not_writable(fake_sbatch, data_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _fails(["pretrain", *_train_args(data_dir, extra=_cpu_cluster_args(blocker / "%j"))], capsys,
           "--job-dir", "is not writable")


def test_more_tasks_than_the_batch_can_be_split_over(fake_sbatch, data_dir, tmp_path, capsys):
    _fails(["pretrain", *_train_args(data_dir, extra=[*_cpu_cluster_args(tmp_path / "%j", tasks=4), "-b", "2"])],
           capsys, "-b/--batch-size 2", "--tasks-per-node")


def test_queue_not_divisible_by_the_global_batch(fake_sbatch, data_dir, tmp_path, capsys):
    # 2 nodes x 2 tasks x 4 images = 16 per step; K = 24 is not a multiple
    _fails(["pretrain", *_train_args(data_dir, extra=[*_cpu_cluster_args(tmp_path / "%j", tasks=2), "--nodes", "2",
                                                      "--moco-k", "24"])],
           capsys, "--moco-k 24 is not divisible by the global batch size 16")


def test_missing_teacher_and_pretrained(fake_sbatch, data_dir, tmp_path, capsys):
    _fails(["pretrain", *_train_args(data_dir, str(tmp_path / "nope.pth.tar"), extra=_cpu_cluster_args(tmp_path / "%j"))],
           capsys, "--teacher-checkpoint", "nope.pth.tar", "does not exist")
    _fails(["lincls", str(data_dir), "-a", "resnet18", "--pretrained", str(tmp_path / "gone.pth.tar"),
            *_cpu_cluster_args(tmp_path / "%j")], capsys, "--pretrained", "gone.pth.tar", "does not exist")


def test_entry_script_checks_still_apply(fake_sbatch, tmp_path, capsys):
    _fails(["pretrain", *_train_args(tmp_path / "no_data", extra=_cpu_cluster_args(tmp_path / "%j"))], capsys,
           "no_data")


# --- a real single-node SLURM cluster ----------------------------------------------------

def _cannot(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so the SLURM tests must run, but: {reason}", pytrace=False)
    pytest.skip(f"no SLURM cluster: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Stand up the local cluster (or reuse one that answers); tear it down if this session started it."""
    state = tmp_path_factory.mktemp("slurm_state")
    # 4 CPUs on a 2-core machine: the preemption test runs its 1-task and 2-task jobs side by side.
    env = {**os.environ, "SLURM_LOCAL_STATE": str(state), "SLURM_LOCAL_CPUS": str(max(4, os.cpu_count() or 1))}
    if shutil.which("sinfo") and subprocess.run(["bash", str(CLUSTER), "status"], env=env,
                                                capture_output=True).returncode == 0:
        yield {"setup_s": 0.0, "reused": True}
        return
    if os.geteuid() != 0:
        _cannot("not root (slurm/local_cluster.sh installs and starts SLURM daemons)")
    if not shutil.which("apt-get"):
        _cannot("no apt-get to install SLURM with")
    start = time.monotonic()
    result = subprocess.run(["bash", str(CLUSTER), "setup"], env=env, capture_output=True, text=True, timeout=600)
    setup_s = time.monotonic() - start
    if result.returncode == 3:
        _cannot(result.stderr.strip() or result.stdout.strip())
    if result.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "teardown"], env=env, capture_output=True)
        pytest.fail(f"slurm/local_cluster.sh setup failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"\nSLURM cluster set up in {setup_s:.1f} s")
    (state / "setup_seconds").write_text(f"{setup_s:.1f}\n")
    try:
        yield {"setup_s": setup_s, "reused": False}
    finally:
        subprocess.run(["scancel", "--user", "root"], capture_output=True)
        down = subprocess.run(["bash", str(CLUSTER), "teardown"], env=env, capture_output=True, text=True)
        print(down.stdout)


def _wait(job, timeout=JOB_TIMEOUT):
    """The job's result once it is done (requeues included), or fail with its logs."""
    deadline = time.monotonic() + timeout
    while not job.done(force_check=True):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job.job_id)])
            pytest.fail(f"job {job.job_id} not done after {timeout} s:\n{_logs(job)}")
        time.sleep(1)
    try:
        return job.results()[0]   # task 0's (with several tasks, one result per task)
    except Exception as exc:  # noqa: BLE001 - show the job's own logs
        pytest.fail(f"job {job.job_id} failed ({exc}):\n{_logs(job)}")


def _logs(job):
    text = []
    for path in sorted(Path(job.paths.folder).glob(f"{job.job_id}_*_log.*")):
        text.append(f"--- {path.name}\n{path.read_text()[-3000:]}")
    return "\n".join(text)


def test_linear_eval_job(slurm_cluster, data_dir, tmp_path):
    checkpoint, _ = moco_v2_checkpoint("resnet18", mlp=True, dim=16)
    pretrained = tmp_path / "checkpoint_0001.pth.tar"
    torch.save(checkpoint, pretrained)
    job = submit.main(["lincls", str(data_dir), "-a", "resnet18", "--epochs", "2", "-b", "8", "-j", "0",
                       "--image-size", "32", "--seed", "0", "-p", "1", "--pretrained", str(pretrained),
                       *_cpu_cluster_args(tmp_path / "%j")])
    out = Path(_wait(job))
    state = _load(out / "checkpoint.pth.tar")
    assert state["epoch"] == 2 and state["arch"] == "resnet18"
    assert str(pretrained) in (out / "log.txt").read_text()


def _wait_for_file(path, job):
    deadline = time.monotonic() + JOB_TIMEOUT
    while not path.exists():
        assert time.monotonic() < deadline and not job.done(force_check=True), _logs(job)
        time.sleep(0.2)


def _train_records(out: Path) -> int:
    try:
        return sum('"kind": "train"' in line for line in (out / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


PREEMPTIONS = 10
PREEMPTED_EPOCHS = 6   # 60 iterations: each preemption costs a run 1-4 of them, however fast the machine


def _preempt(job, out: Path, moments: random.Random) -> None:
    """``PREEMPTIONS`` times: once a new run of the job has trained 1-3 iterations of its own (a
    random count, then a random moment inside the next), ``scancel --signal=USR2``; wait until that
    run has said where it stopped. Counted in iterations, not seconds, so that a fast machine does
    not finish the run before the last preemption."""
    last = checkpoint_path(out, PREEMPTED_EPOCHS - 1)
    for _ in range(PREEMPTIONS):
        seen = _train_records(out) + moments.randint(1, 3)
        deadline = time.monotonic() + JOB_TIMEOUT
        while _train_records(out) < seen:
            assert time.monotonic() < deadline and not job.done(force_check=True), _logs(job)
            time.sleep(0.02)
        time.sleep(moments.uniform(0.0, 0.2))
        assert not last.exists(), "the run ended before the 10th preemption"
        subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True)
        deadline = time.monotonic() + JOB_TIMEOUT
        while "stopped after epoch" not in (out / "log.txt").read_text().split("resumed from")[-1]:
            assert time.monotonic() < deadline, _logs(job)
            time.sleep(0.1)


def _check_ten_preemptions(job, tasks: int, out: Path, straight: Path) -> str:
    assert out.name == str(job.job_id)                       # %j in --job-dir resolved to the job id
    log = (out / "log.txt").read_text()
    assert f"{tasks} process(es) x {8 // tasks} images on cpu" in log.split("resumed from")[0]
    assert all((out / f"{job.job_id}_{task}_log.out").exists() for task in range(tasks))   # each task logged
    if tasks > 1:   # every run of the job met at the port of its SLURM_RESTART_COUNT
        met = re.findall(r"rendezvous tcp://\S+:(\d+) \(restart (\d+)\)", (out / f"{job.job_id}_0_log.out").read_text())
        assert [(int(p), int(r)) for p, r in met] == [(submit.rendezvous_port(job.job_id, r), r)
                                                      for r in range(PREEMPTIONS + 1)], met
    stops = re.findall(r"SIGUSR2: every process stopped after epoch (\d+) iteration (\d+)/10", log)
    resumes = re.findall(r"resumed from \S+ at epoch (\d+)(?: iteration (\d+))? \((\d+) iteration\(s\) trained again",
                         log)
    redone = [int(r[2]) for r in resumes]
    assert len(stops) == len(resumes) == PREEMPTIONS, log[-3000:]
    assert [(e, i) for e, i in stops] == [(e, i or "0") for e, i, _ in resumes]
    assert redone == [0] * PREEMPTIONS
    task_log = (out / f"{job.job_id}_0_log.err").read_text()
    assert task_log.count("this job is preempted") == PREEMPTIONS, task_log[-3000:]      # not time-outs
    restarts = subprocess.run(["scontrol", "show", "job", str(job.job_id)], capture_output=True, text=True).stdout
    assert f"Restarts={PREEMPTIONS}" in restarts, restarts
    final = _load(checkpoint_path(out, PREEMPTED_EPOCHS - 1))
    reference = _load(checkpoint_path(straight, PREEMPTED_EPOCHS - 1))
    assert final["epoch"] == reference["epoch"] == PREEMPTED_EPOCHS and final["arch"] == "resnet18"
    assert final["state_dict"].keys() == reference["state_dict"].keys()
    for key in reference["state_dict"]:
        assert torch.equal(final["state_dict"][key], reference["state_dict"][key]), key
    for key in reference["mgd"]:
        assert torch.equal(final["mgd"][key], reference["mgd"][key]), key
    assert list_checkpoints(out) == [checkpoint_path(out, e) for e in (PREEMPTED_EPOCHS - 2, PREEMPTED_EPOCHS - 1)]
    assert not [p.name for p in out.glob("checkpoint_*_iter*")]   # superseded by the epoch ends
    return f"stopped at (epoch, iteration) {stops}; iterations trained again after each: {redone}"


def test_ten_preemptions_lose_nothing_and_end_bitwise_equal(slurm_cluster, teacher_path, tmp_path):
    """A 1-task and a 2-task MGD job, side by side, each get 10 ``scancel --signal=USR2`` at random
    moments: each saves mid-epoch and is requeued, and each ends with the weights of a run never
    interrupted (run beside them: one thread per process, as the jobs)."""
    data = make_image_folder(str(tmp_path / "data"), splits=("train",), per_class=40)   # 10 steps per epoch
    # Two checkpoints kept (disk: ~130 MB each, three runs): the rotation is part of what a preempted run must get right.
    args = _train_args(data, teacher_path, epochs=PREEMPTED_EPOCHS, extra=["--keep-checkpoints", "2"])
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"\npreemption moments drawn with random.Random({seed}) (1 task) and random.Random({seed + 1}) (2 tasks)")
    runs = {}
    for tasks in (1, 2):
        job = submit.main(["pretrain", *args, *_cpu_cluster_args(tmp_path / f"jobs{tasks}" / "%j", tasks=tasks)])
        out = Path(submit.resolve_job_id(str(tmp_path / f"jobs{tasks}" / "%j"), job.job_id))
        straight = tmp_path / f"straight{tasks}"
        launch = ["--multiprocessing-distributed", "--nproc-per-node", "2", "--dist-url",
                  f"tcp://127.0.0.1:{free_port()}"] if tasks == 2 else []
        reference = subprocess.Popen([sys.executable, "main_moco_mgd.py", *args, *launch, "--output-dir", str(straight)],
                                     cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        runs[tasks] = (job, out, straight, reference)
    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(_preempt, job, out, random.Random(seed + tasks - 1))
                       for tasks, (job, out, _, _) in runs.items()]:
            future.result()
    for tasks, (job, out, straight, reference) in runs.items():
        _wait(job)
        assert reference.wait(timeout=JOB_TIMEOUT) == 0, reference.stderr.read()[-3000:]
        print(f"{tasks} task(s): {_check_ten_preemptions(job, tasks, out, straight)}")


def test_a_task_killed_mid_epoch_ends_the_job_and_a_resubmission_resumes(slurm_cluster, tmp_path):
    """``kill -9`` of task 1 of a 2-task job in epoch 1: the job ends well within a minute (not after
    ``--dist-timeout``), its logs name the dead task, and submitting the same command again resumes
    from epoch 0's checkpoint and ends with the weights of an uninterrupted 2-process run."""
    from tests.test_pretrain import _assert_same_state, _records
    from tests.test_rank_death import ENDS_WITHIN_S, _args, _rank_pids, _spawn

    data = make_image_folder(str(tmp_path / "data"), splits=("train",), per_class=12)
    out, straight = tmp_path / "run", tmp_path / "straight"
    reference = subprocess.Popen(_spawn(data, straight), cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    command = ["pretrain", *_args(data, out), *_cpu_cluster_args(tmp_path / "jobs" / "%j", tasks=2)]
    job = submit.main(command)
    deadline = time.monotonic() + JOB_TIMEOUT
    while (1, 0) not in _records(out):
        assert time.monotonic() < deadline and not job.done(force_check=True), _logs(job)
        time.sleep(0.05)
    victim = _rank_pids(out)[1]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    while not job.done(force_check=True):
        if time.monotonic() - killed > ENDS_WITHIN_S:
            subprocess.run(["scancel", str(job.job_id)])
            pytest.fail(f"job {job.job_id} outlived its dead task by {ENDS_WITHIN_S} s:\n{_logs(job)}")
        time.sleep(0.5)
    print(f"\njob {job.job_id} ended {time.monotonic() - killed:.1f} s after task 1 was killed")
    assert job.state not in ("COMPLETED", "RUNNING", "PENDING"), job.state
    logs = _logs(job)
    # srun reports the first task exit it sees and then force-terminates the step: usually the killed
    # task ("task 1: Killed"), but when task 0's gloo read error reaches it first, only "task 0: Exited
    # with exit code 1" (seen in CI). Either way the step's failure is in task 0's log.
    assert re.search(r"srun: error: \S+: task [01]: (Killed|Exited with exit code [1-9]\d*)", logs), logs
    assert (f"task 0 failed; the newest complete checkpoint is {out / 'checkpoint_0000.pth.tar'}. To go on from "
            f"it, submit the same command again with --output-dir {out}") in Path(
                job.paths.folder, f"{job.job_id}_0_log.err").read_text(), logs
    assert not (out / "checkpoint_0001.pth.tar").exists()

    again = submit.main(command)
    assert Path(_wait(again)) == out
    assert f"resumed from {out / 'checkpoint_0000.pth.tar'} at epoch 1" in (out / "log.txt").read_text()
    assert reference.wait(timeout=JOB_TIMEOUT) == 0, reference.stderr.read()[-3000:]
    _assert_same_state(_load(out / "checkpoint_0001.pth.tar"), _load(straight / "checkpoint_0001.pth.tar"))
