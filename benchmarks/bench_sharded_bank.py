"""Scoring time per image against a memory bank split over 1, 2, 4 host devices.

`patchcore.shard_bank` (`lsfa_jax.patchcore.sharding`): every device searches the whole batch
against its own 1/d of the bank's rows, then the devices agree on the nearest row. Each device
count runs in its own process (XLA reads `--xla_force_host_platform_device_count` once, at
start). On a CPU the host devices share the machine's cores, so these figures show what the
sharding costs on top of the search, not the speed-up of d real devices; 1 device also runs the
unsharded scorer (`scorer.score_features`, bank replicated) for comparison.

    .venv/bin/python benchmarks/bench_sharded_bank.py                  # bank 100k x 1152
    .venv/bin/python benchmarks/bench_sharded_bank.py --rows 20000 --patches 784 --repeats 1

Times are the best of --repeats calls after one warm-up (compilation excluded) over a batch of
--batch images of --patches patches; scores are checked against the unsharded ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, cpu_model, emit, parse_results

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One device count: this process's host devices, every search asked for."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs.base import get_base_config
    from lsfa_jax.mesh import make_mesh
    from lsfa_jax.patchcore.bank import MemoryBank, with_search_index
    from lsfa_jax.patchcore.normalisation import identity_stats
    from lsfa_jax.patchcore.scorer import ScoringSettings, score_features
    from lsfa_jax.patchcore.sharding import score_features_sharded, shard_size

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    padded = -(-args.rows // 4096) * 4096  # as the run pads its banks
    features = np.zeros((padded, args.dim), np.float32)
    features[: args.rows] = rows
    bank = with_search_index(
        MemoryBank(jnp.asarray(features), jnp.arange(padded) < args.rows, identity_stats())
    )
    images = rng.standard_normal((args.batch, args.patches, args.dim), dtype=np.float32)
    mesh = make_mesh()
    base = ScoringSettings.from_config(get_base_config())
    for search in args.searches:
        settings = dataclasses.replace(base, search=search, batch_size=args.batch)
        fns = {"sharded": lambda s=settings: score_features_sharded(bank, images, s, mesh=mesh)}
        if mesh.size == 1:
            fns["unsharded"] = lambda s=settings: score_features(bank, images, s, mesh=mesh)
        scores = {name: np.asarray(fn()[0]) for name, fn in fns.items()}
        for name, value in best_of(fns, args.repeats).items():
            emit(
                bench="sharded_bank",
                devices=mesh.size,
                scorer=name,
                search=search,
                bank_rows=padded,
                rows_per_device=shard_size(padded, mesh.size) if name == "sharded" else padded,
                dim=args.dim,
                patches=args.patches,
                batch=args.batch,
                seconds_per_image=value / args.batch,
                scores=[float(v) for v in scores[name]],
                load_avg_1min=os.getloadavg()[0],
                cpu=cpu_model(),
                jax=jax.__version__,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="valid bank rows")
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--patches", type=int, default=3136, help="patches per image")
    parser.add_argument("--batch", type=int, default=4, help="images per call (all devices)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--searches", nargs="+", default=["screened"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    records = []
    forwarded = [a for a in sys.argv[1:] if a != "--worker"]
    for devices in args.devices:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        done = subprocess.run(
            [sys.executable, __file__, *forwarded, "--worker"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"{devices} devices failed:\n{done.stderr[-4000:]}")
        found = parse_results(done.stdout)
        records += found
        for record in found:
            emit(**record)
    reference = {
        r["search"]: r["scores"]
        for r in records
        if r["devices"] == 1 and r["scorer"] == "unsharded"
    }
    print(
        f"\nbank {records[0]['bank_rows']} x {args.dim}, {args.batch} images x {args.patches} "
        f"patches; cpu {records[0]['cpu']}"
    )
    print("devices  scorer     search    rows/device  s/image  load  max |score - 1-device|")
    for r in records:
        worst = max(abs(a - b) for a, b in zip(r["scores"], reference[r["search"]], strict=True))
        print(
            f"{r['devices']:>7}  {r['scorer']:<9}  {r['search']:<8}  {r['rows_per_device']:>11}"
            f"  {r['seconds_per_image']:7.2f}  {r['load_avg_1min']:4.1f}  {worst:.1e}"
        )


if __name__ == "__main__":
    main()
