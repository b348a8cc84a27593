"""Measurement (DESIGN §5): CUDA-event medians with L2 flushed, CUDA graphs, copy bandwidth.

On CPU the same interface times with ``time.perf_counter`` (medians after warm-up); results
carry ``timing="wall-clock"`` so nobody mistakes them for GPU numbers.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


class Timer:
    """Median time of a callable in microseconds.

    On CUDA: CUDA events around each call, L2 flushed (by writing a buffer 4x the L2 size) before
    every timed call. On CPU: wall clock. ``warmup`` calls run untimed first.
    """

    def __init__(self, device: torch.device, iters: int = 30, warmup: int = 3):
        self.device = torch.device(device)
        self.iters, self.warmup = int(iters), int(warmup)
        self.cuda = self.device.type == "cuda"
        self.flush_buf = None
        if self.cuda:
            l2 = torch.cuda.get_device_properties(self.device).L2_cache_size or (50 << 20)
            self.flush_buf = torch.empty(l2, dtype=torch.int32, device=self.device)  # 4 bytes x L2 bytes

    @property
    def method(self) -> str:
        """How times were measured, for the report."""
        if self.cuda:
            return f"CUDA events, median of {self.iters} after {self.warmup} warm-up, L2 flushed before each call"
        return f"wall clock (CPU), median of {self.iters} after {self.warmup} warm-up"

    def time_us(self, fn: Callable[[], object], iters: int | None = None) -> float:
        """Median microseconds of ``fn()``."""
        iters = max(1, int(iters or self.iters))
        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
            return statistics.median(times)
        torch.cuda.synchronize(self.device)
        events = []
        for _ in range(iters):
            self.flush_buf.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) * 1000.0 for s, e in events)


def graphed(fn: Callable[[], object], device: torch.device) -> tuple[Callable[[], object], bool]:
    """``(replay, True)`` for a CUDA graph of ``fn``; ``(fn, False)`` on CPU or when capture fails."""
    if torch.device(device).type != "cuda":
        return fn, False
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up on a side stream, as graph capture requires
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize()
        return g.replay, True
    except Exception:  # noqa: BLE001 - data-dependent shapes or host syncs: time it eagerly
        torch.cuda.synchronize()
        return fn, False


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None, iters: int = 10) -> float:
    """Measured copy bandwidth in GB/s, counting bytes read plus bytes written.

    GPU: a 1 GiB device-to-device ``copy_``; CPU: a 64 MiB memcpy (bigger than the caches).
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    timer = Timer(device, iters=iters, warmup=2)
    us = timer.time_us(lambda: b.copy_(a))
    del a, b
    return 2 * nbytes / (us * 1e-6) / 1e9
