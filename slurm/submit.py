"""Submit pretraining or linear evaluation to SLURM with submitit: one launcher for both entry points
(also the ``moco-mgd-submit`` command). Processes and devices are :mod:`moco_mgd.runtime.launch`'s.

    python slurm/submit.py pretrain [cluster flags] [every flag of main_moco_mgd.py]
    python slurm/submit.py lincls   [cluster flags] [every flag of main_lincls.py]

Each SLURM task runs one training process: ``--nodes`` x ``--tasks-per-node`` processes (one per GPU,
``--ngpus`` per node; ``--ngpus 0`` runs CPU tasks with gloo). Every task ends in the same call as
the other launch modes, ``pretrain(config, env)`` or ``linear_eval(config, env)``: there is one
training loop.

Job directory (``--job-dir``, default ``./runs/%j``; ``%j`` is the SLURM job id): submitit's
scripts and the logs of every task (``%j_<task>_log.out`` / ``.err``) go there and, unless
``--output-dir`` is given, the training output too (checkpoints, ``log.txt``, ``metrics.jsonl``).
It must be on a filesystem shared by all the nodes of the job (and the data, the teacher and
``--pretrained`` checkpoints must be readable from every node).

Rendezvous: ``tcp://<first node of the job>:<port>``, the port derived from the job id and
``SLURM_RESTART_COUNT``, so it needs no shared-filesystem locking and no stale init file survives a
requeue. The port lies below Linux's ephemeral range (32768-60999 by default): there, any outgoing
connection on the node (another job's gloo pairs, a daemon's socket) can hold it at the moment the
store binds, which fails with EADDRINUSE. Each requeue of a job moves one port up, so a task of the
previous incarnation that is still being killed cannot hold it either. A job of a single task runs
without a process group, exactly as ``python main_moco_mgd.py`` does.

Preemption and time limit: SLURM sends USR2 ``signal_delay`` seconds early. Pretraining takes the
signal itself (:mod:`moco_mgd.runtime.stopping`): every task stops after the same iteration, task 0
saves a mid-epoch checkpoint there, and only then does submitit's own handler run: it calls
:meth:`Trainer.checkpoint`, which returns a fresh :class:`Trainer` of the same configuration, and
requeues the job (same id, same job directory). The requeued pretraining goes on from that
iteration (weights, queues, MGD assignment, optimizer, scaler, RNG, sampler position), bit for bit
as if never stopped: nothing is trained twice. A SIGTERM (a preemption with ``PreemptMode=REQUEUE``
requeues by itself) also saves first. Preemptions always requeue; time limits requeue up to
``--max-requeues`` times. Linear evaluation is requeued at once and resumes from the
``checkpoint.pth.tar`` of its output directory (the last epoch).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

# The checkout (or site-packages) that holds main_moco_mgd.py, moco_mgd/ and slurm/: the jobs import from it.
REPO = Path(__file__).resolve().parents[1]

__all__ = ["Trainer", "Plan", "SubmitError", "build_parser", "prepare", "main", "rendezvous_port"]

ENTRIES = {"pretrain": "main_moco_mgd", "lincls": "main_lincls"}
PROGRAM = "slurm/submit.py"


class SubmitError(Exception):
    """Bad input found before submitting: the message says what to change."""


def _entry(name: str):
    import importlib

    return importlib.import_module(ENTRIES[name])


def _worker_and_check(name: str):
    """The entry point's configuration class, its worker and its checks."""
    if name == "pretrain":
        from moco_mgd.training.config import PretrainConfig
        from moco_mgd.training.pretrain import pretrain
        from moco_mgd.training.checks import validate

        return PretrainConfig, pretrain, validate
    from moco_mgd.evaluation.lincls import LinclsConfig, check_config, linear_eval

    return LinclsConfig, linear_eval, check_config


