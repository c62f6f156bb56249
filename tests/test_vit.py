"""DINO ViT in Flax against a small PyTorch reference ViT with the official names
(tests/helpers/torch_vit.py)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ml_collections import ConfigDict
from PIL import Image
from safetensors.torch import save_file

from lsfa_jax.models import vit
from lsfa_jax.models.checkpoint_io import CheckpointError, load_state_dict, save_orbax
from tests.helpers.torch_vit import torch_model, torch_tokens

SMALL = vit.ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4)
SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/mvtec3d_sample"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def jax_tokens(params, cfg: vit.ViTConfig, images_nhwc: np.ndarray) -> np.ndarray:
    model = vit.VisionTransformer.from_config(cfg)
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images_nhwc)))


def images(b: int, h: int, w: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def small_pth(tmp_path_factory):
    model = torch_model(SMALL)
    path = tmp_path_factory.mktemp("vit") / "small.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.slow
def test_param_names_mirror_torch(small_pth):
    _, path = small_pth
    params = vit.load_vit_params(path, SMALL)
    assert set(params) == {"patch_embed", "cls_token", "pos_embed", "norm", "blocks_0", "blocks_1"}
    assert set(params["blocks_0"]["attn"]) == {"qkv", "proj"}
    assert params["patch_embed"]["proj"]["kernel"].shape == (8, 8, 3, 48)
    random = vit.init_random_vit_params(jax.random.key(0), SMALL)
    assert jax.tree.structure(random) == jax.tree.structure(params)
    assert jax.tree.map(np.shape, random) == jax.tree.map(np.shape, params)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_small_vit_matches_torch(small_pth, tmp_path, suffix):
    model, pth = small_pth
    path = pth
    if suffix == ".safetensors":
        path = tmp_path / "small.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    params = vit.load_vit_params(path, SMALL)
    x = images(2, 32, 32)
    np.testing.assert_allclose(jax_tokens(params, SMALL, x), torch_tokens(model, x), atol=1e-4)


def test_orbax_round_trip(small_pth, tmp_path):
    model, pth = small_pth
    params = vit.load_vit_params(pth, SMALL)
    save_orbax(params, tmp_path / "converted")
    restored = vit.load_vit_params(tmp_path / "converted", SMALL)
    x = images(1, 32, 32)
    np.testing.assert_allclose(jax_tokens(restored, SMALL, x), torch_tokens(model, x), atol=1e-4)
    bigger = vit.ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4)
    with pytest.raises(CheckpointError, match=r"(?s)converted.*missing keys.*blocks_2"):
        vit.load_vit_params(tmp_path / "converted", bigger)


def test_no_qkv_bias_and_other_mlp_ratio(tmp_path):
    cfg = vit.ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                        mlp_ratio=2.0, qkv_bias=False)  # fmt: skip
    model = torch_model(cfg, seed=3)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    params = vit.load_vit_params(tmp_path / "m.pth", cfg)
    assert "bias" not in params["blocks_0"]["attn"]["qkv"]
    x = images(2, 16, 16)
    np.testing.assert_allclose(jax_tokens(params, cfg, x), torch_tokens(model, x), atol=1e-4)


def test_other_input_size_interpolates_pos_embed(small_pth):
    model, path = small_pth
    params = vit.load_vit_params(path, SMALL)
    x = images(1, 48, 40)  # grid 6x5 from the 4x4 training grid
    np.testing.assert_allclose(jax_tokens(params, SMALL, x), torch_tokens(model, x), atol=1e-4)


@pytest.mark.parametrize(("g", "out"), [(4, 7), (28, 20), (5, 5)])
def test_bicubic_matrix_matches_torch(g, out):
    eye = torch.eye(g, dtype=torch.float64).reshape(g, 1, g, 1)  # one input row per image
    want = F.interpolate(eye, size=(out, 1), mode="bicubic", align_corners=False)
    want = want.reshape(g, out).T.numpy()
    np.testing.assert_allclose(vit.bicubic_matrix(g, out), want, atol=1e-6)


def test_patch_grid_is_adaptive_avg_pool(small_pth):
    model, path = small_pth
    params = vit.load_vit_params(path, SMALL)
    x = images(2, 32, 32)
    grid, cls = vit.dino_patch_grid(params, jnp.asarray(x), model_cfg=SMALL, return_cls=True)
    tokens = torch.from_numpy(torch_tokens(model, x))
    g = SMALL.grid_size
    image = tokens[:, 1:].reshape(2, g, g, -1).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(image, 2 * g).flatten(2).transpose(1, 2).numpy()
    assert grid.shape == (2, 4 * g * g, SMALL.embed_dim)
    np.testing.assert_allclose(np.asarray(grid), pooled, atol=1e-4)
    np.testing.assert_allclose(np.asarray(cls), tokens[:, 0].numpy(), atol=1e-4)


def _state(cfg: vit.ViTConfig) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch_model(cfg).state_dict().items()}


def test_full_dino_checkpoint_selects_teacher(small_pth, tmp_path):
    model, _ = small_pth
    sd = model.state_dict()
    teacher = {f"module.backbone.{k}": v for k, v in sd.items()}
    teacher["module.head.mlp.0.weight"] = torch.ones(5, 48)
    student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in sd.items()}
    torch.save({"teacher": teacher, "student": student, "epoch": 100}, tmp_path / "full.pth")
    params = vit.load_vit_params(tmp_path / "full.pth", SMALL)
    x = images(1, 32, 32)
    np.testing.assert_allclose(jax_tokens(params, SMALL, x), torch_tokens(model, x), atol=1e-4)


def test_timm_empty_head_ignored_but_real_extras_refused():
    state = _state(SMALL)
    state["head.weight"] = np.zeros((0, 48), np.float32)
    state["head.bias"] = np.zeros((0,), np.float32)
    vit.vit_params_from_state_dict(state, model_cfg=SMALL, source="timm.safetensors")
    state["fc_norm.weight"] = np.ones(48, np.float32)
    with pytest.raises(CheckpointError, match=r"(?s)timm.safetensors.*unexpected keys.*fc_norm"):
        vit.vit_params_from_state_dict(state, model_cfg=SMALL, source="timm.safetensors")


def test_conversion_errors_list_everything_at_once():
    state = _state(SMALL)
    del state["blocks.1.mlp.fc2.bias"]
    del state["norm.weight"]
    state["blocks.0.attn.qkv.weight"] = np.zeros((10, 48), np.float32)
    state["extra.thing"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as err:
        vit.vit_params_from_state_dict(state, model_cfg=SMALL, source="bad.pth")
    msg = str(err.value)
    assert msg.startswith("bad.pth:")
    for part in (
        "missing keys (2): blocks.1.mlp.fc2.bias, norm.weight",
        "unexpected keys (1): extra.thing",
        "blocks.0.attn.qkv.weight: checkpoint (10, 48) vs model (144, 48)",
    ):
        assert part in msg


@pytest.mark.slow
def test_vit_b8_at_224_matches_torch(tmp_path):
    cfg = vit.ViTConfig()
    model = torch_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 85_807_872  # notes 2.1
    path = tmp_path / "dino_vitbase8.pth"
    torch.save(model.state_dict(), path)
    assert set(load_state_dict(path)) == set(vit.expected_torch_shapes(cfg))
    params = vit.load_vit_params(path, cfg)
    del model  # keep peak memory down: the reference runs on a fresh copy below
    model = torch_model(cfg)
    x = images(1, 224, 224)
    want = torch_tokens(model, x)
    grid, cls = vit.dino_patch_grid(params, jnp.asarray(x), model_cfg=cfg, return_cls=True)
    grid = np.asarray(grid)
    assert grid.shape == (1, 3136, 768)
    pooled = F.adaptive_avg_pool2d(
        torch.from_numpy(want[:, 1:]).reshape(1, 28, 28, 768).permute(0, 3, 1, 2), 56
    )
    pooled = pooled.flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(grid, pooled, atol=1e-4)
    np.testing.assert_allclose(np.asarray(cls), want[:, 0], atol=1e-4)


def test_vit_config_from_config_dict():
    cfg = ConfigDict({"embed_dim": 48, "depth": 2, "num_heads": 4, "checkpoint": "x.pth"})
    assert vit.vit_config(cfg) == vit.ViTConfig(embed_dim=48, depth=2, num_heads=4)
    assert vit.vit_config({"img_size": 32}) == vit.ViTConfig(img_size=32)
    assert vit.vit_config(None) == vit.ViTConfig()


def test_real_mvtec_image_matches_torch(small_pth):
    files = sorted(SAMPLE.glob("cable_gland/*/good/rgb/*.png"))
    if not files:
        pytest.skip(f"MVTec 3D-AD sample not found under {SAMPLE}")
    rgb = Image.open(files[0]).convert("RGB").resize((64, 64), Image.BICUBIC)
    x = ((np.asarray(rgb, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)[None]
    model, path = small_pth
    params = vit.load_vit_params(path, SMALL)
    got, want = jax_tokens(params, SMALL, x), torch_tokens(model, x)  # 8x8 grid, resized pos
    np.testing.assert_allclose(got, want, atol=1e-4)
    cos = np.sum(got * want, -1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > 0.9999  # notes 8.4
