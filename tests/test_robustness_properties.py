"""Property-based robustness tests (hypothesis): the readers and the metric functions on random
shapes, values and damage. A reader either returns exactly what was written (with the documented
NaN/inf rule) or raises a DataError naming the file; a metric either returns a value in [0, 1]
(equal to sklearn's where sklearn defines one) or nan with a note, and rejects bad input.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from sklearn.metrics import roc_auc_score

from lsfa_jax import metrics
from lsfa_jax.data import mvtec3d

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
sizes = st.integers(1, 12)


# --- readers ------------------------------------------------------------------------------------


@st.composite
def clouds(draw) -> np.ndarray:
    """(H, W, 3) float32 / float64 clouds with zeros, NaN and +-inf sprinkled in."""
    shape = (draw(sizes), draw(sizes), 3)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    values = draw(hnp.arrays(dtype, shape, elements=st.floats(-2.0, 2.0, width=32)))
    special = draw(hnp.arrays(np.int8, shape, elements=st.integers(0, 9)))
    values[special == 1] = np.nan
    values[special == 2] = np.inf
    values[special == 3] = -np.inf
    values[special == 4] = 0.0
    return values


@SETTINGS
@given(xyz=clouds())
def test_read_xyz_zeroes_exactly_the_nonfinite_points(tmp_path: Path, xyz: np.ndarray) -> None:
    path = tmp_path / "cloud.tiff"
    tifffile.imwrite(path, xyz, photometric="rgb")
    out, count = mvtec3d.read_xyz_counted(path)
    bad = ~np.isfinite(xyz).all(axis=-1)
    expected = np.where(bad[..., None], 0.0, xyz).astype(np.float32)
    assert out.dtype == np.float32 and out.shape == xyz.shape
    np.testing.assert_array_equal(out, expected)
    assert count == int(bad.sum())
    np.testing.assert_array_equal(tifffile.imread(path), xyz)  # the file is untouched


@st.composite
def images(draw) -> tuple[str, np.ndarray]:
    mode = draw(st.sampled_from(["L", "RGB", "RGBA"]))
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    array = draw(hnp.arrays(np.uint8, (draw(sizes), draw(sizes), *channels)))
    return mode, array


def _as_rgb(mode: str, array: np.ndarray) -> np.ndarray:
    """What the reference loader's convert('RGB') gives, written with numpy."""
    if mode == "L":
        return np.repeat(array[..., None], 3, axis=-1)
    return array[..., :3]


@SETTINGS
@given(image=images())
def test_read_rgb_of_8bit_modes(tmp_path: Path, image: tuple[str, np.ndarray]) -> None:
    mode, array = image
    path = tmp_path / "image.png"
    Image.fromarray(array, mode).save(path)
    np.testing.assert_array_equal(mvtec3d.read_rgb(path), _as_rgb(mode, array))


@SETTINGS
@given(
    palette=hnp.arrays(np.uint8, (256, 3)),
    index=hnp.arrays(np.uint8, st.tuples(sizes, sizes), elements=st.integers(0, 255)),
)
def test_read_rgb_of_palette_png(tmp_path: Path, palette: np.ndarray, index: np.ndarray) -> None:
    path = tmp_path / "image.png"
    image = Image.fromarray(index, "P")
    image.putpalette(palette.ravel().tolist())
    image.save(path)
    np.testing.assert_array_equal(mvtec3d.read_rgb(path), palette[index])


@SETTINGS
@given(codes=hnp.arrays(np.uint8, st.tuples(sizes, sizes)), extra=st.integers(1, 3))
def test_read_gt_binarises_and_checks_the_size(
    tmp_path: Path, codes: np.ndarray, extra: int
) -> None:
    path = tmp_path / "gt.png"
    Image.fromarray(codes, "L").save(path)
    np.testing.assert_array_equal(mvtec3d.read_gt(path, codes.shape), codes > 0)
    wrong = (codes.shape[0] + extra, codes.shape[1])
    with pytest.raises(mvtec3d.DataError, match=f"{path}: mask shape"):
        mvtec3d.read_gt(path, wrong)


@SETTINGS
@given(
    xyz=hnp.arrays(np.float32, (16, 16, 3), elements=st.floats(0.125, 1.0, width=32)),
    cut=st.floats(0.0, 1.0, exclude_max=True),
)
def test_truncated_tiff_is_an_error_or_exact(tmp_path: Path, xyz: np.ndarray, cut: float) -> None:
    """Never a silently wrong cloud: any truncation either fails naming the file or is harmless."""
    path = tmp_path / "cloud.tiff"
    tifffile.imwrite(path, xyz, photometric="rgb")
    data = path.read_bytes()
    path.write_bytes(data[: int(cut * len(data))])
    try:
        out = mvtec3d.read_xyz(path)
    except mvtec3d.DataError as error:
        assert str(error).startswith(f"{path}: ")
    else:
        np.testing.assert_array_equal(out, xyz)


