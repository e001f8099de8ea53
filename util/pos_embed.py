"""Fixed 2-D sin-cos position embeddings (MAE convention) and resampling of learned/fixed tables."""
import numpy as np
import torch


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim]: all sines then all cosines, frequencies 10000^(-i/(dim/2))."""
    assert dim % 2 == 0
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> np.ndarray:
    """[(1 +) grid_h*grid_w, dim], row-major tokens; first half encodes the column (x), second half the row (y);
    the cls row, if any, is all zeros."""
    assert dim % 4 == 0, f'sin-cos position embedding needs a width divisible by 4, got {dim}'
    ys, xs = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing='ij')
    emb = np.concatenate([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb


def sincos_2d_tensor(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    return torch.from_numpy(sincos_2d(dim, grid, grid, cls_token)).float().unsqueeze(0)
