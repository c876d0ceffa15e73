"""Timing for the benchmark scripts: warm-up, device sync, median, peak GPU memory."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


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
