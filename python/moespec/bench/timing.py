"""Measurement (docs/design.md §5): CUDA-event medians with L2 flushed, CUDA graphs, copy bandwidth; the spread
and ranking rule of repeated end-to-end runs (`spread`, `rank_check`).

On CPU the same interface times with ``time.perf_counter`` (medians after warm-up); results
carry ``timing="wall-clock"`` so nobody mistakes them for GPU numbers.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

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


# ----------------------------------------------------------------------------- spread over repeats
#
# `moespec bench generate --repeats N` runs every mode N times, interleaved, and computes each mode's
# speed-up per repeat against that repeat's autoregressive run. The functions below summarise those
# per-repeat values and decide whether the run ranks the modes. They are pure (no clock, no torch), so
# the rule is tested on synthetic timings.

#: Resolution of a ranking: a mode is measured to within TIE_TOLERANCE when its per-repeat speed-ups
#: all lie within a factor 1 + TIE_TOLERANCE of each other, and two such modes whose intervals overlap
#: and whose medians are that close count as a tie ("equal within 10 %"), not as a failure to rank.
TIE_TOLERANCE = 0.10

RANK_RULE = (
    "each mode's interval is the min-max of its per-repeat speed-ups (ar: 1.00-1.00). Two modes are "
    "ordered when their intervals are disjoint; tied when the intervals overlap, each mode's max is "
    "within a factor 1 + {tie:g} of its own min and the two medians are within a factor 1 + {tie:g} of "
    "each other (both measured to within {pct:g} % and closer than that); undetermined otherwise "
    "(overlapping, with a spread too wide to tell which is faster). A mode undetermined against any "
    "other mode is marked '?', and the run is flagged as too noisy to rank the modes. With fewer than "
    "2 repeats nothing is checked."
)


def spread(values: Sequence[float]) -> dict:
    """``{"n", "median", "min", "max", "rel_range"}`` of per-repeat values (None entries ignored).

    ``rel_range`` is ``(max - min) / median`` (None when the median is not positive). An empty input
    gives ``n = 0`` and None everywhere else.
    """
    vals = sorted(float(v) for v in values if v is not None)
    if not vals:
        return {"n": 0, "median": None, "min": None, "max": None, "rel_range": None}
    med = statistics.median(vals)
    return {"n": len(vals), "median": med, "min": vals[0], "max": vals[-1],
            "rel_range": (vals[-1] - vals[0]) / med if med > 0 else None}


def pair_relation(a: Sequence[float], b: Sequence[float], tie: float = TIE_TOLERANCE) -> str:
    """``"ordered"``, ``"tie"`` or ``"undetermined"`` for the per-repeat speed-ups of two modes (see
    `RANK_RULE`; a ``(min, max)`` pair works as two repeats)."""
    a, b = sorted(float(v) for v in a), sorted(float(v) for v in b)
    if not a or not b:
        raise ValueError("pair_relation needs at least one value per mode")
    if a[0] > b[-1] or b[0] > a[-1]:
        return "ordered"
    f = 1.0 + tie
    ma, mb = statistics.median(a), statistics.median(b)
    if a[-1] <= f * a[0] and b[-1] <= f * b[0] and max(ma, mb) <= f * min(ma, mb):
        return "tie"
    return "undetermined"


def rank_check(names: Sequence[str], per_repeat: Sequence[Sequence[float]], tie: float = TIE_TOLERANCE) -> dict:
    """Whether per-repeat speed-ups rank the modes ``names`` (same order as ``per_repeat``).

    Returns ``{"checked", "flagged", "tie", "rule", "undetermined": [i, ...], "pairs": [...]}``:
    ``pairs`` lists every undetermined or tied pair as ``{"a", "b", "relation", "a_range", "b_range"}``
    (ordered pairs are left out); ``undetermined`` holds the indices of modes in at least one
    undetermined pair; ``flagged`` is True when there is any. ``checked`` is False (and nothing is
    flagged) when some mode has fewer than 2 repeats.
    """
    if tie < 0:
        raise ValueError(f"tie must be >= 0, got {tie}")
    if len(names) != len(per_repeat):
        raise ValueError("names and per_repeat differ in length")
    out = {"checked": False, "flagged": False, "tie": tie, "rule": RANK_RULE.format(tie=tie, pct=100 * tie),
           "undetermined": [], "pairs": []}
    vals = [[float(v) for v in vs if v is not None] for vs in per_repeat]
    if not vals or min(len(v) for v in vals) < 2:
        return out
    out["checked"] = True
    rng = [(min(v), max(v)) for v in vals]
    bad: set[int] = set()
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            rel = pair_relation(vals[i], vals[j], tie)
            if rel == "ordered":
                continue
            if rel == "undetermined":
                bad.update((i, j))
            out["pairs"].append({"a": names[i], "b": names[j], "relation": rel,
                                 "a_range": list(rng[i]), "b_range": list(rng[j])})
    out["undetermined"] = sorted(bad)
    out["flagged"] = bool(bad)
    return out
