"""Preparation speed: support-plane removal per file against a plain Open3D implementation of
the public preprocessing script, and whole-class preparation throughput.

Sections (`--sections`, comma-separated):
  plane      per file, on the real MVTec 3D-AD samples (read + plane removal) and on synthetic
             800x800 clouds (plane removal): the reference and ours interleaved in this process,
             so that load from other processes hits both alike; the kept-point masks compared.
  class      prepare_dataset of a class made of the real samples repeated (fresh cache: read,
             plane removal, resize, TFDS write), with 1 worker and with the default; wall time,
             CPU% of this process tree, how many of its threads were running (sampled every
             100 ms) and the load average.
  synthetic  synthetic generation and prepare_dataset throughput on the small synthetic set.

  PYTHONPATH=. python benchmarks/bench_prepare.py [--sections=plane,class] [--num_workers=0]
"""

from __future__ import annotations

import dataclasses
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import ml_collections
import numpy as np
import open3d as o3d
from absl import app, flags, logging

from lsfa_jax.data import mvtec3d, prepare, preprocess, synthetic, tfds_builders

_SECTIONS = flags.DEFINE_list("sections", ["plane", "class", "synthetic"], "what to measure")
_WORKERS = flags.DEFINE_integer("num_workers", 0, "processes; 0 = all CPU cores")
_SIZE = flags.DEFINE_integer("image_size", 224, "prepared image size")
_REPEATS = flags.DEFINE_integer("repeats", 1, "timed runs per file and method (best kept)")
_COPIES = flags.DEFINE_integer("class_copies", 6, "times each real sample is prepared")
_SYNTHETIC_CLOUDS = flags.DEFINE_integer("synthetic_clouds", 3, "800x800 synthetic clouds")
_REAL = flags.DEFINE_string(
    "real_root",
    str(Path(__file__).resolve().parents[2] / "shared/data/mvtec3d_sample"),
    "folder with real MVTec 3D-AD samples (skipped when absent)",
)

SYNTHETIC = synthetic.SyntheticConfig()  # 3 classes x 42 samples, 128 px raw
PARAMS = preprocess.PlaneRemovalParams()


def _load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


# --- The reference: the public script's steps, written plainly with Open3D. ---------------