def build_parser(name: str) -> argparse.ArgumentParser:
    """The entry script's own parser (every training flag) plus the cluster flags."""
    entry = _entry(name)
    parser = argparse.ArgumentParser(f"{PROGRAM} {name}", parents=[entry.get_args_parser(add_help=False)],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description=f"Submit {entry.__name__}.py to SLURM (submitit).")
    c = parser.add_argument_group("SLURM")
    c.add_argument("--nodes", default=1, type=int, help="nodes of the job")
    c.add_argument("--ngpus", default=8, type=int, help="GPUs per node (0: CPU tasks with gloo)")
    c.add_argument("--tasks-per-node", default=None, type=int,
                   help="training processes per node (default: --ngpus, or 1 on CPU)")
    c.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    c.add_argument("--timeout", default=4320, type=int, help="time limit of one run of the job, in minutes")
    c.add_argument("--account", default=None)
    c.add_argument("--qos", default=None)
    c.add_argument("--constraint", default=None, help="e.g. volta32gb")
    c.add_argument("--comment", default=None)
    c.add_argument("--mem-per-gpu", default=None, type=int, help="GB of memory per GPU")
    c.add_argument("--cpus-per-task", default=None, type=int, help="default: 10 with GPUs, 1 on CPU")
    c.add_argument("--mem-gb", default=None, type=int, help="GB of memory per node (CPU jobs)")
    c.add_argument("--job-dir", default="./runs/%j",
                   help="submitit scripts, logs and (unless --output-dir) the training output; %%j = job id; "
                        "on a filesystem shared by all nodes")
    c.add_argument("--max-requeues", default=10, type=int,
                   help="requeues after hitting the time limit (preemptions always requeue)")
    c.add_argument("--signal-delay", default=120, type=int,
                   help="seconds before the time limit at which SLURM warns the job (USR2)")
    c.add_argument("--job-name", default=None, help=f"default: moco-mgd-{name}")
    return parser


def rendezvous_port(job_id: str, restart: int = 0) -> int:
    """The store's port for run ``restart`` of job ``job_id``: every task of that run computes the same one."""
    from moco_mgd.runtime.launch import RENDEZVOUS_PORTS

    offset = (zlib.crc32(str(job_id).encode()) + restart) % len(RENDEZVOUS_PORTS)
    return RENDEZVOUS_PORTS.start + offset


def resolve_job_id(path: str, job_id: str) -> str:
    return path.replace("%j", str(job_id))


