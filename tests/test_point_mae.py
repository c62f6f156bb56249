"""Point-MAE branch against independent references (tests/helpers/torch_point_mae.py): numpy
FPS/kNN, a torch Point-MAE encoder with the official parameter names, and a torch interpolation
+ pooling pipeline."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
import torch

from lsfa_jax.features import point_mae_grid
from lsfa_jax.features.patch_grid import pack_valid_points
from lsfa_jax.models import checkpoint_io
from lsfa_jax.models import point_mae as pm
from tests.helpers.torch_point_mae import (
    REAL_CFG,
    TorchPointMAE,
    fps_numpy,
    knn_numpy,
    legacy_nearest_224,
    make_torch_model,
    squared_distances_np,
    torch_point_grid,
)

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared/data/mvtec3d_sample"
SMALL_CFG = dict(
    num_group=48,
    group_size=24,
    trans_dim=48,
    depth=4,
    num_heads=4,
    mlp_ratio=4,
    out_layers=(1, 2, 3),
)


def save_like_point_mae(model: TorchPointMAE, path: Path, decoder_dim: int) -> None:
    """Wraps the state dict as Point-MAE's pretrain.pth (DataParallel names, decoder extras)."""
    base_model = {f"module.MAE_encoder.{k}": v for k, v in model.state_dict().items()}
    base_model["module.mask_token"] = torch.zeros(1, 1, decoder_dim)
    base_model["module.MAE_decoder.norm.weight"] = torch.ones(decoder_dim)
    base_model["module.decoder_pos_embed.0.weight"] = torch.ones(128, 3)
    base_model["module.increase_dim.0.weight"] = torch.ones(96, decoder_dim, 1)
    torch.save(
        {
            "base_model": base_model,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.001}]},
            "epoch": 3,
            "metrics": {},
            "best_metrics": {},
        },
        path,
    )


def real_cloud() -> np.ndarray:
    path = SAMPLE_DIR / "cable_gland/test/good/xyz/000.tiff"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return legacy_nearest_224(tifffile.imread(path).astype(np.float32))


def synthetic_cloud(size: int, seed: int, valid_fraction: float = 0.6) -> np.ndarray:
    """Organized cloud in metres around z = 0.65 with missing pixels at (0, 0, 0)."""
    rng = np.random.default_rng(seed)
    v, u = np.meshgrid(np.linspace(-0.05, 0.05, size), np.linspace(-0.05, 0.05, size))
    z = 0.65 + 0.01 * np.sin(40 * u) * np.cos(30 * v) + rng.normal(0, 1e-4, u.shape)
    cloud = np.stack([u, v, z], -1).astype(np.float32)
    cloud[rng.random((size, size)) > valid_fraction] = 0.0
    cloud[: size // 3, : size // 3] = 0.0  # an empty corner: background patches
    return cloud


def pack(organized: np.ndarray) -> tuple[jax.Array, jax.Array, np.ndarray, np.ndarray]:
    points, _, mask = pack_valid_points(jnp.asarray(organized))
    return points, mask, np.asarray(points), np.asarray(mask)


fps_jit = jax.jit(pm.farthest_point_sampling, static_argnums=(2, 3))
knn_jit = jax.jit(pm.knn_group, static_argnums=(3, 4))


# ------------------------------------------------------------------------------------- tests


def test_fps_and_knn_match_numpy_on_random_cloud():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(600, 3)).astype(np.float32) + np.float32([0, 0, 2])
    points[5] = [0.01, 0.0, 0.0]  # ||p||^2 <= 1e-3: never a centre, still a neighbour
    mask = np.arange(600) < 530
    fps = np.asarray(fps_jit(jnp.asarray(points), jnp.asarray(mask), 64))
    np.testing.assert_array_equal(fps, fps_numpy(points, mask, 64))
    assert fps[0] == 0 and len(set(fps.tolist())) == 64
    assert 5 not in fps and np.all(fps < 530)
    idx, groups = knn_jit(jnp.asarray(points), jnp.asarray(mask), jnp.asarray(points[fps]), 40, 16)
    np.testing.assert_array_equal(np.asarray(idx), knn_numpy(points, mask, points[fps], 40))
    assert np.all(np.asarray(idx) < 530)
    np.testing.assert_array_equal(
        np.asarray(groups), points[np.asarray(idx)] - points[fps][:, None]
    )
    np.testing.assert_array_equal(np.asarray(idx)[:, 0], fps)  # each centre is its own nearest


