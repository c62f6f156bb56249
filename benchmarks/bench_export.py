"""Latency of a deployed class at batch 1: in-process predict, the exported JAX program,
onnxruntime and OpenVINO (CPU), one run, one machine.

The model has the paper's shapes, random weights and random banks (timing does not depend on
their values): DINO ViT-B/8 at 224, Point-MAE 1024 x 128 groups, encoder1 adaptors, banks of
30720 x 768 (RGB) and 61440 x 1152 (xyz) float32 rows, z-score fusion. In-process predict is
the library path `mode=predict` runs (features, adaptors, scoring, fusion on the host); the
exported JAX program and the ONNX graph are built from the same constants.

    .venv/bin/python benchmarks/bench_export.py             # paper shapes
    .venv/bin/python benchmarks/bench_export.py --quick     # the synthetic config's sizes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_of, machine_description
from configs.synthetic import get_config as synthetic_config
from lsfa_jax import fusion
from lsfa_jax.export import artifacts, inference, load
from lsfa_jax.features.source import feature_source
from lsfa_jax.model_folder import ClassModel
from lsfa_jax.models.adaptors import AdaptorSettings, LSFAModel, init_lsfa_params
from lsfa_jax.patchcore.bank import MemoryBank, with_search_index
from lsfa_jax.patchcore.normalisation import FeatureStats
from lsfa_jax.patchcore.scorer import ScoringSettings


def random_bank(rows: int, dim: int, seed: int) -> MemoryBank:
    rng = np.random.default_rng(seed)
    features = jnp.asarray(rng.normal(size=(rows, dim)).astype(np.float32))
    stats = FeatureStats(jnp.float32(0.0), jnp.float32(1.0))
    return with_search_index(MemoryBank(features, jnp.ones((rows,), bool), stats))


def paper_export(quick: bool) -> artifacts.ClassExport:
    """A ClassExport of paper-shaped (or, quick, synthetic-config-shaped) random parts."""
    config = synthetic_config()
    config.batch_size = 1
    if not quick:
        config.rgb_backbone.update(embed_dim=768, depth=12, num_heads=12)
        config.point_backbone.update(
            num_group=1024, group_size=128, trans_dim=384, depth=12, num_heads=6,
            out_layers=(3, 7, 11),
        )  # fmt: skip
        config.adaptation.update(rgb_heads=12, xyz_heads=12, proj_dim=128)
    source = feature_source(config, {}, Path(tempfile.mkdtemp()))
    rgb_dim = config.rgb_backbone.embed_dim
    xyz_dim = config.point_backbone.trans_dim * len(config.point_backbone.out_layers)
    settings = AdaptorSettings(
        rgb_heads=config.adaptation.rgb_heads, xyz_heads=config.adaptation.xyz_heads
    )
    model = LSFAModel(
        rgb_dim=rgb_dim,
        xyz_dim=xyz_dim,
        proj_dim=config.adaptation.proj_dim,
        rgb_heads=settings.rgb_heads,
        xyz_heads=settings.xyz_heads,
    )
    params = jax.tree.map(np.asarray, init_lsfa_params(model, jax.random.key(3)))
    rows = (4096, 8192) if quick else (30720, 61440)
    banks = {"rgb": random_bank(rows[0], rgb_dim, 1), "xyz": random_bank(rows[1], xyz_dim, 2)}
    level = {
        m: fusion.ScoreNormaliser("zscore", loc, 1.0 + loc, 8)
        for m, loc in (("rgb", 1.0), ("xyz", 2.0))
    }
    fused = fusion.Fusion("zscore", level, level)
    stored = ClassModel(fused, {"RGB+3D": {"threshold": 0.5}}, {})
    scoring = ScoringSettings.from_config(config)
    program = inference.class_program(
        method="lsfa", class_name="paper", modalities=("rgb", "xyz"), run=config,
        scoring=scoring, model=stored, adaptors=settings,
    )  # fmt: skip
    variables = {
        "banks": banks,
        "fusion": inference.fusion_arrays(fused),
        "rgb_backbone": source.backbones.rgb_params,
        "point_backbone": source.backbones.point_variables,
        "adaptors": jax.tree.map(jnp.asarray, params),
    }
    export = artifacts.ClassExport(program, variables, source, (params, settings), banks, fused)
    return export


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    export = paper_export(args.quick)
    inputs = artifacts.example_inputs(export)
    inputs = {k: v[1:2] for k, v in inputs.items()}  # batch 1: the defective sample
    expected = artifacts.in_process_outputs(export, inputs, 1)
    folder = Path(tempfile.mkdtemp(prefix="bench_export_"))
    built = {}
    t = time.perf_counter()
    (folder / load.JAX_FILE).write_bytes(artifacts.export_jax(export))
    built["jax"] = time.perf_counter() - t
    t = time.perf_counter()
    onnx_bytes = artifacts.export_onnx(export)
    built["onnx"] = time.perf_counter() - t
    (folder / load.ONNX_FILE).write_bytes(onnx_bytes)
    (folder / load.SIGNATURE_FILE).write_text(
        json.dumps(artifacts.signature(export, expected, "one generated sample"))
    )
    sizes = {p.name: p.stat().st_size / 2**20 for p in folder.iterdir()}
    print(f"built in {built} s; sizes MiB {sizes}", flush=True)

    jax_program = load.load_program(folder)
    onnx_program = load.load_onnx_program(folder)
    runners = {
        "in-process predict": lambda: artifacts.in_process_outputs(export, inputs, 1),
        "exported JAX (jax.export, CPU)": lambda: jax_program(**inputs),
        "onnxruntime (CPU)": lambda: onnx_program(**inputs),
    }
    parity = {
        "exported JAX (jax.export, CPU)": artifacts.max_relative_error(
            jax_program(**inputs), expected
        ),
        "onnxruntime (CPU)": artifacts.max_relative_error(onnx_program(**inputs), expected),
    }
    try:
        import openvino

        compiled = openvino.Core().compile_model(str(folder / load.ONNX_FILE), "CPU")

        def run_openvino():
            result = compiled(inputs)
            return {o.get_any_name(): result[o] for o in compiled.outputs}

        parity["OpenVINO (CPU)"] = artifacts.max_relative_error(run_openvino(), expected)
        runners["OpenVINO (CPU)"] = run_openvino
    except Exception as error:  # reported, not hidden: the table says it did not run
        print(f"OpenVINO: did not run ({type(error).__name__}: {str(error)[:500]})")
    for fn in runners.values():
        fn()  # warm-up (compilation, session optimisation)
    seconds = best_of(runners, args.repeats)
    print(f"\nload {os.getloadavg()}, {machine_description().get('cpu', '')}")
    print(
        f"| runtime | s / sample (batch 1, best of {args.repeats}) | max rel. error vs in-process |"
    )
    print("|---|---|---|")
    for name, value in seconds.items():
        error = max(parity.get(name, {"-": 0.0}).values())
        print(f"| {name} | {value:.3f} | {error:.1e} |")
    print(f"total {time.perf_counter() - start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
