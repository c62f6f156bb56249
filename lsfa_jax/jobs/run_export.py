"""mode=export: a model folder's classes as deployment artifacts.

  python main.py --config=configs/synthetic.py --config.mode=export \
      --config.checkpoint=<model folder> --workdir=W [--config.data.classes=box] \
      [--config.input=<samples>] [--config.overwrite=True]

writes W/export/<class>/ (see `lsfa_jax.export.artifacts`): model.jaxexport (jax + numpy, CPU
and CUDA), model.onnx (onnxruntime), example_inputs.npz, expected_outputs.npz (in-process
predict of the examples), signature.json, load.py and README.txt. The examples are the samples
`--config.input` names (as mode=predict reads them; `lsfa_jax.jobs.inputs`), or two generated
ones without it. Both programs are run on the examples before anything is written and must
match the in-process outputs within `artifacts.allowed_errors` (`artifacts.TOLERANCES`, carried
through the fusion). Plane removal (open3d) and, for method fpfh, the FPFH features stay in
Python: the deployment calls `lsfa_jax.data.preprocess.prepare_sample` (and
`features.fpfh.fpfh_patch_features`) first.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ml_collections
from absl import logging

from lsfa_jax.export import artifacts, load
from lsfa_jax.jobs.common import ConfigError, cache_dir, model_adaptors, open_model
from lsfa_jax.jobs.inputs import find_samples, prepared_inputs


def _classes(wanted: str, held: tuple[str, ...]) -> tuple[str, ...]:
    if wanted in ("", "all"):
        return held
    classes = tuple(c.strip() for c in wanted.split(",") if c.strip())
    unknown = [c for c in classes if c not in held]
    if unknown:
        raise ConfigError(
            f"config.data.classes: the model folder holds {list(held)}, not {unknown}"
        )
    return classes


def _check_parity(
    name: str, errors: dict[str, float], allowed: dict[str, float], where: Path
) -> None:
    bad = {k: f"{v:.3g} > {allowed[k]:.3g}" for k, v in errors.items() if v > allowed[k]}
    if bad:
        raise artifacts.ExportError(
            f"{where}: the {name} program differs from the in-process outputs beyond its "
            f"tolerance: {bad}; nothing was written"
        )


def run_export(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Path]:
    """Exports every selected class; returns {class: its export folder}."""
    try:
        import jax2onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"mode=export needs the export extra ({error.name} is missing): "
            "pip install -e '.[export]'"
        ) from error
    model_dir, info, run = open_model(config)
    classes = _classes(config.data.classes, tuple(info.classes))
    root = workdir / "export"
    existing = [str(root / c) for c in classes if (root / c).exists()]
    if existing and not config.overwrite:
        raise ConfigError(f"{existing}: export folder exists; pass --config.overwrite=True")
    adaptors = model_adaptors(model_dir, info)
    # The user's own samples as the examples the programs are checked on (and shipped with),
    # prepared as mode=predict prepares them; else generated ones.
    prepared, examples = None, "two generated samples (good, defective)"
    if config.input:
        samples = find_samples(Path(config.input))
        prepared = prepared_inputs(run, samples)
        examples = f"the {len(samples)} samples of {config.input}"
    written = {}
    for class_name in classes:
        export = artifacts.open_class(
            model_dir, info, run, class_name, adaptors, cache_dir(run, workdir)
        )
        inputs = artifacts.example_inputs(export, prepared)
        expected = artifacts.in_process_outputs(export, inputs, run.batch_size)
        jax_bytes = artifacts.export_jax(export)
        onnx_bytes = artifacts.export_onnx(export)
        sig = artifacts.signature(export, expected, examples)
        parity = {}
        with tempfile.TemporaryDirectory() as probe:
            probe_dir = Path(probe)
            (probe_dir / load.SIGNATURE_FILE).write_text(json.dumps(sig))
            (probe_dir / load.JAX_FILE).write_bytes(jax_bytes)
            (probe_dir / load.ONNX_FILE).write_bytes(onnx_bytes)
            for kind, opener in (("jax", load.load_program), ("onnx", load.load_onnx_program)):
                outputs = opener(probe_dir)(**inputs)
                parity[kind] = artifacts.max_relative_error(outputs, expected)
                _check_parity(kind, parity[kind], sig["tolerances"][kind], model_dir / class_name)
        sig["parity_at_export"] = parity
        files = {
            load.JAX_FILE: jax_bytes,
            load.ONNX_FILE: onnx_bytes,
            load.SIGNATURE_FILE: json.dumps(sig, indent=2).encode(),
            "example_inputs.npz": artifacts._npz(inputs),
            "expected_outputs.npz": artifacts._npz(expected),
            "load.py": Path(load.__file__).read_bytes(),
            "README.txt": artifacts.readme_text(sig, parity).encode(),
        }
        target = root / class_name
        artifacts.write_class_export(target, files, overwrite=bool(config.overwrite))
        written[class_name] = target
        sizes = ", ".join(
            f"{n} {len(b) / 2**20:.1f} MiB" for n, b in files.items() if len(b) > 2**20
        )
        logging.info("export %s: %s (%s); parity %s", class_name, target, sizes, parity)
        print(
            f"{class_name}: {target}; largest relative difference from in-process predict "
            "(of its tolerance): "
            + ", ".join(
                f"{kind} {max(errors.values()):.1e} "
                f"({max(v / sig['tolerances'][kind][k] for k, v in errors.items() if v):.0%})"
                for kind, errors in parity.items()
            )
        )
    return written
