"""Point-branch throughput and peak memory: JAX vs the torch reference
(tests/helpers/torch_point_mae.py).

One organized cloud (default: MVTec 3D-AD cable_gland test/good/000, legacy-nearest resized to
224x224) goes through the whole point branch at the real config (1024 groups of 128, 12 x 384
encoder, random weights shared by both): grouping, encoder, 3-NN interpolation, 56x56 grid.
Each backend runs in its own subprocess so its peak resident memory is measured alone.

  .venv/bin/python benchmarks/bench_point_mae.py [--xyz FILE.tiff] [--repeats 3] [--out x.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tests.helpers.torch_point_mae as reference
from lsfa_jax.atomic_io import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_XYZ = REPO.parent / "shared/data/mvtec3d_sample/cable_gland/test/good/xyz/000.tiff"
CFG = reference.REAL_CFG


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run_backend(backend: str, xyz: Path, repeats: int) -> dict:
    """Runs in the child process: times `repeats` warm calls after one first call."""
    import numpy as np
    import tifffile

    cloud = reference.legacy_nearest_224(tifffile.imread(xyz).astype(np.float32))
    n_valid = int(np.all(cloud != 0, axis=-1).sum())
    model = reference.make_torch_model(CFG, seed=0)

    if backend == "jax":
        import jax

        from lsfa_jax.features import point_mae_grid
        from lsfa_jax.models import point_mae

        state = {k: v.numpy() for k, v in model.state_dict().items()}
        variables = point_mae.point_mae_params_from_state_dict(state, model_cfg=CFG, source="bench")

        def run():
            features, _ = point_mae_grid.point_mae_patch_grid(variables, cloud, CFG)
            return jax.block_until_ready(features)
    else:
        import torch

        def run():
            with torch.no_grad():
                return reference.torch_point_grid(model, cloud, 1024, 128, 56)[0]

    rss_before = _peak_rss_mib()
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return dict(
        backend=backend,
        valid_points=n_valid,
        first_call_s=first,
        steady_s_per_sample=min(times),
        samples_per_s=1.0 / min(times),
        peak_rss_mib=_peak_rss_mib(),
        rss_before_run_mib=rss_before,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xyz", type=Path, default=DEFAULT_XYZ)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--backend", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.xyz.is_file():
        raise SystemExit(f"{args.xyz}: xyz tiff not found (pass --xyz)")
    if args.backend:
        print(json.dumps(_run_backend(args.backend, args.xyz, args.repeats)))
        return

    results = []
    for backend in ("jax", "torch"):
        command = [sys.executable, __file__, "--backend", backend, "--xyz", str(args.xyz)]
        command += ["--repeats", str(args.repeats)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
        if done.returncode:
            raise SystemExit(f"{backend} benchmark failed:\n{done.stderr}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(f"cloud {args.xyz} ({results[0]['valid_points']} valid points at 224x224), config {CFG}")
    print(f"cpu cores: {os.cpu_count()}, repeats: {args.repeats} (best of)")
    header = f"{'backend':8} {'samples/s':>10} {'s/sample':>9} {'first call s':>13}"
    print(header + f" {'peak RSS MiB':>13} {'RSS before run':>15}")
    for r in results:
        print(
            f"{r['backend']:8} {r['samples_per_s']:10.3f} {r['steady_s_per_sample']:9.2f} "
            f"{r['first_call_s']:13.2f} {r['peak_rss_mib']:13.0f} {r['rss_before_run_mib']:15.0f}"
        )
    if args.out:
        atomic_write_json(args.out, dict(xyz=str(args.xyz), config=CFG, results=results))


if __name__ == "__main__":
    main()