@dataclass
class Trainer:
    """What each SLURM task runs (pickled by submitit). ``requeued``: a run after a preemption/time limit."""

    entry: str
    config: object
    requeued: bool = False

    def __call__(self) -> str:
        import submitit
        import torch

        from moco_mgd.runtime.launch import DistEnv, device_for, run_worker

        job = submitit.JobEnvironment()
        config = dataclasses.replace(self.config, output_dir=resolve_job_id(self.config.output_dir, job.job_id))
        config = self._resume_point(config)
        _, worker, _ = _worker_and_check(self.entry)

        device = device_for(job.local_rank)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if device.type == "cpu" and cpus:
            torch.set_num_threads(int(cpus))
        env = DistEnv(job.global_rank, job.num_tasks, job.local_rank, job.num_tasks // job.num_nodes, device)
        init_method = None   # a job of one task runs as a plain single-process run: no process group
        if job.num_tasks > 1:
            restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
            init_method = f"tcp://{job.hostnames[0]}:{rendezvous_port(job.job_id, restart)}"
            if job.global_rank == 0:
                print(f"rendezvous {init_method} (restart {restart})", flush=True)
        try:
            stopped = run_worker(worker, config, env, "nccl", init_method)
        except Exception:
            if self.entry == "pretrain":
                self._how_to_go_on(config.output_dir, job.global_rank)
            raise
        if stopped:
            self._after_stop(stopped)
        return config.output_dir

    @staticmethod
    def _how_to_go_on(output_dir: str, task: int) -> None:
        """A task that failed (its own error, or a peer's death seen as a closed connection): SLURM
        does not requeue a failed job, and a new job writes to a new ``%j`` directory unless told."""
        from moco_mgd.checkpoints.files import latest_checkpoint

        newest = latest_checkpoint(output_dir)
        where = f"the newest complete checkpoint is {newest}" if newest else "no epoch was saved yet"
        print(f"task {task} failed; {where}. To go on from it, submit the same command again with "
              f"--output-dir {output_dir} (the failing task is named by srun in task 0's .err log)",
              file=sys.stderr, flush=True)

    @staticmethod
    def _after_stop(stopped: frozenset[int]) -> None:
        """The run saved on a signal: now what submitit would have done at once on USR2.

        Its handler (put back by the run) calls :meth:`checkpoint`, requeues the job and exits on
        task 0; the other tasks wait for the requeue to end them. Never a normal return, which
        would record the job as finished.
        """
        import signal
        import time

        from moco_mgd.runtime.stopping import exit_code

        if signal.SIGUSR2 in stopped:
            requeue = signal.getsignal(signal.SIGUSR2)
            if callable(requeue):
                # SLURM carries out a requeue by sending SIGTERM to every process of the step, the
                # `scontrol requeue` child included. On a loaded node that can land before scontrol
                # returns: it "dies", and submitit records the job, requeued all the same, as failed
                # (seen in CI). An ignored signal stays ignored across exec, so scontrol finishes.
                previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
                try:
                    requeue(signal.SIGUSR2, None)
                finally:
                    signal.signal(signal.SIGTERM, previous)
            time.sleep(300)
        raise SystemExit(exit_code(stopped))

    def _resume_point(self, config):
        """After a requeue, continue from what this job saved last (never from scratch, never from an
        older ``--resume`` given at submission)."""
        if not self.requeued:
            return config
        if self.entry == "pretrain":
            from moco_mgd.checkpoints.files import latest_checkpoint

            if latest_checkpoint(config.output_dir) is not None:
                return dataclasses.replace(config, resume="")   # pretrain() picks the newest complete one
            return config
        own = Path(config.output_dir) / "checkpoint.pth.tar"
        return dataclasses.replace(config, resume=str(own)) if own.is_file() else config

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on USR2 (preemption or time limit) before it requeues the job.

        Pretraining has saved where it stopped by then (and every epoch, atomically), so there is
        nothing to save here: the requeued job resumes from the newest complete checkpoint of the
        output directory.
        """
        import submitit

        return submitit.helpers.DelayedSubmission(type(self)(self.entry, self.config, requeued=True))


@dataclass
class Plan:
    """Everything :func:`main` submits, checked."""

    entry: str
    args: argparse.Namespace
    config: object
    job_dir: str
    world_size: int
    tasks_per_node: int
    slurm: dict


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else path


def _writable_base(job_dir: str) -> Path:
    """The directory that must be writable before the job id is known: the part before ``%j``."""
    if "%j" not in job_dir:
        return Path(job_dir)
    prefix = job_dir.split("%j", 1)[0]
    return Path(prefix) if prefix.endswith(os.sep) else Path(prefix).parent


def prepare(name: str, argv: list[str]) -> Plan:
    """Parse and check everything a compute node would trip on later. Raises :class:`SubmitError`."""
    from moco_mgd.checkpoints.files import check_writable
    from moco_mgd.runtime import launch

    if name not in ENTRIES:
        raise SubmitError(f"unknown entry point {name!r}: choose pretrain or lincls")
    parser = build_parser(name)
    args = parser.parse_args(argv)
    config_class, worker, check = _worker_and_check(name)
    if args.nodes < 1:
        raise SubmitError(f"--nodes {args.nodes}: need at least one node")
    if args.ngpus < 0:
        raise SubmitError(f"--ngpus {args.ngpus}: pass 0 for CPU tasks or the GPUs per node")
    tasks = args.tasks_per_node if args.tasks_per_node is not None else (args.ngpus or 1)
    if tasks < 1:
        raise SubmitError(f"--tasks-per-node {tasks}: need at least one task per node")
    if args.ngpus and tasks > args.ngpus:
        raise SubmitError(f"--tasks-per-node {tasks} is more than the {args.ngpus} GPUs per node: one task per GPU")
    if args.batch_size < tasks:
        raise SubmitError(f"-b/--batch-size {args.batch_size} is the batch of one node and cannot be split over "
                          f"its {tasks} tasks (--tasks-per-node): pass -b >= {tasks}")
    if args.multiprocessing_distributed:
        raise SubmitError("--multiprocessing-distributed is for launching by hand: under SLURM every task is "
                          "one process already (use --tasks-per-node)")
    for flag, attr in (("--teacher-checkpoint", "teacher_checkpoint"), ("--pretrained", "pretrained"),
                       ("--resume", "resume")):
        path = getattr(args, attr, "")
        if path and not os.path.isfile(os.path.expanduser(path)):
            raise SubmitError(f"{flag} {path!r} does not exist (or is not a file): the job would fail on the "
                              f"compute node; pass an existing checkpoint on the shared filesystem")
        if path:
            setattr(args, attr, _absolute(path))
    job_dir = _absolute(args.job_dir)
    base = _writable_base(job_dir)
    try:
        check_writable(base, flag="--job-dir")
    except PermissionError as exc:
        raise SubmitError(f"{exc}, on a filesystem shared by the nodes") from None
    explicit_output = any(a == "--output-dir" or a.startswith("--output-dir=") for a in argv)
    args.output_dir = _absolute(args.output_dir) if explicit_output else job_dir
    if args.data:
        args.data = _absolute(args.data)
    config = launch.config_from_args(config_class, args)
    world = args.nodes * tasks

    # The entry script's own checks (batch split, K vs the global batch, data, teacher, resume...),
    # against a scratch directory when the output directory is only known once the job id is.
    try:
        if "%j" in config.output_dir:
            scratch_base = _writable_base(config.output_dir)
            check_writable(scratch_base)
            with tempfile.TemporaryDirectory(dir=scratch_base, prefix=".submit-check-") as scratch:
                check(dataclasses.replace(config, output_dir=scratch), world, tasks)
        else:
            check(config, world, tasks)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        raise SubmitError(str(exc)) from None

    cpus = args.cpus_per_task if args.cpus_per_task is not None else (10 if args.ngpus else 1)
    slurm = dict(name=args.job_name or f"moco-mgd-{name}", nodes=args.nodes, tasks_per_node=tasks,
                 cpus_per_task=cpus, timeout_min=args.timeout, slurm_signal_delay_s=args.signal_delay,
                 slurm_setup=[f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}"])
    if args.ngpus:
        slurm["gpus_per_node"] = args.ngpus
    optional = {"slurm_partition": args.partition, "slurm_account": args.account, "slurm_qos": args.qos,
                "slurm_constraint": args.constraint, "slurm_comment": args.comment,
                "slurm_mem_per_gpu": f"{args.mem_per_gpu}G" if args.mem_per_gpu else None,
                "mem_gb": args.mem_gb}
    slurm.update({k: v for k, v in optional.items() if v is not None})
    return Plan(name, args, config, job_dir, world, tasks, slurm)


def submit(plan: Plan):
    """Submit ``plan``; return the submitit job."""
    import submitit

    executor = submitit.AutoExecutor(folder=plan.job_dir, cluster="slurm",
                                     slurm_max_num_timeout=plan.args.max_requeues)
    executor.update_parameters(**plan.slurm)
    return executor.submit(Trainer(plan.entry, plan.config))


def _usage() -> str:
    return (f"usage: {PROGRAM} {{pretrain,lincls}} [cluster flags] [training flags]\n"
            f"       {PROGRAM} pretrain --help   (all flags)\n")


def main(argv: list[str] | None = None):
    """Check, submit, print where things go; return the submitit job. Bad input: exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ENTRIES:
        if argv and argv[0] in ("-h", "--help"):
            sys.stdout.write(_usage() + __doc__)
            raise SystemExit(0)
        sys.stderr.write(_usage() + f"{PROGRAM}: error: first argument must be pretrain or lincls\n")
        raise SystemExit(2)
    name, rest = argv[0], argv[1:]
    if "-h" in rest or "--help" in rest:
        build_parser(name).print_help()
        raise SystemExit(0)
    try:
        if shutil.which("sbatch") is None:
            script = "main_moco_mgd.py" if name == "pretrain" else "main_lincls.py"
            raise SubmitError(f"no SLURM on this machine (sbatch is not on PATH): run {script} here instead, e.g. "
                              f"'python {script} ...' for one process or 'torchrun --nproc_per_node N {script} "
                              f"--dist-url env:// ...' for several")
        plan = prepare(name, rest)
    except SubmitError as exc:
        sys.stderr.write(f"{PROGRAM} {name}: error: {exc}\n")
        raise SystemExit(2) from None
    job = submit(plan)
    output = resolve_job_id(plan.config.output_dir, job.job_id)
    print(f"submitted job {job.job_id}: {plan.entry} on {plan.args.nodes} node(s) x {plan.tasks_per_node} task(s)"
          f"{' x 1 GPU' if plan.args.ngpus else ' (CPU)'}")
    print(f"  logs:        {job.paths.stdout} (task 0; one per task beside it)")
    print(f"  checkpoints: {output}")
    print(f"  follow with: tail -f {job.paths.stdout}   cancel: scancel {job.job_id}")
    return job


if __name__ == "__main__":
    # Import as slurm.submit, from the checkout, so that submitit pickles ``slurm.submit.Trainer`` by a
    # reference the jobs (PYTHONPATH=REPO) can import.
    sys.path.insert(0, str(REPO))
    from slurm.submit import main as _main

    _main()
