"""Torch / numpy reference of the Point-MAE branch, written independently of lsfa_jax.

An eval-mode Point-MAE encoder with the official parameter names and M3DM's feature taps,
numpy FPS / kNN, and the torch interpolation + pooling pipeline onto the patch grid. The tests
(tests/test_point_mae.py) compare the JAX branch
with it; benchmarks/bench_point_mae.py times it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The official Point-MAE encoder as M3DM / LSFA use it: 1024 groups of 128 points, 12 blocks of
# width 384, features tapped after blocks 3, 7 and 11.
REAL_CFG = dict(
    num_group=1024,
    group_size=128,
    trans_dim=384,
    depth=12,
    num_heads=6,
    mlp_ratio=4,
    out_layers=(3, 7, 11),
)


class TorchGroupEncoder(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(), nn.Conv1d(512, channels, 1)
        )

    def forward(self, groups: torch.Tensor) -> torch.Tensor:  # (G, k, 3) -> (G, C)
        x = groups.transpose(1, 2)
        h = self.first_conv(x)
        h = torch.cat([h.max(dim=2, keepdim=True).values.expand_as(h), h], dim=1)
        return self.second_conv(h).max(dim=2).values


class TorchAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TorchMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TorchBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TorchAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TorchMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TorchTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList([TorchBlock(dim, heads, mlp_ratio) for _ in range(depth)])


class TorchPointMAE(nn.Module):
    """Eval-mode Point-MAE encoder with M3DM's feature taps; returns the list of tapped outputs."""

    def __init__(self, cfg: dict):
        super().__init__()
        dim = cfg["trans_dim"]
        self.out_layers = cfg["out_layers"]
        self.encoder = TorchGroupEncoder(dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        self.blocks = TorchTransformer(dim, cfg["depth"], cfg["num_heads"], cfg["mlp_ratio"])
        self.norm = nn.LayerNorm(dim)

    def forward(self, groups: torch.Tensor, centres: torch.Tensor) -> list[torch.Tensor]:
        x = self.encoder(groups)[None]
        pos = self.pos_embed(centres)[None]
        taps = []
        for i, block in enumerate(self.blocks.blocks):
            x = block(x + pos)
            if i in self.out_layers:
                taps.append(self.norm(x)[0])
        return taps


def make_torch_model(cfg: dict, seed: int) -> TorchPointMAE:
    """Random weights, non-trivial LayerNorm affine and BatchNorm running statistics."""
    torch.manual_seed(seed)
    model = TorchPointMAE(cfg)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.normal_(0.0, 0.3)
                module.running_var.uniform_(0.3, 2.0)
                # A few tiny variances make the BatchNorm epsilon (1e-5) matter.
                module.running_var[::8] = 3e-6
                module.num_batches_tracked.fill_(7)
    return model.eval()


# --------------------------------------------------------------- numpy / torch pipeline pieces


def squared_distances_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = a[:, None, :] - b[None, :, :]
    return diff[..., 0] * diff[..., 0] + diff[..., 1] * diff[..., 1] + diff[..., 2] * diff[..., 2]


def fps_numpy(points: np.ndarray, mask: np.ndarray, m: int) -> np.ndarray:
    eligible = mask & ((points**2).sum(-1) > 1e-3)
    min_distance = np.full(len(points), 1e10, np.float32)
    out = [0]
    for _ in range(m - 1):
        d = squared_distances_np(points, points[out[-1]][None])[:, 0]
        min_distance = np.where(eligible, np.minimum(min_distance, d), min_distance)
        out.append(int(np.argmax(np.where(eligible, min_distance, -1.0))))
    return np.array(out)


def knn_numpy(points: np.ndarray, mask: np.ndarray, centres: np.ndarray, k: int) -> np.ndarray:
    d = np.where(mask[None], squared_distances_np(centres, points), np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def torch_point_grid(
    model: TorchPointMAE, organized: np.ndarray, num_group: int, group_size: int, grid: int
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Reference pipeline: valid points (raster order), numpy FPS/kNN, torch encoder,
    3-NN inverse squared distance interpolation, scatter, avg_pool2d(3, 1), adaptive pool.

    Returns the (grid^2, C) features, the FPS indices (G,) and the kNN indices (G, k)."""
    height, width, _ = organized.shape
    flat = organized.reshape(-1, 3)
    nonzero = np.flatnonzero(np.all(flat != 0, axis=-1))
    points = flat[nonzero]
    mask = np.ones(len(points), bool)
    centre_idx = fps_numpy(points, mask, num_group)
    knn_idx = knn_numpy(points, mask, points[centre_idx], group_size)
    pts = torch.from_numpy(points)
    centres = pts[torch.from_numpy(centre_idx)]
    groups = pts[torch.from_numpy(knn_idx)] - centres[:, None]
    with torch.no_grad():
        taps = model(groups, centres)
        features = torch.cat(taps, dim=1)  # (G, C)
        diff = pts[:, None, :] - centres[None, :, :]
        d2 = (diff**2).sum(-1)
        dist, idx = torch.topk(d2, 3, dim=1, largest=False)
        weights = 1.0 / (dist + 1e-8)
        weights = weights / weights.sum(dim=1, keepdim=True)
        point_features = (features[idx] * weights[..., None]).sum(1)  # (N, C)
        image = torch.zeros(features.shape[1], height * width)
        image[:, torch.from_numpy(nonzero)] = point_features.T
        image = image.reshape(1, -1, height, width)
        pooled = F.adaptive_avg_pool2d(F.avg_pool2d(image, 3, 1), grid)
    return pooled.reshape(features.shape[1], -1).T, centre_idx, knn_idx


def legacy_nearest_224(xyz: np.ndarray) -> np.ndarray:
    """PyTorch's legacy nearest resize: source index floor(dst * H / 224)."""
    rows = np.arange(224) * xyz.shape[0] // 224
    cols = np.arange(224) * xyz.shape[1] // 224
    return xyz[rows][:, cols]
