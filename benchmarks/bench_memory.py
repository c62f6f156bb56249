"""Host memory of building a PatchCore bank from a class-sized library kept on disk, per stage.

The library (N x 1152 float32, 1M rows = 4.4 GiB by default) is written once as a .npy memmap,
as the feature cache stores it, and the bank is built from it stage by stage with the project's
functions: statistics (`fit_feature_stats`), normalisation + sparse random projection
(`project_features`), greedy k-center (`greedy_k_center`), gathering the selected rows, and the
whole `build_memory_bank` call. For each stage the peak anonymous resident memory (heap, JAX
buffers, copies: what runs a machine out of RAM) and the peak total RSS (including memory-mapped
library pages, which are reclaimable page cache) are reported against the library's size.

The greedy loop runs a reduced number of iterations (--select, default 200): its memory does not
depend on the number of iterations (one (N,) vector of minimum distances), only its time does.
The same projected library is used to time the greedy step against a straightforward numpy
implementation (the reference's loop: norm of z - z[last], minimum, argmax), per iteration.

The reference pipeline's projection (sklearn SparseRandomProjection on the whole in-RAM library,
reference notes 9.1) is measured on --sklearn-rows rows (it needs the library in RAM, so only a
smaller N fits).

    .venv/bin/python benchmarks/bench_memory.py                   # 1M rows (writes 4.4 GiB)
    .venv/bin/python benchmarks/bench_memory.py --rows 200000     # --quick uses this
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MemorySampler, anon_mib, best_of, device_peak_mib, emit, machine_description

from lsfa_jax.patchcore import coreset
from lsfa_jax.patchcore.bank import build_memory_bank
from lsfa_jax.patchcore.normalisation import fit_feature_stats, normalise

DIM = 1152


def write_library(path: Path, rows: int, chunk: int = 65536) -> np.memmap:
    """(rows, DIM) float32 library of random features as a .npy memmap, written chunk by chunk
    (so writing it never holds more than one chunk), then reopened read-only."""
    rng = np.random.default_rng(0)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, DIM))
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        block = rng.standard_normal((stop - start, DIM), dtype=np.float32)
        array[start:stop] = block * 0.5 + 1.0
    array.flush()
    del array
    return np.load(path, mmap_mode="r")


def straightforward_greedy(z: np.ndarray, n_select: int) -> np.ndarray:
    """The reference's k-center loop in numpy: Euclidean norm to the last pick, running minimum,
    argmax; one full pass over z per iteration."""
    selected = [0]
    min_dist = np.linalg.norm(z - z[0], axis=1)
    for _ in range(n_select - 1):
        min_dist = np.minimum(min_dist, np.linalg.norm(z - z[selected[-1]], axis=1))
        selected.append(int(np.argmax(min_dist)))
    return np.asarray(selected)


def report(
    stage: str,
    sampler: MemorySampler,
    library_mib: float,
    rows: int,
    baseline_mib: float,
    **extra,
) -> None:
    """Prints and emits one stage. anon above baseline = peak anonymous memory minus the
    process's anonymous memory before the library was opened (interpreter, JAX runtime)."""
    anon = sampler.peak_anon_mib - baseline_mib
    print(
        f"  {stage:30s} {sampler.seconds:7.1f} s  anon above baseline {anon:7.0f} MiB "
        f"({anon / library_mib:5.2f}x library)  peak RSS incl. mapped {sampler.peak_total_mib:7.0f}"
        f" MiB ({sampler.peak_total_mib / library_mib:5.2f}x)"
    )
    emit(
        bench="memory",
        stage=stage,
        rows=rows,
        library_mib=library_mib,
        seconds=sampler.seconds,
        peak_anon_above_baseline_mib=anon,
        peak_anon_ratio=anon / library_mib,
        baseline_anon_mib=baseline_mib,
        device_peak_mib=device_peak_mib(),
        peak_rss_mib=sampler.peak_total_mib,
        peak_rss_ratio=sampler.peak_total_mib / library_mib,
        anon_before_mib=sampler.anon_before_mib,
        **extra,
    )