@SETTINGS
@given(image=images(), cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_png_is_an_error_or_exact(
    tmp_path: Path, image: tuple[str, np.ndarray], cut: float
) -> None:
    mode, array = image
    path = tmp_path / "image.png"
    Image.fromarray(array, mode).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(cut * len(data))])
    try:
        out = mvtec3d.read_rgb(path)
    except mvtec3d.DataError as error:
        assert str(error).startswith(f"{path}: ")
    else:
        np.testing.assert_array_equal(out, _as_rgb(mode, array))


@SETTINGS
@given(noise=st.binary(max_size=64))
def test_random_bytes_are_rejected_naming_the_file(tmp_path: Path, noise: bytes) -> None:
    for name, reader in (("x.png", mvtec3d.read_rgb), ("x.tiff", mvtec3d.read_xyz)):
        path = tmp_path / name
        path.write_bytes(noise)
        with pytest.raises(mvtec3d.DataError, match=f"^{path}: "):
            reader(path)


# --- metrics ------------------------------------------------------------------------------------


@st.composite
def split_cases(draw) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """labels (N,), scores (N,), masks (N, H, W), maps (N, H, W); good images have empty masks.

    Scores and maps are drawn from a few levels so ties are common.
    """
    n, h, w = draw(st.integers(1, 6)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    labels = draw(hnp.arrays(np.int32, (n,), elements=st.integers(0, 1)))
    masks = draw(hnp.arrays(np.uint8, (n, h, w), elements=st.integers(0, 1)))
    masks[labels == 0] = 0
    levels = st.sampled_from([-1.5, 0.0, 0.25, 0.5, 3.0])
    scores = draw(hnp.arrays(np.float64, (n,), elements=levels))
    maps = draw(hnp.arrays(np.float32, (n, h, w), elements=levels))
    return labels, scores, masks, maps


@SETTINGS
@given(split=split_cases(), method=st.sampled_from(metrics.AUPRO_METHODS))
def test_evaluate_class_values_or_explained_nan(split, method: str) -> None:
    labels, scores, masks, maps = split
    originals = [a.copy() for a in split]
    result = metrics.evaluate_class(labels, scores, masks, maps, aupro_method=method)
    for before, after in zip(originals, split, strict=True):
        np.testing.assert_array_equal(before, after)  # inputs are not modified

    if len(set(labels.tolist())) == 2:
        assert result.i_auroc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    else:
        assert math.isnan(result.i_auroc)
        assert any(n.startswith("I-AUROC undefined") for n in result.notes)
    if len(set(masks.ravel().tolist())) == 2:
        expected = roc_auc_score(masks.ravel(), maps.ravel())
        assert result.p_auroc == pytest.approx(expected, abs=1e-9)
        for value in (result.aupro_30, result.aupro_01):
            assert 0.0 <= value <= 1.0
    else:
        assert math.isnan(result.p_auroc) and math.isnan(result.aupro_30)
        assert any(n.startswith("P-AUROC and AUPRO undefined") for n in result.notes)


@SETTINGS
@given(
    split=split_cases(),
    where=st.sampled_from(["scores", "maps"]),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_nonfinite_scores_are_rejected(split, where: str, bad: float) -> None:
    labels, scores, masks, maps = (a.copy() for a in split)
    target = scores if where == "scores" else maps
    target.flat[0] = bad
    with pytest.raises(ValueError, match=f"{where} has 1 non-finite values"):
        metrics.evaluate_class(labels, scores, masks, maps)


@SETTINGS
@given(split=split_cases(), extra=st.integers(1, 3))
def test_mismatched_shapes_are_rejected(split, extra: int) -> None:
    labels, scores, masks, maps = split
    with pytest.raises(ValueError, match=r"metrics\.evaluate_class"):
        metrics.evaluate_class(labels, np.concatenate([scores, np.zeros(extra)]), masks, maps)
    wider = np.concatenate([maps, np.zeros((*maps.shape[:2], extra), maps.dtype)], axis=2)
    with pytest.raises(ValueError, match=r"metrics\.evaluate_class"):
        metrics.evaluate_class(labels, scores, masks, wider)


@SETTINGS
@given(split=split_cases())
def test_good_image_with_defect_pixels_is_rejected(split) -> None:
    labels, scores, masks, maps = (a.copy() for a in split)
    assume((labels == 0).any())
    index = int(np.flatnonzero(labels == 0)[0])
    masks[index, 0, 0] = 1
    with pytest.raises(ValueError, match=rf"images \[{index}\] are labelled good"):
        metrics.evaluate_class(labels, scores, masks, maps)


@SETTINGS
@given(
    labels=hnp.arrays(np.int32, st.integers(1, 30), elements=st.integers(0, 1)),
    seed=st.integers(0, 2**16),
)
def test_image_auroc_matches_sklearn_or_is_nan(labels: np.ndarray, seed: int) -> None:
    scores = np.random.default_rng(seed).integers(0, 4, labels.shape).astype(np.float32)
    value = metrics.image_auroc(labels, scores)
    if len(set(labels.tolist())) < 2:
        assert math.isnan(value)
    else:
        assert value == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
