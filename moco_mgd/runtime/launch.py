"""Starting the processes of a run: one process, MoCo's mp.spawn, torchrun (SLURM's launcher, slurm/submit.py, reuses it).

Every launch mode ends in the same call, ``worker(config, env)`` with a :class:`DistEnv`
describing this process, so there is one training code path.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moco_mgd.runtime import stopping
from moco_mgd.runtime.flag_checks import AT_LEAST_1, NON_NEGATIVE, POSITIVE, check_numbers

__all__ = ["DistEnv", "DEFAULT_DIST_TIMEOUT_S", "RankDied", "RENDEZVOUS_PORTS", "free_local_port",
           "launched_by_torchrun", "procs_per_node", "process_counts", "launch", "check_dist_url",
           "init_process_group", "device_for", "run_worker", "add_launch_arguments", "config_defaults",
           "set_config_defaults", "config_from_args", "run_main", "per_process_batch"]

logger = logging.getLogger("moco_mgd")


# How long a collective waits for a rank that does not answer (hung, stopped, or on a dead node) before
# the job fails: torch's NCCL default. Its gloo default, 30 minutes, held a GPU node that long.
DEFAULT_DIST_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    dist_timeout_s: float = DEFAULT_DIST_TIMEOUT_S   # of the process group and of any group made beside it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Rendezvous ports are taken below Linux's default ephemeral range (net.ipv4.ip_local_port_range,
# 32768-60999): a port there that is free now can become the local port of any outgoing connection
# before the store binds it, which then fails with EADDRINUSE (seen in CI).
RENDEZVOUS_PORTS = range(20000, 32768)


def free_local_port() -> int:
    """A TCP port of ``RENDEZVOUS_PORTS`` free on 127.0.0.1 now: the rendezvous of a one-machine group
    (tests, benchmarks)."""
    import random
    import socket

    for port in random.Random().sample(RENDEZVOUS_PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port among 200 tried in {RENDEZVOUS_PORTS.start}-{RENDEZVOUS_PORTS.stop - 1}")


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def procs_per_node(nproc_per_node: int | None) -> int:
    """Processes per node for ``--multiprocessing-distributed``: one per GPU, as MoCo."""
    if nproc_per_node:
        return nproc_per_node
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    raise ValueError("--multiprocessing-distributed starts one process per GPU and this machine has "
                     "none: pass --nproc-per-node N to run N CPU processes (gloo), or drop the flag")


def per_process_batch(batch_size: int, local_world_size: int) -> int:
    """``-b`` is the batch of a whole node, as in MoCo; each of its processes takes a share."""
    return batch_size // local_world_size


def process_counts(nodes: int, multiprocessing_distributed: bool, nproc_per_node: int | None) -> tuple[int, int]:
    """``(world_size, processes per node)`` that :func:`launch` will start, known before it does."""
    if launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        return world, int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if multiprocessing_distributed:
        local = procs_per_node(nproc_per_node)
        return nodes * local, local
    return nodes, 1


def device_for(local_rank: int, gpu: int | None = None) -> torch.device:
    """This process's device: GPU ``gpu`` (default: the one of its local rank), made current, or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = gpu if gpu is not None else local_rank
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def check_dist_url(url: str) -> None:
    """Refuse a ``--dist-url`` that ``init_process_group`` cannot use, before any process starts (else each
    spawned process fails inside torch, e.g. "port number missing")."""
    forms = ("give tcp://HOST:PORT (HOST: the rank-0 node, e.g. tcp://127.0.0.1:23456), env:// (with MASTER_ADDR "
             "and MASTER_PORT set) or file:///a/shared/path")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError:   # not a number, or out of range
            port = -1
        if not parts.hostname or port is None or not 1 <= port <= 65535:
            raise ValueError(f"--dist-url {url!r} needs a host and a port from 1 to 65535: {forms}")
    elif parts.scheme == "env":
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise ValueError(f"--dist-url env:// reads the rendezvous from the environment, but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not set: set them, or {forms}")
    elif parts.scheme == "file":
        if not parts.path or not os.path.isdir(os.path.dirname(parts.path) or "/"):
            raise ValueError(f"--dist-url {url!r}: the directory of {parts.path!r} does not exist: {forms}")
    else:
        raise ValueError(f"--dist-url {url!r} is not a rendezvous address torch can use: {forms}")


def init_process_group(backend: str, init_method: str, world_size: int, rank: int,
                       device: torch.device, timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> None:
    """Join the run's process group; gloo on CPU whatever ``backend`` says (NCCL needs GPUs)."""
    if device.type != "cuda" and backend == "nccl":
        backend = "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank,
                            timeout=timedelta(seconds=timeout_s), **kwargs)


