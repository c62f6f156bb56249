"""Timing, memory and machine helpers shared by bench_end_to_end, bench_memory and run_all.

Results are printed as one line each, `RESULT {json}`, so that run_all.py can collect them from
a subprocess's output without parsing free text.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

RESULT_PREFIX = "RESULT "


def emit(**fields: Any) -> None:
    """Prints one machine-readable result line (see module docstring)."""
    print(RESULT_PREFIX + json.dumps(fields, sort_keys=True), flush=True)


def parse_results(text: str) -> list[dict[str, Any]]:
    """The `emit`ted records in a process's output, in order."""
    return [
        json.loads(line[len(RESULT_PREFIX) :])
        for line in text.splitlines()
        if line.startswith(RESULT_PREFIX)
    ]


def best_of(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best-of-`repeats` wall seconds per function after one warm-up call each (compilation).

    The functions run round-robin, so load from other processes on a shared machine hits them
    alike; the minimum is the least disturbed run.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status: no {field} line")


def anon_mib() -> float:
    """Current anonymous resident memory (RssAnon) of this process, MiB."""
    return _status_kib("RssAnon") / 1024.0


def reset_peak_rss() -> None:
    """Resets the kernel's peak-RSS mark (VmHWM) of this process to its current RSS."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_mib() -> float:
    """Peak resident set size (VmHWM) since the process started or the last reset, MiB."""
    return _status_kib("VmHWM") / 1024.0


def device_peak_mib() -> float | None:
    """Peak bytes in use on the first JAX device (MiB), where the backend reports it (GPU);
    None on CPU, whose buffers are host memory and show in the RSS figures."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_description() -> dict[str, Any]:
    """CPU model, usable cores, RAM, library versions and JAX devices of this machine."""
    import jax
    import jaxlib
    import numpy as np

    mem_kib = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cores_total": os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "devices": [str(d) for d in jax.devices()],
        "load_avg_1min": os.getloadavg()[0],
    }


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Measured matmul GFLOP/s of this machine: a jitted float32 (n, n) @ (n, n) in JAX (XLA's
    CPU or GPU kernel), numpy's BLAS, and JAX in bfloat16 with float32 accumulation
    ("jax_bf16", the screened kNN's matmul), best of `repeats`. Serves as the achievable peak."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, n)).astype(np.float32)
    b = rng.normal(size=(n, n)).astype(np.float32)
    a_j, b_j = jnp.asarray(a), jnp.asarray(b)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    a_bf16, b_bf16 = a_j.astype(jnp.bfloat16), b_j.astype(jnp.bfloat16)
    matmul_bf16 = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    seconds = best_of(
        {
            "jax": lambda: matmul(a_j, b_j).block_until_ready(),
            "numpy": lambda: a @ b,
            "jax_bf16": lambda: matmul_bf16(a_bf16, b_bf16).block_until_ready(),
        },
        repeats,
    )
    flops = 2.0 * n**3
    return {name: flops / s / 1e9 for name, s in seconds.items()}


class CompileCounter:
    """Counts XLA compilations (JAX's "Compiling ..." log records) while used as a context."""

    def __init__(self) -> None:
        import logging

        self.names: list[str] = []
        counter = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                message = record.getMessage()
                if message.startswith("Compiling "):
                    counter.names.append(message.split()[1])

        self._handler = _Handler(level=logging.DEBUG)

    def __enter__(self) -> CompileCounter:
        import logging

        import jax

        self._flag = jax.config.jax_log_compiles
        self._logger = logging.getLogger("jax")
        self._level = self._logger.level
        jax.config.update("jax_log_compiles", True)
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc_info: object) -> None:
        import jax

        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)
        jax.config.update("jax_log_compiles", self._flag)


class MemorySampler:
    """Peak anonymous and total resident memory of this process during a `with` block, MiB.

    The kernel's VmHWM counts file-backed pages too: a memory-mapped library that is read once
    shows up in it although those pages are page cache the kernel can drop at any time. Anonymous
    memory (RssAnon: heap, JAX buffers, numpy copies) is what can run a machine out of RAM, so a
    thread samples it every `interval` seconds; peak_total_mib is the exact VmHWM.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_anon_mib = 0.0
        self.peak_total_mib = 0.0
        self.seconds = 0.0

    def _sample(self) -> None:
        self.peak_anon_mib = max(self.peak_anon_mib, anon_mib())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemorySampler:
        import threading

        reset_peak_rss()
        self.anon_before_mib = anon_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._start
        self.peak_total_mib = peak_rss_mib()
