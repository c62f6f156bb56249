"""Preparation throughput (samples/s): synthetic generation, and prepare_dataset (read,
optional plane removal, resize, TFDS write) on synthetic and on the real MVTec 3D-AD samples,
with and without preprocessing. Each run uses a fresh cache, so nothing is reused; the times
include starting the worker pool.

  python benchmarks/bench_prepare.py [--num_workers=0] [--image_size=224]
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import ml_collections
from absl import app, flags, logging

from lsfa_jax.data import prepare, preprocess, synthetic, tfds_builders

_WORKERS = flags.DEFINE_integer("num_workers", 0, "processes; 0 = all CPU cores")
_SIZE = flags.DEFINE_integer("image_size", 224, "prepared image size")
_REAL = flags.DEFINE_string(
    "real_root",
    str(Path(__file__).resolve().parents[2] / "shared/data/mvtec3d_sample"),
    "folder with real MVTec 3D-AD samples (skipped when absent)",
)

SYNTHETIC = synthetic.SyntheticConfig()  # 3 classes x 42 samples, 128 px raw


def _data_cfg(name: str, data_dir: Path, classes: tuple[str, ...], preprocess_on: bool):
    return ml_collections.ConfigDict(
        dict(
            name=name,
            data_dir=str(data_dir),
            classes=classes,
            image_size=_SIZE.value,
            preprocess=preprocess_on,
            plane=dataclasses.asdict(preprocess.PlaneRemovalParams()),
            num_workers=_WORKERS.value,
            seed=0,
            synthetic=SYNTHETIC.to_json(),
        )
    )


def _time_prepare(cfg: ml_collections.ConfigDict, num_samples: int, label: str) -> None:
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        prepare.prepare_dataset(cfg, cache)
        seconds = time.perf_counter() - start
    print(f"{label:<44} {num_samples:5d} samples {seconds:7.2f} s {num_samples / seconds:8.2f} /s")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    workers = tfds_builders.resolve_workers(_WORKERS.value)
    print(f"workers={workers} image_size={_SIZE.value}")
    per_class = (
        SYNTHETIC.num_train
        + SYNTHETIC.num_validation
        + SYNTHETIC.num_test_good
        + 3 * SYNTHETIC.num_test_per_defect
    )
    num_synthetic = per_class * len(SYNTHETIC.classes)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "synthetic"
        start = time.perf_counter()
        synthetic.generate_dataset(raw, SYNTHETIC, num_workers=workers)
        seconds = time.perf_counter() - start
        label = f"synthetic generate ({SYNTHETIC.image_size} px raw)"
        print(f"{label:<44} {num_synthetic:5d} samples {seconds:7.2f} s "
              f"{num_synthetic / seconds:8.2f} /s")  # fmt: skip
        # Untimed warm-up: the first prepare in a process pays TensorFlow's start-up.
        with tempfile.TemporaryDirectory() as cache:
            warm = _data_cfg("synthetic", raw, SYNTHETIC.classes[:1], False)
            warm.image_size = 16
            warm.num_workers = 1
            prepare.prepare_dataset(warm, cache)
        for on in (False, True):
            cfg = _data_cfg("synthetic", raw, SYNTHETIC.classes, on)
            _time_prepare(cfg, num_synthetic, f"synthetic prepare, preprocess={on}")

    real = Path(_REAL.value)
    if not (real / "cable_gland").is_dir():
        print(f"real samples not found at {real}: skipped")
        return
    num_real = sum(1 for _ in (real / "cable_gland").glob("*/*/xyz/*.tiff"))
    for on in (False, True):
        cfg = _data_cfg("mvtec3d", real, ("cable_gland",), on)
        _time_prepare(cfg, num_real, f"mvtec3d cable_gland (400 px) prepare, preprocess={on}")


if __name__ == "__main__":
    app.run(main)
