"""Timing: per-call times after warm-up, their statistics, the CPU other processes used meanwhile,
and the process's peak memory.

Standard library only (psutil when metering), so the PyTorch peer's interpreter can use it too.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

KIB = 1024  # /proc/self/status counts KiB (so does ru_maxrss on Linux; macOS counts bytes)


def stats(xs: Sequence[float]) -> dict[str, float]:
    """Count, median, quartiles (linear interpolation), min and max of a sample."""
    a = sorted(float(x) for x in xs)
    if not a:
        raise ValueError("stats of an empty sample")
    q1, med, q3 = statistics.quantiles(a, n=4, method="inclusive") if len(a) > 1 else (a[0],) * 3
    return {"n": len(a), "median": med, "q1": q1, "q3": q3, "min": a[0], "max": a[-1]}


def rate(seconds: dict[str, float], per_call: float = 1.0) -> dict[str, float]:
    """Calls/s (times ``per_call``) from time stats: the median and the IQR's bounds."""
    return {"median": per_call / seconds["median"], "iqr_lo": per_call / seconds["q3"],
            "iqr_hi": per_call / seconds["q1"]}


def time_calls(fn: Callable[[], dict[str, Any]], warmup: int, repeats: int, budget_s: float = math.inf,
               min_repeats: int = 1) -> dict[str, Any]:
    """Time ``fn`` (returns a dict of scalars, read back as floats: the call has finished then).

    ``warmup`` calls include the first (tracing) one, reported as ``first_call_s``. ``budget_s``
    bounds slow calls: a first call longer than it is the whole warm-up, and timed calls stop
    once they add up to it (after ``min_repeats``), so a 10x slower variant costs fewer calls.
    """
    t0 = time.perf_counter()
    out = {k: float(v) for k, v in fn().items()}
    first = time.perf_counter() - t0
    for _ in range(warmup - 1 if first < budget_s else 0):
        fn()
    times: list[float] = []
    while len(times) < repeats and (len(times) < min_repeats or sum(times) < budget_s):
        t0 = time.perf_counter()
        out = {k: float(v) for k, v in fn().items()}
        times.append(time.perf_counter() - t0)
    return {"first_call_s": first, "seconds": stats(times), "finite": all(map(math.isfinite, out.values()))}


class CpuMeter:
    """CPU cores busy with *other* processes (system busy time minus this process's) during a block.

    On a shared machine a value well above 0 means the figures of that block are pessimistic.
    """

    BUSY = ("user", "nice", "system", "irq", "softirq")

    def __enter__(self) -> CpuMeter:
        import psutil

        self._proc = psutil.Process()
        self._t, self._sys, self._own = time.perf_counter(), psutil.cpu_times(), self._proc.cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        import psutil

        wall = max(time.perf_counter() - self._t, 1e-9)
        sys1, own1 = psutil.cpu_times(), self._proc.cpu_times()
        busy = sum(getattr(sys1, f, 0.0) - getattr(self._sys, f, 0.0) for f in self.BUSY)
        own = own1.user + own1.system - self._own.user - self._own.system
        self.result = {"wall_s": wall, "own_cores": own / wall, "others_cores": max(busy - own, 0.0) / wall}


def peak_rss() -> int:
    """Peak resident bytes of this process's memory (Linux ``VmHWM``: since start or the last
    ``reset_peak_rss``), else ``ru_maxrss`` (since start; on Linux it also holds the parent's size
    at the fork before exec, hence not first)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KIB
    import resource  # Unix only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else KIB)


def reset_peak_rss() -> bool:
    """Restart ``peak_rss`` from the current size (Linux: ``5`` to /proc/self/clear_refs); False
    where that is not possible (then the peak is since the process started)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
