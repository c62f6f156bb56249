"""`patchcore.search=auto`: the fastest exact nearest-neighbour search of this machine.

Every candidate returns the float32 nearest bank row: `screened` (bfloat16 screen, certified
in float32), `exact` (the float32 search) and, where faiss-cpu is installed, `faiss`
(IndexFlatL2 on the host). The scorer recomputes each winner's distance from the difference
whichever ran, so the choice changes the time and never the scores (near-ties within float32
rounding aside, `faiss_search`), and it can follow what the device measurably does:

- GPU / TPU: `screened`, from the device kind alone: its bfloat16 screen runs on the tensor
  cores / MXU, several times faster than float32 matmuls there.
- CPU: bfloat16 matmuls are fast with Intel AMX and slower than float32 without it, and faiss's
  BLAS may beat XLA's float32 GEMM, so the candidates are timed on a synthetic bank
  (`CALIBRATION`: a few seconds) the first time, and the fastest is kept in
  $XDG_CACHE_HOME/lsfa_jax/knn_search.json (default ~/.cache/lsfa_jax/knn_search.json), one
  entry per `machine_key` (CPU model, threads, jax / jaxlib / faiss versions). An unreadable or
  corrupt file is measured again with a warning; one that cannot be written is only logged.

`resolve_search(search)` gives the search that runs for a configured one, with why: the run
manifest records it (extra "knn_search").
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging

from lsfa_jax.atomic_io import atomic_write_json
from lsfa_jax.patchcore import faiss_search, knn
from lsfa_jax.timing import best_times

IN_GRAPH = ("screened", "exact")  # the candidates that run inside jit
CACHE_FORMAT = 1
# How the CPU candidates are timed: each on random rows of `dim` columns (the xyz features'),
# `queries` x `rows` in the shape the scorer gives it, all with the same work (2**25
# query-row pairs, a third of one image against a 100k-row bank). Every search also pays a
# cost per distance besides the dot product (faiss's and XLA's argmin passes, the screen's
# bounds), so `dim` must be the real one. The in-graph searches see one image's patches at a
# time and pay a fixed cost per query (the screen's float32 re-rank of 48 rows, its exact
# redo of up to 64 queries), which a large bank amortises as the real xyz banks (60k-113k
# rows) do; faiss sees a batch's patches at once and pays a cost per call, which many queries
# amortise. Best of `repeats` after one warm-up.
CALIBRATION = {
    "dim": 1152,
    "repeats": 3,
    "queries_rows": {"screened": [1024, 32768], "exact": [1024, 32768], "faiss": [4096, 8192]},
}
_ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True)
class SearchChoice:
    """The search that runs for a configured `patchcore.search`, and why.

    configured: what the config asked for; search: what runs (never "auto"); source: config
    (not auto), device (decided by the device kind), calibrated (measured now) or cache
    (measured earlier on this machine); reason: one line for logs; seconds: the timings it
    was chosen from (empty when none).
    """

    configured: str
    search: str
    source: str
    reason: str
    seconds: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seconds": dict(self.seconds)}


def cache_file() -> Path:
    """$XDG_CACHE_HOME/lsfa_jax/knn_search.json; ~/.cache when XDG_CACHE_HOME is unset or
    relative (the XDG spec says to ignore relative paths)."""
    root = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(root) if os.path.isabs(root) else Path.home() / ".cache"
    return base / "lsfa_jax" / "knn_search.json"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every OS
        return os.cpu_count() or 1


def machine_key() -> str:
    """What the timings depend on: device, CPU model, usable threads and library versions."""
    device = jax.devices()[0]
    return " | ".join(
        (
            f"{device.platform}: {device.device_kind}",
            cpu_model(),
            f"{_threads()} threads",
            f"jax {jax.__version__}",
            f"jaxlib {jaxlib.__version__}",
            f"faiss {faiss_search.version() or 'absent'}",
        )
    )


def candidates() -> tuple[str, ...]:
    """The exact searches that can run here: the in-graph ones, and faiss when installed."""
    return (*IN_GRAPH, "faiss") if faiss_search.available() else IN_GRAPH


def _timed_search(search: str, queries: np.ndarray, bank: np.ndarray) -> Callable[[], object]:
    """A call of `search` for these rows as the scorer makes it (bank_chunk 4096; the bank's
    index is built here, once, untimed like the scorer's once per bank)."""
    bank_j, queries_j = jnp.asarray(bank), jnp.asarray(queries)
    valid = jnp.ones((bank.shape[0],), bool)
    chunk = min(4096, bank.shape[0])
    if search == "screened":
        index = jax.block_until_ready(knn.search_index(bank_j, valid))
        return lambda: jax.block_until_ready(
            knn.screened_nearest_neighbour(
                queries_j, bank_j, index, bank_chunk=chunk, exact_chunk=chunk
            )
        )
    if search == "exact":
        return lambda: jax.block_until_ready(
            knn.nearest_neighbours(queries_j, bank_j, valid, k=1, bank_chunk=chunk)
        )
    host_index = faiss_search.faiss_index(bank, np.ones((bank.shape[0],), bool))
    return lambda: faiss_search.nearest_rows(host_index, queries)


def calibrate(
    searches: tuple[str, ...], calibration: Mapping[str, Any] | None = None
) -> dict[str, float]:
    """Seconds of each search on random rows in its `calibration` shape (default and layout:
    `CALIBRATION`)."""
    calibration = CALIBRATION if calibration is None else calibration
    shapes = {search: calibration["queries_rows"][search] for search in searches}
    rng = np.random.default_rng(0)
    # One draw, sliced per search: drawing is a good part of the calibration's time.
    rows = rng.standard_normal(
        (max(r for _, r in shapes.values()), calibration["dim"]), dtype=np.float32
    )
    queries = rng.standard_normal(
        (max(q for q, _ in shapes.values()), calibration["dim"]), dtype=np.float32
    )
    fns = {s: _timed_search(s, queries[:q], rows[:r]) for s, (q, r) in shapes.items()}
    return {name: seconds for name, (seconds, _) in best_times(fns, calibration["repeats"]).items()}


def _read_entries(path: Path) -> dict[str, Any]:
    """The cache file's entries; {} (with a warning) when it is missing or unreadable."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError(f"not a format-{CACHE_FORMAT} kNN search cache")
        if not isinstance(data.get("entries"), dict):
            raise ValueError("no entries")
        return data["entries"]
    except (OSError, UnicodeDecodeError, ValueError) as error:
        logging.warning("%s: unreadable (%s); measuring the kNN searches again", path, error)
        return {}


def _entry_seconds(entry: Any, searches: tuple[str, ...]) -> dict[str, float] | None:
    """The timings of a cache entry, or None unless it times every one of `searches` on the
    current `CALIBRATION`."""
    if not isinstance(entry, dict) or entry.get("calibration") != CALIBRATION:
        return None
    seconds = entry.get("seconds")
    if not isinstance(seconds, dict) or set(seconds) != set(searches):
        return None
    if not all(isinstance(v, int | float) and v > 0 for v in seconds.values()):
        return None
    return {k: float(v) for k, v in seconds.items()}


def remember(
    path: Path, key: str, seconds: Mapping[str, float], entries: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Stores `seconds` (search -> measured seconds) as `key`'s entry of the cache at `path`,
    keeping the other machines' `entries` (default: the file's); returns the entry. A failed
    write is logged only."""
    entry = {
        "search": min(seconds, key=seconds.__getitem__),
        "seconds": dict(seconds),
        "calibration": CALIBRATION,
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    entries = {**(_read_entries(path) if entries is None else entries), key: entry}
    try:
        atomic_write_json(path, {"format": CACHE_FORMAT, "entries": entries})
    except OSError as error:
        logging.warning("%s: cannot store the kNN search choice (%s)", path, error)
    return entry


def _summary(seconds: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {s:.3f} s" for name, s in sorted(seconds.items(), key=lambda x: x[1]))


def choose_search(path: Path | None = None) -> SearchChoice:
    """auto's choice on this machine (see the module docstring); `path` defaults to
    `cache_file()`. Measures (and stores) only when the cache has no valid entry for it."""
    device = jax.devices()[0]
    if device.platform in _ACCELERATORS:
        return SearchChoice(
            "auto",
            "screened",
            "device",
            f"{device.platform} device {device.device_kind!r}: the bfloat16 screen runs on its "
            "matrix units (not measured)",
        )
    path = cache_file() if path is None else path
    key = machine_key()
    searches = candidates()
    entries = _read_entries(path)
    entry = entries.get(key)
    seconds = _entry_seconds(entry, searches)
    source = "cache"
    if seconds is None:
        if entry is not None:
            logging.warning("%s: bad entry for %s; measuring the kNN searches again", path, key)
        logging.info("kNN search auto: timing %s (once per machine): %s", searches, CALIBRATION)
        seconds = calibrate(searches)
        entry = remember(path, key, seconds, entries)
        source = "calibrated"
    search = min(seconds, key=seconds.__getitem__)
    when = f", measured {entry['measured_at']}" if isinstance(entry, dict) else ""
    return SearchChoice(
        "auto",
        search,
        source,
        f"fastest exact search measured on {cpu_model()} ({_threads()} threads): "
        f"{_summary(seconds)} for the same work, 2**25 query-row pairs of {CALIBRATION['dim']} "
        f"dims ({source}: {path}{when})",
        tuple(sorted(seconds.items())),
    )


def _agree_across_processes(choice: SearchChoice) -> SearchChoice:
    """Process 0's choice on every process: the scorer's program is one SPMD program."""
    if jax.process_count() == 1:
        return choice
    from jax.experimental import multihost_utils

    names = (*IN_GRAPH, "faiss")
    first = names[int(multihost_utils.broadcast_one_to_all(np.int32(names.index(choice.search))))]
    if first == choice.search:
        return choice
    return dataclasses.replace(choice, search=first, reason=f"process 0's choice ({choice.reason})")


_CHOSEN: dict[tuple[str, Path], SearchChoice] = {}


def auto_search() -> SearchChoice:
    """`choose_search()` once per process (and machine key and cache file), logged."""
    memo = (machine_key(), cache_file())
    if memo not in _CHOSEN:
        choice = _agree_across_processes(choose_search(memo[1]))
        logging.info("kNN search auto -> %s: %s", choice.search, choice.reason)
        _CHOSEN[memo] = choice
    return _CHOSEN[memo]


def resolve_search(search: str) -> SearchChoice:
    """The search that runs for a configured `patchcore.search`: auto's choice, else itself."""
    if search == "auto":
        return auto_search()
    return SearchChoice(search, search, "config", "configured")


def in_graph_search(search: str) -> SearchChoice:
    """The search an exported program runs for a model scored with `search`: faiss cannot be
    embedded in a program, so faiss becomes exact (the same float32 nearest rows, in graph);
    auto becomes auto's choice here, with faiss so replaced."""
    choice = resolve_search(search)
    if choice.search != "faiss":
        return choice
    return dataclasses.replace(
        choice,
        search="exact",
        reason=f"faiss runs on the host and cannot be exported; exact is its in-graph "
        f"equivalent (same nearest rows) [{choice.reason}]",
    )
