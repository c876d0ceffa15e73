"""Timing for the benchmarks and the GPU acceptance run: warm-up, device sync, median, peak GPU and host
memory, and the Markdown table they print."""
from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import torch


def device_name(device: torch.device, threads: int | None = None) -> str:
    """How a benchmark's table names its device: the GPU's name, or the CPU and its torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {threads or torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], object], device: torch.device, warmup: int = 1, iters: int = 5) -> tuple[float, float]:
    """Median seconds per call of ``step`` and peak GPU memory in GiB (0 on CPU).

    GPU work is asynchronous: each call is timed up to a synchronisation, after warm-up
    calls that pay for allocation and kernel selection.
    """
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return statistics.median(times), peak


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; 0 where absent)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage``; Linux reports KiB)."""
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def print_table(columns: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> None:
    """A Markdown table on stdout: the header ``columns``, then one line per row of formatted cells.
    ``align`` has an ``l`` (text) or ``r`` (numbers) per column; by default the first column is text
    and the rest numbers."""
    align = align or "l" + "r" * (len(columns) - 1)
    if len(align) != len(columns):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(columns)} columns")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---:" if side == "r" else "---" for side in align) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
