"""DINO ViT in Flax against a small PyTorch reference ViT written here with the official names."""

from __future__ import annotations

import math
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
from torch import nn

from benchmarks.torch_reference import TorchMlp
from lsfa_jax.models import vit
from lsfa_jax.models.checkpoint_io import CheckpointError, load_state_dict, save_orbax

SMALL = vit.ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4)
SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/mvtec3d_sample"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class TorchAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class TorchBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, qkv_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TorchAttention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TorchMlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TorchViT(nn.Module):
    """DINO vision_transformer layout; bicubic pos-embed resize by target size (timm rule)."""

    def __init__(self, cfg: vit.ViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.patch = cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.grid_size**2, d) * 0.5)
        hidden = int(d * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            [TorchBlock(d, cfg.num_heads, hidden, cfg.qkv_bias) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)
        with torch.no_grad():  # non-trivial LayerNorm and bias values
            for name, p in self.named_parameters():
                if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                elif name.endswith("bias"):
                    p.copy_(0.1 * torch.randn_like(p))

    def pos(self, gh: int, gw: int):
        g = math.isqrt(self.pos_embed.shape[1] - 1)
        if (gh, gw) == (g, g):
            return self.pos_embed
        grid = self.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def forward(self, x):  # (B, 3, H, W)
        b, _, h, w = x.shape
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.pos(h // self.patch, w // self.patch)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def torch_model(cfg: vit.ViTConfig, seed: int = 0) -> TorchViT:
    torch.manual_seed(seed)
    return TorchViT(cfg).eval()


def torch_tokens(model: TorchViT, images_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).numpy()


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