def compare_greedy(z: jax.Array, iterations: int) -> None:
    """ms per greedy iteration on the projected library: jitted loop vs straightforward numpy."""
    rows, k = z.shape
    z_np = np.asarray(z)
    seconds = best_of(
        {
            "jax": lambda: jax.block_until_ready(coreset.greedy_k_center(z, iterations)),
            "numpy": lambda: straightforward_greedy(z_np, iterations),
        },
        1,
    )
    same = np.array_equal(
        np.asarray(coreset.greedy_k_center(z, iterations)), straightforward_greedy(z_np, iterations)
    )
    per_iteration = {name: 1e3 * s / iterations for name, s in seconds.items()}
    print(
        f"  greedy per iteration on ({rows}, {k}): jax {per_iteration['jax']:.1f} ms, "
        f"straightforward numpy {per_iteration['numpy']:.1f} ms, ratio "
        f"{seconds['numpy'] / seconds['jax']:.2f}x; same selection: {same}"
    )
    emit(
        bench="coreset_greedy",
        rows=rows,
        projected_dim=k,
        iterations=iterations,
        jax_ms_per_iteration=per_iteration["jax"],
        numpy_ms_per_iteration=per_iteration["numpy"],
        speedup=seconds["numpy"] / seconds["jax"],
        same_selection=bool(same),
    )


def run(args: argparse.Namespace, folder: Path) -> None:
    jax.block_until_ready(jnp.zeros(1))  # start the runtime before taking the baseline
    baseline = anon_mib()
    start = time.perf_counter()
    library = write_library(folder / "library.npy", args.rows)
    library_mib = library.nbytes / 2**20
    print(
        f"library {library.shape} float32 = {library_mib:.0f} MiB on disk "
        f"(written in {time.perf_counter() - start:.0f} s); greedy iterations {args.select}"
    )
    key = jax.random.key(0)
    with MemorySampler() as sampler:
        stats = fit_feature_stats(library)
    report("statistics", sampler, library_mib, args.rows, baseline)

    k = coreset.johnson_lindenstrauss_min_dim(args.rows, 0.9)
    with MemorySampler() as sampler:
        matrix = coreset.sparse_random_projection_matrix(key, DIM, args.rows)
        z = jax.block_until_ready(coreset.project_features(library, matrix, stats=stats))
    report("normalise + project", sampler, library_mib, args.rows, baseline, projected_dim=k)

    with MemorySampler() as sampler:
        selected = jax.block_until_ready(coreset.greedy_k_center(z, args.select))
    report("greedy k-center", sampler, library_mib, args.rows, baseline, iterations=args.select)

    with MemorySampler() as sampler:
        rows = normalise(jnp.asarray(library[np.asarray(selected)]), stats)
        jax.block_until_ready(rows)
    report("gather coreset rows", sampler, library_mib, args.rows, baseline)

    compare_greedy(z, args.compare_iterations)
    del z, selected, rows

    ratio = args.select / args.rows
    with MemorySampler() as sampler:
        bank = build_memory_bank(library, ratio=ratio, key=key)
        jax.block_until_ready(bank)
    report("build_memory_bank (whole)", sampler, library_mib, args.rows, baseline, ratio=ratio)
    del bank

    if args.sklearn_rows:
        from sklearn.random_projection import SparseRandomProjection

        small_mib = args.sklearn_rows * DIM * 4 / 2**20
        baseline = anon_mib()
        with MemorySampler() as sampler:
            small = np.asarray(library[: args.sklearn_rows])  # the reference holds it in RAM
            SparseRandomProjection(eps=0.9, random_state=0).fit_transform(small)
        print(f"reference projection, sklearn on {args.sklearn_rows} rows read into RAM:")
        report("sklearn SparseRandomProjection", sampler, small_mib, args.sklearn_rows, baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--select", type=int, default=200, help="greedy iterations (reduced)")
    parser.add_argument("--compare-iterations", type=int, default=20)
    parser.add_argument("--sklearn-rows", type=int, default=100_000, help="0: skip")
    parser.add_argument("--dir", type=Path, help="folder for the temporary library file")
    args = parser.parse_args()
    print(machine_description())
    folder = args.dir or Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix="bench_memory.") as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
