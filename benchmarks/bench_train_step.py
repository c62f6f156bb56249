"""Time and memory of one LSFA adaptor training step (loss + AdamW + bank update).

Default shapes are the paper's: batch 8, 3136 patches, 768 / 1152 dims, projection 512, local
banks of 5e4 rows per class (10 classes), global banks of 100. Banks are pre-filled with random
rows so the nearest-neighbour search runs at full cost, and IFC is active from the first step.

    .venv/bin/python benchmarks/bench_train_step.py                       # paper shapes
    .venv/bin/python benchmarks/bench_train_step.py --patches 784 --bank 10000 --classes 2

Prints one JSON line: compile time, mean step time, the compiled step's buffer sizes from XLA's
memory analysis, and the process's peak resident memory (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs.base import get_base_config
from lsfa_jax.adaptation.banks import Bank
from lsfa_jax.adaptation.train import (
    build_model,
    init_train_state,
    make_mesh,
    make_train_step,
)


def train_step_figures(
    *,
    batch: int = 8,
    patches: int = 3136,
    rgb_dim: int = 768,
    xyz_dim: int = 1152,
    bank: int = 50_000,
    global_bank: int = 100,
    classes: int = 10,
    steps: int = 2,
    precision: str = "highest",
) -> dict:
    """Compile time, step times and XLA buffer sizes of one data-parallel train step."""
    shapes = dict(locals())
    cfg = get_base_config().adaptation.copy_and_resolve_references()
    cfg.update(
        dict(
            batch_size=batch,
            num_patches=patches,
            rgb_dim=rgb_dim,
            xyz_dim=xyz_dim,
            local_bank_size=bank,
            global_bank_size=global_bank,
            precision=precision,
            ifc_warmup_steps=0,
        )
    )
    total = 1000
    mesh = make_mesh()
    state = init_train_state(cfg, classes, total)
    rng = np.random.default_rng(0)

    def full(bank: Bank) -> Bank:
        K, M, C = bank.features.shape
        feats = jnp.asarray(rng.standard_normal((K, M, C), dtype=np.float32))
        return Bank(feats.astype(bank.features.dtype), bank.ptr, jnp.full((K,), M, jnp.int32))

    state = state.replace(banks={k: full(b) for k, b in state.banks.items()})
    data = dict(
        rgb=rng.standard_normal((batch, patches, rgb_dim), dtype=np.float32),
        xyz=rng.standard_normal((batch, patches, xyz_dim), dtype=np.float32),
        fg=rng.random((batch, patches)) < 0.7,
        class_id=(np.arange(batch) % classes).astype(np.int32),
        rgb_cls=rng.standard_normal((batch, rgb_dim), dtype=np.float32),
    )
    step_fn = make_train_step(build_model(cfg), cfg, mesh, total)

    t0 = time.perf_counter()
    compiled = step_fn.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()

    times, terms = [], None
    for _ in range(steps):
        t0 = time.perf_counter()
        state, terms = compiled(state, data)
        jax.block_until_ready((state, terms))
        times.append(time.perf_counter() - t0)
    mib = lambda n: round(n / 2**20, 1)
    return dict(
        device=str(jax.devices()[0].device_kind),
        num_devices=mesh.size,
        shapes=shapes,
        compile_s=round(compile_s, 2),
        step_s=[round(t, 3) for t in times],
        mean_step_s=round(float(np.mean(times)), 3) if times else None,
        loss=float(terms["total"]) if times else None,
        xla_argument_mib=mib(memory.argument_size_in_bytes) if memory else None,
        xla_temp_mib=mib(memory.temp_size_in_bytes) if memory else None,
        xla_output_mib=mib(memory.output_size_in_bytes) if memory else None,
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patches", type=int, default=3136)
    parser.add_argument("--rgb-dim", type=int, default=768)
    parser.add_argument("--xyz-dim", type=int, default=1152)
    parser.add_argument("--bank", type=int, default=50_000)
    parser.add_argument("--global-bank", type=int, default=100)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2, help="0: compile and memory only")
    parser.add_argument("--precision", default="highest", choices=("highest", "tf32", "bf16"))
    args = parser.parse_args()
    print(json.dumps(train_step_figures(**{k.replace("-", "_"): v for k, v in vars(args).items()})))


if __name__ == "__main__":
    main()