def reference_plane_removal(xyz: np.ndarray, rgb: np.ndarray, seed: int) -> np.ndarray:
    """The public script's steps on one cloud; returns the kept-point mask (H, W) and the
    points it clustered (H, W).

    RANSAC plane of the four 10-pixel border strips (concatenated, so the corners count twice),
    points within 5 mm of it removed (xyz and rgb zeroed), the square padding (a no-op on square
    multiples of 100 px), Open3D DBSCAN on the nonzero points and the most frequent label kept.
    RANSAC is seeded with our per-sample seed; ours samples each border point once, so the two
    planes can differ slightly and move a point or two across the 5 mm threshold.
    """
    xyz, rgb = xyz.copy(), rgb.copy()
    strips = np.concatenate(
        [part.reshape(-1, 3) for part in (xyz[:10], xyz[-10:], xyz[:, :10], xyz[:, -10:])]
    )
    strips = strips[np.all(strips != 0, axis=1)]
    o3d.utility.random.seed(seed)
    plane, _ = o3d.geometry.PointCloud(
        o3d.utility.Vector3dVector(strips.astype(np.float64))
    ).segment_plane(distance_threshold=0.004, ransac_n=50, num_iterations=1000)
    # The distance in float64 as ours computes it: summed in another order, a point at 5 mm
    # from the plane can round to the other side, which is no matter of the clustering.
    near = np.abs(xyz.astype(np.float64) @ plane[:3] + plane[3]) < 0.005
    xyz[near] = 0
    rgb[near] = 0
    side = max(-(-xyz.shape[0] // 100), -(-xyz.shape[1] // 100)) * 100
    top, left = (side - xyz.shape[0]) // 2, (side - xyz.shape[1]) // 2
    xyz = np.pad(
        xyz, ((top, side - xyz.shape[0] - top), (left, side - xyz.shape[1] - left), (0, 0))
    )
    flat = xyz.reshape(-1, 3)
    nonzero = np.flatnonzero(np.all(flat != 0, axis=1))
    labels = np.asarray(
        o3d.geometry.PointCloud(
            o3d.utility.Vector3dVector(flat[nonzero].astype(np.float64))
        ).cluster_dbscan(eps=0.006, min_points=30)
    )
    values, counts = np.unique(labels, return_counts=True)
    kept = np.zeros(len(flat), bool)
    kept[nonzero[labels == values[np.argmax(counts)]]] = True
    crop = (slice(top, top + rgb.shape[0]), slice(left, left + rgb.shape[1]))
    clustered = np.zeros(len(flat), bool)
    clustered[nonzero] = True
    return kept.reshape(xyz.shape[:2])[crop], clustered.reshape(xyz.shape[:2])[crop]


def _ours(xyz: np.ndarray, rgb: np.ndarray, seed: int):
    out, _, info = preprocess.remove_support_plane(xyz, rgb, PARAMS, seed)
    return preprocess.valid_points(out), info


def _timed(fn, read, seed: int):
    start = time.perf_counter()
    mask, info = fn(*read(), seed)
    return time.perf_counter() - start, mask, info


def _compare(label: str, inputs, repeats: int) -> None:
    """`inputs`: (name, callable returning (xyz, rgb), seed). Reference and ours alternate."""
    print(f"\n{label}  ({_load()})")
    print(
        f"{'cloud':<22} {'points':>7} {'clustered':>9} {'reference s':>11} {'ours s':>8} "
        f"{'speed-up':>8}  DBSCAN on the same points | kept masks"
    )
    ratios, total_ref, total_ours = [], 0.0, 0.0
    for name, read, seed in inputs:
        ref_times, our_times = [], []
        for _ in range(repeats):
            t_ref, ref_mask, ref_clustered = _timed(reference_plane_removal, read, seed)
            t_ours, our_mask, info = _timed(_ours, read, seed)
            ref_times.append(t_ref)
            our_times.append(t_ours)
        t_ref, t_ours = min(ref_times), min(our_times)
        total_ref += t_ref
        total_ours += t_ours
        ratios.append(t_ref / t_ours)
        differ = int(np.sum(ref_mask != our_mask))
        # The clustering alone, on the points the reference clustered: must be equal.
        same_input = preprocess.largest_cluster(read()[0], ref_clustered, PARAMS).keep
        cluster_differ = int(np.sum(same_input != ref_mask))
        points = int(preprocess.valid_points(read()[0]).sum())
        clustered = info.num_kept + info.num_cluster_removed
        print(
            f"{name:<22} {points:7d} {clustered:9d} {t_ref:11.3f} {t_ours:8.3f} "
            f"{t_ref / t_ours:7.1f}x  "
            + ("equal" if cluster_differ == 0 else f"{cluster_differ} POINTS DIFFER")
            + " | "
            + ("equal" if differ == 0 else f"{differ} points differ (plane)")
            + (f" (Open3D fallback: {info.dbscan_fallback})" if info.dbscan_fallback else "")
        )
    print(
        f"{'total':<22} {'':>7} {'':>9} {total_ref:11.3f} {total_ours:8.3f} "
        f"{total_ref / total_ours:7.1f}x  per file: min {min(ratios):.1f}x, "
        f"median {np.median(ratios):.1f}x  ({_load()})"
    )


def _plane_section() -> None:
    real = Path(_REAL.value)
    if (real / "cable_gland").is_dir():
        files = [f for s in mvtec3d.SPLITS for f in mvtec3d.list_samples(real, "cable_gland", s)]
        inputs = [
            (
                f.file_id,
                lambda f=f: (lambda raw: (raw.xyz, raw.rgb))(mvtec3d.read_sample(f)),
                preprocess.sample_seed(0, f.file_id),
            )
            for f in files
        ]
        _compare(
            "plane removal per file, real cable_gland 400x400 (read included)",
            inputs,
            _REPEATS.value,
        )
    else:
        print(f"real samples not found at {real}: skipped")
    cfg = synthetic.SyntheticConfig(image_size=800)
    clouds = [
        synthetic.render_sample(cfg, cfg.classes[i % len(cfg.classes)], "train", "good", i)
        for i in range(_SYNTHETIC_CLOUDS.value)
    ]
    inputs = [
        (f"{cfg.classes[i % len(cfg.classes)]}/{i}", lambda c=c: (c["xyz"], c["rgb"]), i)
        for i, c in enumerate(clouds)
    ]
    _compare("plane removal per cloud, synthetic 800x800 (in memory)", inputs, _REPEATS.value)


class _ThreadSampler:
    """Samples, every 100 ms, how many threads of this process and its children are running."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self) -> list[int]:
        parents, pids = {}, []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/stat") as stat:
                        parents[int(entry.name)] = int(stat.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
        frontier = [os.getpid()]
        while frontier:
            pid = frontier.pop()
            pids.append(pid)
            frontier += [child for child, parent in parents.items() if parent == pid]
        return pids

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            running = 0
            for pid in self._tree():
                try:
                    for task in os.scandir(f"/proc/{pid}/task"):
                        with open(f"{task.path}/stat") as stat:
                            running += stat.read().rsplit(")", 1)[1].split()[0] == "R"
                except OSError:
                    continue
            self.samples.append(running - 1)  # not this sampler

    def __enter__(self) -> _ThreadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _data_cfg(name: str, data_dir: Path, classes: tuple[str, ...], preprocess_on: bool):
    return ml_collections.ConfigDict(
        dict(
            name=name,
            data_dir=str(data_dir),
            classes=classes,
            image_size=_SIZE.value,
            preprocess=preprocess_on,
            plane=dataclasses.asdict(PARAMS),
            num_workers=_WORKERS.value,
            seed=0,
            synthetic=SYNTHETIC.to_json(),
        )
    )


def _time_prepare(cfg: ml_collections.ConfigDict, num_samples: int, label: str) -> None:
    with tempfile.TemporaryDirectory() as cache, _ThreadSampler() as sampler:
        cpu, start = _cpu_seconds(), time.perf_counter()
        prepare.prepare_dataset(cfg, cache)
        seconds = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu
    running = np.array(sampler.samples or [0])
    print(
        f"{label:<52} {num_samples:4d} samples {seconds:7.2f} s {num_samples / seconds:6.2f} /s "
        f"CPU {100 * cpu / seconds:4.0f}%  running threads mean {running.mean():.2f} "
        f"p95 {np.percentile(running, 95):.0f}  ({_load()})"
    )


def _warm_up(raw: Path, name: str, class_name: str) -> None:
    """Untimed: the first prepare in a process pays TensorFlow's start-up."""
    with tempfile.TemporaryDirectory() as cache:
        warm = _data_cfg(name, raw, (class_name,), False)
        warm.image_size = 16
        warm.num_workers = 1
        prepare.prepare_dataset(warm, cache)


def _repeated_class(real: Path, copies: int, root: Path) -> int:
    """A cable_gland class under `root` whose train split holds every real sample `copies`
    times and whose test split holds each once (symbolic links to the good-sample layout), long
    enough for the pool's start-up not to dominate. Returns its number of samples."""
    files = [f for s in mvtec3d.SPLITS for f in mvtec3d.list_samples(real, "cable_gland", s)]
    for split, count in (("train", copies * len(files)), ("test", len(files))):
        good = root / "cable_gland" / split / "good"
        (good / "rgb").mkdir(parents=True)
        (good / "xyz").mkdir()
        for index in range(count):
            f = files[index % len(files)]
            (good / "rgb" / f"{index:04d}.png").symlink_to(f.rgb_path.resolve())
            (good / "xyz" / f"{index:04d}.tiff").symlink_to(f.xyz_path.resolve())
    return (copies + 1) * len(files)


def _pool_start_seconds(workers: int) -> float:
    start = time.perf_counter()
    with tfds_builders.make_pool(workers) as pool:
        pool.map(abs, range(workers))
    return time.perf_counter() - start


def _class_section() -> None:
    real = Path(_REAL.value)
    if not (real / "cable_gland").is_dir():
        print(f"real samples not found at {real}: skipped")
        return
    default = tfds_builders.resolve_workers(_WORKERS.value)
    with tempfile.TemporaryDirectory() as tmp:
        num = _repeated_class(real, _COPIES.value, Path(tmp))
        print(
            f"\nwhole-class preparation, the {num // (_COPIES.value + 1)} real cable_gland "
            f"samples x {_COPIES.value + 1} ({os.cpu_count()} cores, {_load()})"
        )
        _warm_up(Path(tmp), "mvtec3d", "cable_gland")
        if default > 1:
            print(f"pool start-up ({default} workers, included below): "
                  f"{_pool_start_seconds(default):.2f} s")  # fmt: skip
        for workers in sorted({1, default}):
            cfg = _data_cfg("mvtec3d", Path(tmp), ("cable_gland",), True)
            cfg.num_workers = workers
            _time_prepare(cfg, num, f"cable_gland prepare, preprocess, {workers} worker(s)")
        cfg = _data_cfg("mvtec3d", Path(tmp), ("cable_gland",), False)
        _time_prepare(cfg, num, f"cable_gland prepare, no preprocess, {default} worker(s)")


def _synthetic_section() -> None:
    workers = tfds_builders.resolve_workers(_WORKERS.value)
    per_class = (
        SYNTHETIC.num_train
        + SYNTHETIC.num_validation
        + SYNTHETIC.num_test_good
        + 3 * SYNTHETIC.num_test_per_defect
    )
    num_synthetic = per_class * len(SYNTHETIC.classes)
    print(f"\nsynthetic dataset, workers={workers} image_size={_SIZE.value}")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "synthetic"
        start = time.perf_counter()
        synthetic.generate_dataset(raw, SYNTHETIC, num_workers=workers)
        seconds = time.perf_counter() - start
        label = f"synthetic generate ({SYNTHETIC.image_size} px raw)"
        print(f"{label:<52} {num_synthetic:4d} samples {seconds:7.2f} s "
              f"{num_synthetic / seconds:6.2f} /s")  # fmt: skip
        _warm_up(raw, "synthetic", SYNTHETIC.classes[0])
        for on in (False, True):
            cfg = _data_cfg("synthetic", raw, SYNTHETIC.classes, on)
            _time_prepare(cfg, num_synthetic, f"synthetic prepare, preprocess={on}")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} cores, {_load()}")
    sections = {"plane": _plane_section, "class": _class_section, "synthetic": _synthetic_section}
    unknown = set(_SECTIONS.value) - set(sections)
    if unknown:
        raise app.UsageError(f"unknown --sections {sorted(unknown)}; known: {sorted(sections)}")
    for name in _SECTIONS.value:
        sections[name]()


if __name__ == "__main__":
    app.run(main)
