"""TFDS builders of the prepared (preprocessed, resized) datasets: `mvtec3d` and `synthetic3d`.

One BuilderConfig per class. The raw MVTec-3D-format folder is the manual dir (never modified).
Examples are prepared by a process pool (`preprocess.prepare_sample`, per-sample seeds) and
written in sorted file-id order with shuffling disabled, so the order is deterministic.

Example features:
  rgb uint8 (S, S, 3), xyz float32 (S, S, 3), mask uint8 (S, S) in {0, 1},
  label int64 (0 good, 1 defect), defect_type, class, file_id (text).
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import multiprocessing.pool
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tqdm import tqdm

from lsfa_jax import console
from lsfa_jax.data import folder, mvtec3d, preprocess, synthetic

LAYOUTS = ("mvtec3d", "folder")


@dataclasses.dataclass(eq=False)
class PreparedConfig(tfds.core.BuilderConfig):
    """`plane=None` turns support-plane removal off. `layout` "folder" reads own data
    (`data.folder`): free names, optional masks, a held-out validation split when there is none
    (`validation_fraction`). `xyz_scale` converts the clouds to metres. `splits` limits which
    splits are prepared (a saved model is tested on the test split alone)."""

    class_name: str = ""
    image_size: int = 224
    plane: preprocess.PlaneRemovalParams | None = dataclasses.field(
        default_factory=preprocess.PlaneRemovalParams
    )
    seed: int = 0
    skip_bad_samples: bool = False
    layout: str = "mvtec3d"
    validation_fraction: float = 0.2
    xyz_scale: float = 1.0
    splits: tuple[str, ...] = mvtec3d.SPLITS


def _prepare_or_error(
    files: mvtec3d.SampleFiles, image_size: int, params, seed: int, xyz_scale: float = 1.0
) -> preprocess.PreparedSample | tuple[mvtec3d.SampleFiles, str]:
    """`prepare_sample`, with a bad file returned as (files, message) instead of raised."""
    try:
        return preprocess.prepare_sample(files, image_size, params, seed, xyz_scale=xyz_scale)
    except mvtec3d.DataError as error:
        return files, str(error)


def list_split(config: PreparedConfig, root: Path, split: str) -> list[mvtec3d.SampleFiles]:
    """The samples of one split of `config.class_name` under `root`, in `config.layout`."""
    if config.layout == "folder":
        return folder.list_folder_samples(
            root,
            config.class_name,
            split,
            validation_fraction=config.validation_fraction,
            seed=config.seed,
        )
    return mvtec3d.list_samples(root, config.class_name, split)


def split_exists(config: PreparedConfig, root: Path, split: str) -> bool:
    """Train and test must exist; a folder dataset always has a validation split (held out)."""
    if split != "validation" or config.layout == "folder":
        return True
    return (root / config.class_name / split).is_dir()


def resolve_workers(num_workers: int) -> int:
    """`num_workers`, or for 0 one per core."""
    return num_workers if num_workers > 0 else os.cpu_count() or 1


def _init_worker() -> None:
    console.ignore_interrupt()
    preprocess.use_one_thread()


def make_pool(num_workers: int) -> multiprocessing.pool.Pool | None:
    """A spawn pool (TensorFlow is never forked) of `num_workers` (0: all cores); None for 1.

    The processes are the only level of parallelism: each runs single-threaded
    (`preprocess.use_one_thread`), so the default keeps every core busy without
    oversubscribing them (the writer in this process adds little).
    Workers also ignore SIGINT: an error in a worker is raised once, in the parent, by `imap`.
    """
    workers = resolve_workers(num_workers)
    if workers <= 1:
        return None
    return multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)


def _prepared_samples(
    samples: list[mvtec3d.SampleFiles],
    config: PreparedConfig,
    pool: multiprocessing.pool.Pool | None,
    desc: str,
) -> Iterator[preprocess.PreparedSample]:
    """Prepares samples in order, in `pool` when given; with `config.skip_bad_samples` a bad
    sample comes back as (files, message)."""
    work = functools.partial(
        _prepare_or_error if config.skip_bad_samples else preprocess.prepare_sample,
        image_size=config.image_size,
        params=config.plane,
        seed=config.seed,
        xyz_scale=config.xyz_scale,
    )
    prepared = pool.imap(work, samples) if pool is not None else map(work, samples)
    yield from tqdm(prepared, total=len(samples), desc=desc, unit="sample")


class _PreparedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared by both datasets: they differ only in name, classes and raw source."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}  # noqa: RUF012 (TFDS reads a class dict)
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the extracted MVTec-3D-format folder as manual_dir."

    def __init__(self, *, pool: multiprocessing.pool.Pool | None = None, **kwargs) -> None:
        """`pool` prepares the samples (see `make_pool`); None prepares them in this process."""
        self._pool = pool
        super().__init__(**kwargs)

    # TFDS prints "Downloading and preparing dataset Unknown size (download: Unknown size, ...)"
    # to stdout for what is a local folder; the prepare step's own line says what happens, so
    # these two go to run.log only.
    def _log_download_bytes(self) -> None:
        logging.info("TFDS: preparing %s into %s", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        logging.info("TFDS: %s prepared in %s", self.name, self.data_dir)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup needs the optional `importlib_resources` for editable installs; the
        # path only locates a checksums file, which these local datasets do not have.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        zlib = tfds.features.Encoding.ZLIB
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "rgb": tfds.features.Tensor(
                        shape=(size, size, 3), dtype=np.uint8, encoding=zlib
                    ),
                    "xyz": tfds.features.Tensor(
                        shape=(size, size, 3), dtype=np.float32, encoding=zlib
                    ),
                    "mask": tfds.features.Tensor(shape=(size, size), dtype=np.uint8, encoding=zlib),
                    "label": tfds.features.Scalar(dtype=np.int64),
                    "defect_type": tfds.features.Text(),
                    "class": tfds.features.Text(),
                    "file_id": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        config = self.builder_config
        root = Path(dl_manager.manual_dir)
        generators, counts = {}, {}
        has_masks = True
        for split in config.splits:
            if not split_exists(config, root, split):
                logging.warning("%s: no %s split, skipped", root / config.class_name, split)
                continue
            samples = list_split(config, root, split)
            if split == "test" and config.layout == "folder":
                has_masks = folder.has_masks(samples)
            counts[split] = {
                kind: sum(s.defect_type == kind for s in samples)
                for kind in sorted({s.defect_type for s in samples})
            }
            generators[split] = self._generate_examples(samples, split)
        self.info.metadata["counts"] = counts
        self.info.metadata["has_masks"] = has_masks
        self.info.metadata["plane"] = (
            dataclasses.asdict(config.plane) if config.plane is not None else None
        )
        return generators

    def _generate_examples(self, samples: list[mvtec3d.SampleFiles], split: str):
        config = self.builder_config
        desc = f"{self.name}/{config.class_name}/{split}"
        skipped, unclustered, open3d_dbscan, nonfinite, bad = [], [], [], 0, []
        for key, prepared in enumerate(_prepared_samples(samples, config, self._pool, desc)):
            if isinstance(prepared, tuple):
                bad.append(prepared)
                continue
            files = prepared.files
            nonfinite += prepared.num_nonfinite
            info = prepared.plane_info
            if info is not None and info.skipped:
                skipped.append(files.file_id)
            elif info is not None and info.num_clusters == 0:
                unclustered.append(files.file_id)
            if info is not None and info.dbscan_fallback:
                open3d_dbscan.append(f"{files.file_id}: {info.dbscan_fallback}")
            yield (
                key,
                {
                    "rgb": prepared.rgb,
                    "xyz": prepared.xyz,
                    "mask": prepared.mask,
                    "label": int(files.defect_type != mvtec3d.GOOD),
                    "defect_type": files.defect_type,
                    "class": files.class_name,
                    "file_id": files.file_id,
                },
            )
        if bad:
            counts = self.info.metadata["counts"][split]
            for files, _ in bad:
                counts[files.defect_type] -= 1
            logging.warning(
                "%s: skipped %d bad samples (config.skip_bad_samples=True):\n%s",
                desc,
                len(bad),
                "\n".join(message for _, message in bad),
            )
        if skipped:
            logging.warning(
                "%s: plane removal skipped for %d samples (too few valid border points: "
                "already preprocessed?), e.g. %s",
                desc,
                len(skipped),
                skipped[:3],
            )
        if unclustered:
            logging.warning(
                "%s: DBSCAN found no cluster in %d samples (points sparser than dbscan_eps / "
                "dbscan_min_points assume), outlier removal left out, e.g. %s",
                desc,
                len(unclustered),
                unclustered[:3],
            )
        if open3d_dbscan:
            logging.warning(
                "%s: %d clouds clustered by Open3D's DBSCAN (same labels, slower) because their "
                "pixel window could not be bounded, e.g. %s",
                desc,
                len(open3d_dbscan),
                open3d_dbscan[:3],
            )
        if nonfinite:
            logging.warning("%s: %d NaN/inf points set to missing", desc, nonfinite)


class Mvtec3d(_PreparedBuilder):
    """MVTec 3D-AD (Bergmann et al. 2022), prepared as in the LSFA / M3DM reference."""

    BUILDER_CONFIGS = [  # noqa: RUF012 (TFDS reads a class list)
        PreparedConfig(name=name, class_name=name) for name in mvtec3d.MVTEC3D_CLASSES
    ]


class Synthetic3d(_PreparedBuilder):
    """The synthetic MVTec-3D-format dataset of `lsfa_jax.data.synthetic`."""

    BUILDER_CONFIGS = [  # noqa: RUF012 (TFDS reads a class list)
        PreparedConfig(name=name, class_name=name) for name in synthetic.SHAPES
    ]


class Folder3d(_PreparedBuilder):
    """Own data in the MVTec 3D-AD layout with free class and defect names (`data.folder`)."""

    BUILDER_CONFIGS = []  # noqa: RUF012 (TFDS reads a class list; configs come per class)


BUILDERS: dict[str, type[_PreparedBuilder]] = {
    "mvtec3d": Mvtec3d,
    "synthetic": Synthetic3d,
    "folder": Folder3d,
}