def run_worker(worker: Callable, config, env: DistEnv, backend: str, init_method: str | None):
    """``worker(config, env)``, inside the process group ``env`` describes, joined through ``init_method``
    (None: no process group, a plain single-process run); returns what ``worker`` returns."""
    if init_method is None:
        return worker(config, env)
    init_process_group(backend, init_method, env.world_size, env.rank, env.device, env.dist_timeout_s)
    try:
        return worker(config, env)
    finally:
        dist.destroy_process_group()


def _spawned(local_rank: int, worker: Callable, config, nprocs: int, nodes: int, node_rank: int,
             dist_url: str, dist_backend: str, timeout_s: float) -> None:
    rank = node_rank * nprocs + local_rank
    device = device_for(local_rank)
    env = DistEnv(rank, nodes * nprocs, local_rank, nprocs, device, timeout_s)
    stopped = run_worker(worker, config, env, dist_backend, dist_url)
    if stopped:  # saved on a signal: the parent learns it from the exit code
        raise SystemExit(stopping.exit_code(stopped))


def _spawn(nprocs: int, args: tuple, first_rank: int) -> frozenset[int]:
    """MoCo's ``mp.spawn``, with the stop signals in mind.

    A Ctrl-C reaches the children too (one process group): the parent waits while they save. A
    SIGTERM or USR2 sent to the parent alone is passed on to them. A child that saved on a
    signal exits with 128 + its number: returned as that signal. A child that died otherwise
    (killed, crashed) raises :class:`RankDied`, naming each rank that did not finish and how.
    """
    context = mp.start_processes(_spawned, args=args, nprocs=nprocs, join=False, start_method="spawn")

    def pass_on(signum, frame):
        if signum == signal.SIGINT:
            logger.warning("Ctrl-C: waiting for the processes to save and stop")
            return
        for pid in context.pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, pass_on) for s in stopping.STOP_SIGNALS}
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as exc:
        signum = exc.exit_code - 128 if exc.exit_code > 128 else None
        if signum in stopping.STOP_SIGNALS:
            return frozenset({signal.Signals(signum)})
        raise RankDied(_ends_text(context, first_rank)) from None
    except mp.ProcessRaisedException as exc:   # its traceback, then which ranks ended how
        raise RankDied(f"{exc.msg.rstrip()}\n{_ends_text(context, first_rank)}") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return frozenset()


class RankDied(RuntimeError):
    """A process of the run ended on its own (killed, crashed); mp.spawn stopped the others."""


def _ends_text(context, first_rank: int) -> str:
    """How each process of this node that did not finish ended, a signal's victims first (the cause,
    where one was killed: the others then fail in a collective, or are stopped by mp.spawn)."""
    ends = []
    for index, process in enumerate(context.processes):
        code = process.exitcode
        if not code:
            continue
        place = f"rank {first_rank + index} (pid {process.pid})"
        if code == -signal.SIGTERM:
            ends.append((1, f"{place} was stopped (SIGTERM, from mp.spawn or from outside)"))
        elif code < 0:
            ends.append((0, f"{place} was killed by {signal.Signals(-code).name}"))
        else:
            ends.append((2, f"{place} exited with code {code}"))
    return ("; ".join(text for _, text in sorted(ends)) + ". Run the same command again to go on from the newest "
            "complete checkpoint in the output directory")


