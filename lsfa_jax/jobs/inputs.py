"""The samples a user names with `--config.input` (mode=predict, and mode=export's examples),
found on disk and prepared exactly as the model's training data.

`config.input` is
  - an xyz tiff (its rgb image is found by the MVTec rule .../xyz/NNN.tiff -> .../rgb/NNN.png,
    or an image with the same stem beside it),
  - a folder in the MVTec 3D-AD layout (every rgb/ + xyz/ pair below it, searched recursively;
    `<defect>/gt/NNN.png` masks are used when present), or
  - a folder of plain pairs NAME.png + NAME.tiff.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
from tqdm import tqdm

from lsfa_jax.data import folder, mvtec3d, prepare, preprocess
from lsfa_jax.data.pipeline import normalise_rgb

UNLABELLED = "unknown"


def _rgb_for(xyz: Path) -> Path:
    candidates = []
    if xyz.parent.name == "xyz":
        candidates += [xyz.parent.parent / "rgb" / f"{xyz.stem}{s}" for s in folder.RGB_SUFFIXES]
    candidates += [xyz.with_suffix(s) for s in folder.RGB_SUFFIXES]
    for candidate in candidates:
        for variant in (candidate, candidate.with_suffix(candidate.suffix.upper())):
            if variant.is_file():
                return variant
    raise mvtec3d.DataError(
        f"{xyz}: no rgb image found (looked for {[str(c) for c in candidates[:2]]})"
    )


def find_samples(path: Path) -> list[mvtec3d.SampleFiles]:
    """The samples named by `config.input` (module docstring), sorted by path.

    A sample in `<split>/<defect>/xyz/` gets the file id `<split>/<defect>/<stem>` a dataset
    would give it (so its plane-removal seed is the dataset's) and the defect type of its
    folder; other samples are unlabelled.
    """
    if not path.exists():
        raise mvtec3d.DataError(f"config.input={path}: no such file or folder")
    if path.is_file():
        tiffs = [path]
    else:
        tiffs = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in folder.XYZ_SUFFIXES
        )
    if not tiffs:
        raise mvtec3d.DataError(f"config.input={path}: no xyz .tiff files found")
    samples, seen = [], {}
    root = path if path.is_dir() else path.parent
    for xyz in tiffs:
        defect_type, gt = UNLABELLED, None
        file_id = xyz.relative_to(root).with_suffix("").as_posix()
        if xyz.parent.name == "xyz":
            type_dir = xyz.parent.parent
            defect_type = type_dir.name
            split = type_dir.parent.name
            file_id = f"{split}/{defect_type}/{xyz.stem}" if split in mvtec3d.SPLITS else file_id
            mask = type_dir / "gt" / f"{xyz.stem}.png"
            gt = mask if defect_type != mvtec3d.GOOD and mask.is_file() else None
        files = mvtec3d.SampleFiles(
            "input", "predict", defect_type, file_id, _rgb_for(xyz), xyz, gt
        )
        name = sample_name(files)
        if name in seen:
            raise mvtec3d.DataError(f"{xyz}: same sample name {name!r} as {seen[name]}; keep one")
        seen[name] = xyz
        samples.append(files)
    return samples


def sample_name(files: mvtec3d.SampleFiles) -> str:
    """`test/cut/000` -> `cut_000`; an unlabelled file: its path below the input, with `_`."""
    if files.defect_type == UNLABELLED:
        return files.file_id.replace("/", "_")
    return f"{files.defect_type}_{Path(files.file_id).name}"


def prepared_inputs(
    run: ml_collections.ConfigDict, samples: list[mvtec3d.SampleFiles]
) -> dict[str, np.ndarray]:
    """The samples prepared exactly as the model's training data (same function, seeds)."""
    params = prepare.plane_params(run.data)
    rgb_uint8, xyz, masks = [], [], []
    for files in tqdm(samples, desc="preparing inputs", unit="sample"):
        sample = preprocess.prepare_sample(
            files, run.data.image_size, params, run.data.seed, xyz_scale=run.data.xyz_scale
        )
        rgb_uint8.append(sample.rgb)
        xyz.append(sample.xyz)
        masks.append(sample.mask)
    rgb_uint8 = np.stack(rgb_uint8)
    return {
        "rgb": normalise_rgb(rgb_uint8),
        "rgb_uint8": rgb_uint8,
        "xyz": np.stack(xyz),
        "mask": np.stack(masks),
        "file_id": np.asarray([s.file_id for s in samples]),
    }
