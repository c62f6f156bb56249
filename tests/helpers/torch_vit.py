"""Torch reference of the DINO ViT with the official parameter names, written independently of
lsfa_jax: the parity tests (tests/test_vit.py) and benchmarks/gpu_check.py compare the JAX ViT
with it. `cfg` is any object with the fields of `lsfa_jax.models.vit.ViTConfig`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.torch_point_mae import TorchMlp


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

    def __init__(self, cfg: Any):
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


def torch_model(cfg: Any, seed: int = 0) -> TorchViT:
    torch.manual_seed(seed)
    return TorchViT(cfg).eval()


def torch_tokens(model: TorchViT, images_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).numpy()
