"""kNN vs brute force, image score vs numpy (notes 5.4), maps vs torch, scipy and PIL."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from lsfa_jax.patchcore import scorer
from lsfa_jax.patchcore.bank import MemoryBank
from lsfa_jax.patchcore.normalisation import FeatureStats


def brute_knn(queries, bank, valid, k):
    d = np.sqrt(
        np.sum((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2, -1)
    )
    d = np.where(valid[None], d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx


def numpy_image_score(x, bank, valid, reweight=True):
    d, i = brute_knn(x, bank, valid, 1)
    p = int(np.argmax(d[:, 0]))
    s = d[p, 0]
    if not reweight:
        return s
    m = bank[i[p, 0]]
    _, nb = brute_knn(m[None], bank, valid, 3)
    r = np.linalg.norm(x[p].astype(np.float64) - bank[nb[0, 1:]], axis=1)
    dim = x.shape[1]
    w = 1.0 - np.exp(s / np.sqrt(dim)) / np.sum(np.exp(r / np.sqrt(dim)))
    return w * s


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bank_chunk", [7, 16, 64, 1000])
def test_nearest_neighbours_matches_brute_force(k, bank_chunk):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(64, 12)).astype(np.float32)
    queries = rng.normal(size=(30, 12)).astype(np.float32)
    valid = rng.random(64) > 0.3
    # Plant exact neighbours near chunk boundaries (rows 15, 16, 63) so the merge is exercised.
    for q, row in zip(range(3), (15, 16, 63), strict=True):
        valid[row] = True
        queries[q] = bank[row] + 1e-3
    dist, idx = scorer.nearest_neighbours(
        jnp.asarray(queries), jnp.asarray(bank), jnp.asarray(valid), k=k, bank_chunk=bank_chunk
    )
    ref_d, ref_i = brute_knn(queries, bank, valid, k)
    np.testing.assert_array_equal(np.asarray(idx), ref_i)
    np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=1e-4, atol=1e-3)
    assert np.all(valid[np.asarray(idx)])
    np.testing.assert_array_equal(np.asarray(idx)[:3, 0], [15, 16, 63])


@pytest.mark.parametrize("bank_chunk", [256, 512, 1024])
def test_nearest_neighbours_grouped_argmin_path(bank_chunk):
    # Chunks that are multiples of 128 take the grouped argmin; duplicated rows across groups
    # and chunks check that the lowest index still wins ties.
    rng = np.random.default_rng(9)
    bank = rng.normal(size=(1000, 8)).astype(np.float32)
    bank[700] = bank[300] = bank[130] = bank[5]
    valid = rng.random(1000) > 0.2
    valid[[5, 130, 300, 700]] = [False, True, True, True]
    queries = rng.normal(size=(60, 8)).astype(np.float32)
    queries[0] = bank[5]
    dist, idx = scorer.nearest_neighbours(
        jnp.asarray(queries), jnp.asarray(bank), jnp.asarray(valid), bank_chunk=bank_chunk
    )
    ref_d, ref_i = brute_knn(queries, bank, valid, 1)
    np.testing.assert_array_equal(np.asarray(idx), ref_i)
    assert int(idx[0, 0]) == 130
    np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=1e-4, atol=1e-3)


def test_nearest_neighbours_masked_rows_never_win():
    bank = np.zeros((10, 4), np.float32)
    bank[5] = 10.0
    valid = np.zeros(10, bool)
    valid[5] = True
    dist, idx = scorer.nearest_neighbours(
        jnp.zeros((2, 4)), jnp.asarray(bank), jnp.asarray(valid), k=2, bank_chunk=4
    )
    np.testing.assert_array_equal(np.asarray(idx), [[5, -1], [5, -1]])
    np.testing.assert_allclose(np.asarray(dist)[:, 0], 20.0, rtol=1e-6)
    assert np.all(np.isinf(np.asarray(dist)[:, 1]))


def test_nearest_neighbours_ties_lowest_index_and_bf16_bank():
    bank = np.tile(np.eye(3, dtype=np.float32), (4, 1))  # rows i and i+3k are equal
    queries = np.eye(3, dtype=np.float32)
    for chunk in (2, 5, 12):
        dist, idx = scorer.nearest_neighbours(
            jnp.asarray(queries), jnp.asarray(bank, jnp.bfloat16), k=2, bank_chunk=chunk
        )
        np.testing.assert_array_equal(np.asarray(idx), [[0, 3], [1, 4], [2, 5]])
        np.testing.assert_allclose(np.asarray(dist), 0.0, atol=1e-3)


def test_nearest_neighbours_large_offsets_high_precision():
    # Features far from the origin: the expansion must still resolve close neighbours.
    rng = np.random.default_rng(1)
    bank = (rng.normal(size=(300, 64)) + 5.0).astype(np.float32)
    queries = bank[:50] + rng.normal(scale=0.3, size=(50, 64)).astype(np.float32)
    dist, idx = scorer.nearest_neighbours(jnp.asarray(queries), jnp.asarray(bank), bank_chunk=128)
    ref_d, ref_i = brute_knn(queries, bank, np.ones(300, bool), 1)
    np.testing.assert_array_equal(np.asarray(idx), ref_i)
    np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("reweight", [True, False])
def test_image_score_matches_numpy(reweight):
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(80, 24)).astype(np.float32)
    valid = np.ones(80, bool)
    valid[70:] = False
    x = rng.normal(size=(49, 24)).astype(np.float32)
    x[10] += 3.0  # a clear worst patch
    dist, idx = scorer.nearest_neighbours(jnp.asarray(x), jnp.asarray(bank), jnp.asarray(valid))
    score = scorer.patchcore_image_score(
        jnp.asarray(x),
        jnp.asarray(bank),
        dist[:, 0],
        idx[:, 0],
        bank_valid=jnp.asarray(valid),
        reweight=reweight,
        bank_chunk=32,
    )
    np.testing.assert_allclose(float(score), numpy_image_score(x, bank, valid, reweight), rtol=1e-5)


def test_reweight_can_be_negative():
    # m* has two very close bank neighbours and the query is far: the reference's w < 0.
    bank = np.zeros((3, 4), np.float32)
    bank[1, 0] = bank[2, 0] = 1e-3
    x = np.array([[2.0, 0.0, 0.0, 0.0]], np.float32)
    dist, idx = scorer.nearest_neighbours(jnp.asarray(x), jnp.asarray(bank))
    score = float(
        scorer.patchcore_image_score(jnp.asarray(x), jnp.asarray(bank), dist[:, 0], idx[:, 0])
    )
    np.testing.assert_allclose(score, numpy_image_score(x, bank, np.ones(3, bool)), rtol=1e-5)


@pytest.mark.parametrize(("size_in", "size_out"), [(56, 224), (7, 30), (4, 4)])
def test_bilinear_matches_torch(size_in, size_out):
    rng = np.random.default_rng(3)
    scores = rng.random((2, size_in, size_in)).astype(np.float32)
    ours = scorer.anomaly_map(jnp.asarray(scores), out_size=size_out, sigma=None)
    ref = F.interpolate(
        torch.from_numpy(scores)[:, None], size=size_out, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-6)


def test_gaussian_blur_matches_scipy():
    rng = np.random.default_rng(4)
    scores = rng.random((2, 56, 56)).astype(np.float32)
    up = np.asarray(scorer.anomaly_map(jnp.asarray(scores), sigma=None), np.float64)
    ours = np.asarray(scorer.anomaly_map(jnp.asarray(scores), sigma=4.0))
    ref = np.stack(
        [scipy.ndimage.gaussian_filter(m, sigma=4, mode="reflect", truncate=4.0) for m in up]
    )
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_pil_blur_matches_reference_steps():
    rng = np.random.default_rng(5)
    maps = (rng.random((2, 32, 32)) * 3.0).astype(np.float32)
    ours = scorer.pil_blur(maps, 4.0)
    for m, o in zip(maps, ours, strict=True):
        # torchvision ToPILImage: mul(255).byte(); then PIL blur; ToTensor: /255.
        byte = (torch.from_numpy(m / m.max()) * 255).byte().numpy()
        blurred = np.asarray(Image.fromarray(byte, "L").filter(ImageFilter.GaussianBlur(4)))
        np.testing.assert_allclose(o, blurred / 255.0 * m.max(), rtol=1e-6)
    np.testing.assert_array_equal(scorer.pil_blur(np.zeros((1, 8, 8))), 0.0)


def _bank(rng, rows, dim, pad):
    features = rng.normal(size=(rows + pad, dim)).astype(np.float32)
    features[rows:] = 0.0
    valid = np.arange(rows + pad) < rows
    stats = FeatureStats(jnp.float32(0.5), jnp.float32(2.0))
    return MemoryBank(jnp.asarray(features), jnp.asarray(valid), stats), features, valid


@pytest.mark.slow
@pytest.mark.parametrize("reweight", [True, False])
def test_score_batch_matches_numpy_pipeline(reweight):
    rng = np.random.default_rng(6)
    bank, features, valid = _bank(rng, 90, 16, 38)
    raw = (rng.normal(size=(2, 64, 16)) * 2.0 + 0.5).astype(np.float32)
    scores, maps = scorer.score_batch(
        bank, jnp.asarray(raw), out_size=32, reweight=reweight, sigma=2.0, bank_chunk=32
    )
    assert scores.shape == (2,) and maps.shape == (2, 32, 32)
    for b in range(2):
        x = (raw[b] - 0.5) / 2.0
        np.testing.assert_allclose(
            float(scores[b]), numpy_image_score(x, features, valid, reweight), rtol=1e-4
        )
        d, _ = brute_knn(x, features, valid, 1)
        up = F.interpolate(
            torch.from_numpy(d[:, 0].reshape(1, 1, 8, 8)),
            size=32,
            mode="bilinear",
            align_corners=False,
        )[0, 0].numpy()
        ref = scipy.ndimage.gaussian_filter(up, sigma=2.0, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(np.asarray(maps[b]), ref, rtol=1e-4, atol=1e-4)


def test_score_batch_patch_mask_and_pil():
    rng = np.random.default_rng(7)
    bank, features, valid = _bank(rng, 40, 8, 0)
    raw = rng.normal(size=(1, 16, 8)).astype(np.float32)
    raw[0, 5] += 20.0  # outside the foreground: must not drive the score
    mask = np.ones((1, 16), bool)
    mask[0, 5] = False
    scores, maps = scorer.score_batch(
        bank,
        jnp.asarray(raw),
        out_size=16,
        reweight=False,
        blur="none",
        patch_mask=jnp.asarray(mask),
    )
    x = (raw[0] - 0.5) / 2.0
    d, _ = brute_knn(x, features, valid, 1)
    d = np.where(mask[0], d[:, 0], 0.0)
    np.testing.assert_allclose(float(scores[0]), d.max(), rtol=1e-5)
    _, pil_maps = scorer.score_batch(
        bank,
        jnp.asarray(raw),
        out_size=16,
        reweight=False,
        blur="pil",
        patch_mask=jnp.asarray(mask),
    )
    np.testing.assert_allclose(np.asarray(pil_maps), scorer.pil_blur(np.asarray(maps)), rtol=1e-6)
    with pytest.raises(ValueError, match="blur"):
        scorer.score_batch(bank, jnp.asarray(raw), blur="box")
    with pytest.raises(ValueError, match="queries"):
        scorer.score_batch(bank, jnp.zeros((1, 16, 9)))


@pytest.mark.slow
def test_score_batch_is_jittable_once_per_shape():
    rng = np.random.default_rng(8)
    bank, _, _ = _bank(rng, 20, 8, 12)
    raw = jnp.asarray(rng.normal(size=(1, 16, 8)).astype(np.float32))
    scorer.score_batch(bank, raw, out_size=16, bank_chunk=16)
    before = scorer._score_images._cache_size()
    other = MemoryBank(bank.features * 2.0, bank.valid, bank.stats)
    scorer.score_batch(other, raw, out_size=16, bank_chunk=16)
    assert scorer._score_images._cache_size() == before