def test_fps_and_knn_ties_go_to_the_lower_index():
    # A lattice has many exactly equal squared distances.
    g = np.arange(6, dtype=np.float32)
    points = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3) + np.float32(1)
    points = points[::-1].copy()
    mask = np.ones(len(points), bool)
    fps = np.asarray(fps_jit(jnp.asarray(points), jnp.asarray(mask), 20))
    np.testing.assert_array_equal(fps, fps_numpy(points, mask, 20))
    idx, _ = knn_jit(jnp.asarray(points), jnp.asarray(mask), jnp.asarray(points[fps]), 27, 8)
    np.testing.assert_array_equal(np.asarray(idx), knn_numpy(points, mask, points[fps], 27))


@pytest.mark.slow
def test_small_clouds_raise_or_repeat_centres():
    with pytest.raises(ValueError, match="sample7: only 5 valid points"):
        pm.check_cloud(5, num_group=4, group_size=8, name="sample7")
    pm.check_cloud(8, num_group=16, group_size=8, name="ok")

    cloud = np.zeros((6, 6, 3), np.float32)
    cloud[1, 1:5] = [[0.125, 1, 1], [0.25, 1, 1], [0.375, 1, 1], [0.5, 1, 1]]  # exact ties
    cfg = dict(SMALL_CFG, num_group=8, group_size=4, depth=1, out_layers=(0,))
    variables = pm.init_random_point_mae_variables(jax.random.key(0), cfg)
    points, mask, points_np, mask_np = pack(cloud)
    fps = np.asarray(fps_jit(points, mask, 8))
    # Four farthest-point picks, then duplicates of the first centre.
    np.testing.assert_array_equal(fps, [0, 3, 1, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(fps, fps_numpy(points_np, mask_np, 8))
    features, foreground = point_mae_grid.point_mae_patch_grid(variables, cloud, cfg, grid_size=2)
    assert np.all(np.isfinite(np.asarray(features))) and np.asarray(foreground).any()

    with pytest.raises(ValueError, match=r"tiny\[0\]: only 4 valid points.*group_size=5"):
        point_mae_grid.point_mae_patch_grid(
            variables, cloud, dict(cfg, group_size=5), grid_size=2, name="tiny"
        )


@pytest.mark.slow
def test_interpolation_matches_brute_force():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(300, 3)).astype(np.float32) * 0.05 + np.float32([0, 0, 0.65])
    mask = np.arange(300) < 250
    centres = points[rng.choice(250, 20, replace=False)]
    features = rng.normal(size=(20, 7)).astype(np.float32)
    got = np.asarray(
        pm.interpolate_to_points(
            jnp.asarray(points), jnp.asarray(mask), jnp.asarray(centres), jnp.asarray(features), 64
        )
    )
    d2 = squared_distances_np(points, centres).astype(np.float64)
    nearest = np.argsort(d2, axis=1, kind="stable")[:, :3]
    w = 1.0 / (np.take_along_axis(d2, nearest, 1) + 1e-8)
    want = np.einsum("nk,nkc->nc", w / w.sum(1, keepdims=True), features[nearest])
    np.testing.assert_allclose(got[:250], want[:250], rtol=1e-5, atol=1e-6)
    assert np.all(got[250:] == 0)
    # Points that are centres take (almost exactly) their own feature.
    np.testing.assert_allclose(got[np.argmax(d2 == 0, axis=0)], features, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("token_scale", [1.0, 1e-6])
def test_encoder_from_point_mae_checkpoint_matches_torch(tmp_path, token_scale):
    cfg = SMALL_CFG
    model = make_torch_model(cfg, seed=0)
    with torch.no_grad():
        # Tiny tokens and residual branches (variance << 1e-5) make every LayerNorm epsilon
        # matter.
        residual_outputs = [m for b in model.blocks.blocks for m in (b.attn.proj, b.mlp.fc2)]
        for layer in (model.encoder.second_conv[3], model.pos_embed[2], *residual_outputs):
            layer.weight.mul_(token_scale)
            layer.bias.mul_(token_scale)
    path = tmp_path / "pretrain.pth"
    save_like_point_mae(model, path, decoder_dim=cfg["trans_dim"])
    variables = pm.load_point_mae_variables(path, cfg)
    assert variables["batch_stats"]["encoder"]["first_conv_1"]["var"].shape == (128,)

    rng = np.random.default_rng(2)
    centres = rng.normal(size=(cfg["num_group"], 3)).astype(np.float32) * 0.05 + [0, 0, 0.65]
    groups = rng.normal(size=(cfg["num_group"], cfg["group_size"], 3)).astype(np.float32) * 0.01
    centres = centres.astype(np.float32)
    got = np.asarray(pm.point_mae_encoder(cfg).apply(variables, groups, centres))
    with torch.no_grad():
        taps = model(torch.from_numpy(groups), torch.from_numpy(centres))
    c = cfg["trans_dim"]
    assert got.shape == (cfg["num_group"], 3 * c)
    for j, tap in enumerate(taps):
        np.testing.assert_allclose(got[:, j * c : (j + 1) * c], tap.numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_point_grid_matches_torch_pipeline(tmp_path):
    cfg = SMALL_CFG
    model = make_torch_model(cfg, seed=1)
    path = tmp_path / "pretrain.pth"
    save_like_point_mae(model, path, decoder_dim=cfg["trans_dim"])
    variables = pm.load_point_mae_variables(path, cfg)
    clouds = np.stack(
        [synthetic_cloud(40, seed=3), synthetic_cloud(40, seed=4, valid_fraction=0.3)]
    )
    got, foreground = point_mae_grid.point_mae_patch_grid_batch(
        variables, clouds, cfg, grid_size=12
    )
    for b, cloud in enumerate(clouds):
        want, _, _ = torch_point_grid(model, cloud, cfg["num_group"], cfg["group_size"], 12)
        want = want.numpy()
        assert got.shape[1:] == want.shape == (144, 3 * cfg["trans_dim"])
        np.testing.assert_allclose(np.asarray(got[b]), want, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(np.asarray(foreground[b]), np.all(want != 0, axis=1))
        assert 0 < np.asarray(foreground[b]).sum() < 144
    single, _ = point_mae_grid.point_mae_patch_grid(variables, clouds[1], cfg, grid_size=12)
    np.testing.assert_allclose(np.asarray(single), np.asarray(got[1]), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_real_config_on_real_cloud_matches_torch_and_numpy_grouping(tmp_path):
    cloud = real_cloud()
    model = make_torch_model(REAL_CFG, seed=2)
    path = tmp_path / "pretrain.pth"
    save_like_point_mae(model, path, decoder_dim=256)
    variables = pm.load_point_mae_variables(path, REAL_CFG)
    assert pm.count_parameters(variables) == sum(p.numel() for p in model.parameters())
    assert 21.7e6 < pm.count_parameters(variables) < 21.9e6  # notes §8.2: about 21.8 M
    got, foreground = point_mae_grid.point_mae_patch_grid(variables, cloud, REAL_CFG)
    want, want_fps, want_knn = torch_point_grid(model, cloud, 1024, 128, 56)
    want = want.numpy()
    # Grouping on the packed cloud (valid points first, raster order) equals numpy's.
    points, mask, _, mask_np = pack(cloud)
    assert 20_000 < mask_np.sum() < 40_000
    fps = np.asarray(fps_jit(points, mask, 1024))
    np.testing.assert_array_equal(fps, want_fps)
    np.testing.assert_array_equal(
        np.asarray(knn_jit(points, mask, points[fps], 128, 256)[0]), want_knn
    )
    assert got.shape == want.shape == (3136, 1152)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(foreground), np.all(want != 0, axis=1))


def test_conversion_reports_every_problem_at_once(tmp_path):
    cfg = SMALL_CFG
    state = {
        f"module.MAE_encoder.{k}": v.numpy()
        for k, v in make_torch_model(cfg, seed=0).state_dict().items()
    }
    state["module.mask_token"] = np.zeros((1, 1, 8), np.float32)  # ignored
    state["module.MAE_decoder.blocks.0.norm1.weight"] = np.ones(8, np.float32)  # ignored
    del state["module.MAE_encoder.norm.bias"]
    state["module.MAE_encoder.cls_token"] = np.zeros((1, 1, 48), np.float32)
    state["module.MAE_encoder.pos_embed.0.weight"] = np.zeros((128, 4), np.float32)
    with pytest.raises(checkpoint_io.CheckpointError) as error:
        pm.point_mae_params_from_state_dict({"base_model": state}, model_cfg=cfg, source="bad.pth")
    message = str(error.value)
    assert "bad.pth" in message
    assert "norm.bias" in message and "cls_token" in message and "pos_embed.0.weight" in message
    assert "mask_token" not in message and "MAE_decoder" not in message

    # A bare state dict with 'base_model.' prefixes converts; a deeper config does not fit it.
    bare = {
        f"base_model.{k}": v.numpy() for k, v in make_torch_model(cfg, seed=0).state_dict().items()
    }
    pm.point_mae_params_from_state_dict(bare, model_cfg=cfg, source="bare.npz")
    with pytest.raises(checkpoint_io.CheckpointError, match=r"blocks\.blocks\.4\.norm1\.weight"):
        pm.point_mae_params_from_state_dict(bare, model_cfg=dict(cfg, depth=5), source="bare.npz")


@pytest.mark.slow
def test_orbax_round_trip_and_config_checks(tmp_path):
    variables = pm.init_random_point_mae_variables(jax.random.key(3), SMALL_CFG)
    checkpoint_io.save_orbax(variables, tmp_path / "point_mae")
    loaded = pm.load_point_mae_variables(tmp_path / "point_mae", SMALL_CFG)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    with pytest.raises(checkpoint_io.CheckpointError, match="blocks_1/attn/qkv/kernel"):
        pm.load_point_mae_variables(tmp_path / "point_mae", dict(SMALL_CFG, trans_dim=64))
    with pytest.raises(ValueError, match="unknown keys"):
        pm.point_mae_encoder(dict(SMALL_CFG, drop_path=0.1))
    with pytest.raises(ValueError, match="num_group=2 must be >= 3"):
        pm.point_mae_encoder(dict(SMALL_CFG, num_group=2))
    with pytest.raises(ValueError, match="out_layers"):
        pm.point_mae_encoder(dict(SMALL_CFG, out_layers=(4,)))


# ------------------------------------------------------------- pointnet2 FPS ties, M3DM BatchNorm


def fps_pointnet2_numpy(points: np.ndarray, mask: np.ndarray, m: int) -> np.ndarray:
    """A plain-loop emulation of pointnet2's furthest_point_sampling_kernel on the mask's valid
    points (they come first): thread stripes with a strict '>' scan, then the halving tree."""
    n = int(mask.sum())
    pts = points[:n].astype(np.float32)
    threads = max(min(1 << int(np.log2(n)), 512), 1)
    temp = np.full(n, 1e10, np.float32)
    out = [0]
    for _ in range(m - 1):
        old = pts[out[-1]]
        best, best_i = np.full(threads, -1.0, np.float32), np.zeros(threads, int)
        for t in range(threads):
            for k in range(t, n, threads):
                p = pts[k]
                if p[0] * p[0] + p[1] * p[1] + p[2] * p[2] <= np.float32(1e-3):
                    continue
                diff = p - old
                d = diff[0] * diff[0] + diff[1] * diff[1] + diff[2] * diff[2]
                temp[k] = min(d, temp[k])
                if temp[k] > best[t]:
                    best[t], best_i[t] = temp[k], k
        size = threads // 2
        while size >= 1:
            for t in range(size):
                if best[t + size] > best[t]:
                    best[t], best_i[t] = best[t + size], best_i[t + size]
            size //= 2
        out.append(int(best_i[0]))
    return np.array(out)


def test_fps_pointnet2_tie_rule_differs_from_lowest_index_as_the_kernel_does():
    # 1024 points close to point 0 except two at the same, largest distance: stripes 72 and 368
    # of the 512 threads. The kernel's tree reduction picks 368, the lowest-index rule 72.
    rng = np.random.default_rng(3)
    points = (np.float32([1, 1, 1]) + rng.uniform(0, 0.01, (1024, 3))).astype(np.float32)
    points[0] = [1, 1, 1]
    points[72] = [3, 1, 1]
    points[368] = [1, 3, 1]
    mask = np.ones(1024, bool)
    lowest = np.asarray(fps_jit(jnp.asarray(points), jnp.asarray(mask), 2))
    cuda = np.asarray(fps_jit(jnp.asarray(points), jnp.asarray(mask), 2, "pointnet2"))
    assert lowest[1] == 72 and cuda[1] == 368
    np.testing.assert_array_equal(cuda, fps_pointnet2_numpy(points, mask, 2))


@pytest.mark.parametrize("n_valid", [600, 300, 37])
def test_fps_pointnet2_matches_kernel_emulation_on_a_lattice_full_of_ties(n_valid):
    g = np.arange(9, dtype=np.float32)
    lattice = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3) + np.float32(1)
    points = np.zeros((700, 3), np.float32)
    points[:n_valid] = np.random.default_rng(n_valid).permutation(lattice)[:n_valid]
    points[4] = [0.01, 0.0, 0.0]  # ||p||^2 <= 1e-3: counted in n, never a centre
    mask = np.arange(700) < n_valid
    m = 24
    got = np.asarray(fps_jit(jnp.asarray(points), jnp.asarray(mask), m, "pointnet2"))
    want = fps_pointnet2_numpy(points, mask, m)
    np.testing.assert_array_equal(got, want)
    # The lattice does force tie choices that the lowest-index rule makes differently.
    if n_valid >= 300:
        assert not np.array_equal(want, fps_numpy(points, mask, m))
    with pytest.raises(ValueError, match="ties"):
        pm.farthest_point_sampling(jnp.asarray(points), jnp.asarray(mask), 4, "highest")


def test_batch_statistics_batchnorm_matches_torch_train_mode(tmp_path):
    cfg = SMALL_CFG
    model = make_torch_model(cfg, seed=1)
    path = tmp_path / "pretrain.pth"
    save_like_point_mae(model, path, decoder_dim=cfg["trans_dim"])
    rng = np.random.default_rng(4)
    centres = (rng.normal(size=(cfg["num_group"], 3)) * 0.05 + [0, 0, 0.65]).astype(np.float32)
    groups = (rng.normal(size=(cfg["num_group"], cfg["group_size"], 3)) * 0.01).astype(np.float32)
    encoders = {bn: pm.point_mae_encoder(dict(cfg, batchnorm=bn)) for bn in ("running", "batch")}
    variables = pm.load_point_mae_variables(path, dict(cfg, batchnorm="batch"))
    got = {bn: np.asarray(pm.encode(e, variables, groups, centres)) for bn, e in encoders.items()}
    c = cfg["trans_dim"]
    for mode, bn in ((model.eval, "running"), (model.train, "batch")):
        mode()
        with torch.no_grad():
            taps = model(torch.from_numpy(groups), torch.from_numpy(centres))
        for j, tap in enumerate(taps):
            np.testing.assert_allclose(got[bn][:, j * c : (j + 1) * c], tap.numpy(), atol=1e-4)
    assert np.abs(got["batch"] - got["running"]).max() > 0.1
    with pytest.raises(ValueError, match="batchnorm"):
        pm.point_mae_encoder(dict(cfg, batchnorm="train"))