def launch(worker: Callable, config, *, dist_url: str, dist_backend: str, world_size: int, rank: int,
           multiprocessing_distributed: bool, nproc_per_node: int | None = None,
           gpu: int | None = None, dist_timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> frozenset[int]:
    """Run ``worker(config, env)`` in the processes the flags ask for.

    Returns the stop signals the run saved and stopped on (``worker`` returns them; empty when it
    ran to its end).

    * ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set): one process each, group
      from the environment (``--dist-url env://``).
    * ``--multiprocessing-distributed``: MoCo's mode; ``world_size`` and ``rank`` count
      *nodes*; this node spawns one process per GPU (or ``nproc_per_node`` CPU processes).
    * ``world_size > 1`` without it: one process per node, rank ``rank``.
    * otherwise: a single process and no process group, on ``--gpu`` / the first GPU, or CPU.
    """
    if launched_by_torchrun():
        local_rank = int(os.environ["LOCAL_RANK"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        env = DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, local_world,
                      device_for(local_rank), dist_timeout_s)
        stopped = run_worker(worker, config, env, dist_backend, "env://")
    elif multiprocessing_distributed:
        nprocs = procs_per_node(nproc_per_node)
        stopped = _spawn(nprocs, (worker, config, nprocs, world_size, rank, dist_url, dist_backend, dist_timeout_s),
                         first_rank=rank * nprocs)
    elif world_size > 1:
        env = DistEnv(rank, world_size, 0, 1, device_for(0, gpu), dist_timeout_s)
        stopped = run_worker(worker, config, env, dist_backend, dist_url)
    else:
        stopped = worker(config, DistEnv(device=device_for(0, gpu)))
    return frozenset(stopped or ())


def add_launch_arguments(group) -> None:
    """The launch flags of MoCo's scripts (same names and defaults), plus ``--nproc-per-node``."""
    group.add_argument("--world-size", default=-1, type=int, help="number of nodes")
    group.add_argument("--rank", default=-1, type=int, help="node rank")
    group.add_argument("--dist-url", default="tcp://224.66.41.62:23456", type=str,
                       help="rendezvous address; env:// under torchrun")
    group.add_argument("--dist-backend", default="nccl", type=str, help="nccl on GPU (gloo is used on CPU)")
    group.add_argument("--dist-timeout", default=DEFAULT_DIST_TIMEOUT_S, type=float, metavar="SECONDS",
                       help="how long a collective waits for a rank that does not answer before the job fails "
                            "(torch's gloo default is 30 min; a dead rank ends the job at once anyway)")
    group.add_argument("--gpu", default=None, type=int, help="GPU of a single-process run")
    group.add_argument("--multiprocessing-distributed", action="store_true",
                       help="one process per GPU of this node, as MoCo")
    group.add_argument("--nproc-per-node", default=None, type=int,
                       help="processes per node with --multiprocessing-distributed (default: one per GPU; "
                            "needed on CPU)")


def config_defaults(config_class: type) -> dict:
    """The default of every field of the dataclass ``config_class`` (factories called)."""
    return dataclasses.asdict(config_class())


def set_config_defaults(parser: argparse.ArgumentParser, config_class: type) -> argparse.ArgumentParser:
    """Give every flag whose destination is a field of ``config_class`` that field's default.

    The dataclass is the one source of the defaults: the entry scripts' ``add_argument`` calls
    name no default for a configuration field. Raises if a field has no flag, so the two cannot
    drift apart.
    """
    destinations = {action.dest for action in parser._actions}
    missing = [name for name in config_defaults(config_class) if name not in destinations]
    if missing:
        raise TypeError(f"{config_class.__name__} fields without a command-line flag: {', '.join(missing)}")
    parser.set_defaults(**config_defaults(config_class))
    return parser


def config_from_args(config_class: type, args: argparse.Namespace):
    """The dataclass ``config_class`` filled from the parsed flags of the same names."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})


def run_main(parser: argparse.ArgumentParser, argv: list[str] | None, config_class: type,
             check: Callable, worker: Callable, program: str) -> None:
    """What an entry script does: parse, check everything, then start the processes.

    The launch flags' ranges are checked here, everything else by ``check(config, world_size,
    local_world_size)``; both raise ValueError / FileNotFoundError / PermissionError for bad input,
    which ends the program with exit code 2 and the message, before any process starts.
    """
    args = parser.parse_args(argv)
    config = config_from_args(config_class, args)
    nodes, node_rank = max(args.world_size, 1), max(args.rank, 0)
    try:
        check_numbers([
            ("--world-size", args.world_size, lambda v: v == -1 or v >= 1, "-1 (one node) or >= 1"),
            ("--rank", args.rank, lambda v: -1 <= v < nodes,
             f"-1 or in [0, {nodes}) (--world-size {args.world_size})"),
            ("--gpu", args.gpu, *NON_NEGATIVE), ("--nproc-per-node", args.nproc_per_node, *AT_LEAST_1),
            ("--dist-timeout", args.dist_timeout, *POSITIVE),
        ])
        world, local = process_counts(nodes, args.multiprocessing_distributed, args.nproc_per_node)
        if world > 1 and not launched_by_torchrun():   # torchrun's group comes from its environment
            check_dist_url(args.dist_url)
        check(config, world, local)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        parser.exit(2, f"{program}: error: {exc}\n")
    try:
        stopped = launch(worker, config, dist_url=args.dist_url, dist_backend=args.dist_backend, world_size=nodes,
                         rank=node_rank, multiprocessing_distributed=args.multiprocessing_distributed,
                         nproc_per_node=args.nproc_per_node, gpu=args.gpu, dist_timeout_s=args.dist_timeout)
    except RankDied as exc:   # the rank's own traceback, if any, is above; this says which one and what next
        raise SystemExit(f"{program}: error: {exc}") from None
    if stopped:  # saved on the signal; the exit code says the run is not finished
        raise SystemExit(stopping.exit_code(stopped))
