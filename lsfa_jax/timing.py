"""Best-of-n wall-clock timing, shared by `search=auto`'s calibration and the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any


def best_times(fns: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, Any]]:
    """name -> (best-of-`repeats` seconds, last result) of each function, after one warm-up
    call each (compilation, thread start-up).

    The functions run round-robin so that load from other processes on a shared machine hits
    them alike.
    """
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(times[name]), results[name]) for name in fns}
