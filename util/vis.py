"""What each LocalMIM stage learns, as pictures for TensorBoard: input, mask, and target vs prediction.

Each stage's target draws its own values (``Target.picture`` of ``targets.py``). HOG maps are drawn as orientation
glyphs (:func:`hog_glyphs`): every cell becomes a small tile with one line per orientation bin, drawn along the
*edge* direction of that bin (perpendicular to its gradient) with brightness = the bin's value. The colour
channels' histograms are averaged. HOG predictions are clamped at 0 and L2-normalised per cell like targets, so both
sides of a pair use the same scale.
"""
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def glyph_kernels(nbins: int, size: int) -> torch.Tensor:
    """[nb, 1, size, size] anti-aliased line tiles. Bin b holds gradient phases [b, b+1)·π/nb of
    atan2(-dI/dx, -dI/dy); the gradient points along (sin φ, cos φ) in (x, y), so the edge runs along (cos φ, -sin φ)."""
    c = (size - 1) / 2.0
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32) - c, torch.arange(size, dtype=torch.float32) - c,
                            indexing='ij')
    tiles = []
    for b in range(nbins):
        phi = (b + 0.5) * math.pi / nbins
        ex, ey = math.cos(phi), -math.sin(phi)
        dist = (xs * ey - ys * ex).abs()              # distance from the line through the centre
        along = (xs * ex + ys * ey).abs()
        tile = (1.0 - dist).clamp(0, 1) * (along <= c + 0.5).float()
        tiles.append(tile)
    return torch.stack(tiles).unsqueeze(1)


def hog_glyphs(maps: torch.Tensor, nbins: int, cell_px: int = 8) -> torch.Tensor:
    """[B, C·nb, h, w] HOG maps -> [B, 1, h·cell_px, w·cell_px] glyph images in [0, 1]."""
    b, cnb, h, w = maps.shape
    hist = maps.view(b, cnb // nbins, nbins, h, w).mean(dim=1).clamp_min(0)
    img = F.conv_transpose2d(hist, glyph_kernels(nbins, cell_px).to(maps.device, maps.dtype), stride=cell_px)
    return (img / img.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)).clamp(0, 1)


def tokens_to_maps(x: torch.Tensor, side: int) -> torch.Tensor:
    """[B, side², F] (row-major cells) -> [B, F, side, side]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


@torch.no_grad()
def render_stages(model, imgs: torch.Tensor, mask_ratio: float, seed: int = 0, cell_px: int = 8
                  ) -> Dict[str, torch.Tensor]:
    """TensorBoard images ``{tag: [3, H, W]}``: ``vis/input_mask`` and ``vis/stage{k}`` (target | prediction per row).

    The mask is drawn from a private seed inside ``fork_rng`` so visualising never shifts the training RNG stream.
    """
    was_training = model.training
    model.eval()
    devices = [imgs.device] if imgs.device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model(imgs, mask_ratio=mask_ratio, return_vis=True)
    model.train(was_training)
    pics = (imgs.float().cpu() * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1)
    g, p = model.grid, model.patch_size
    mask = out['mask'].float().cpu().view(-1, 1, g, g)
    mask_px = mask.repeat_interleave(p, 2).repeat_interleave(p, 3)
    masked = pics * (1 - mask_px) + 0.5 * mask_px
    result = {'vis/input_mask': make_grid(torch.cat([pics, masked]), nrow=pics.shape[0], padding=2, pad_value=1.0)}
    for k, pred in out['pred'].items():
        stage = model.stages[k]
        px = max(3, min(cell_px, 256 // stage.grid))
        tg = model.target.picture(out['target'][k].float().cpu(), stage, prediction=False, cell_px=px)
        pg = model.target.picture(pred.float().cpu(), stage, prediction=True, cell_px=px)
        rows: List[torch.Tensor] = []
        for i in range(tg.shape[0]):
            rows += [tg[i], pg[i]]
        result[f'vis/stage{k}_target_vs_pred'] = make_grid(torch.stack(rows).expand(-1, 3, -1, -1), nrow=2,
                                                           padding=2, pad_value=0.5)
    return result


def fixed_batch(dataset, n: int, device: torch.device) -> Optional[torch.Tensor]:
    """``n`` images spread evenly over ``dataset`` (so over its classes) as a batch; the transform must be
    deterministic (resize + centre crop)."""
    n = min(n, len(dataset))
    if n == 0:
        return None
    idx = torch.linspace(0, len(dataset) - 1, n).round().long().tolist()
    return torch.stack([dataset[i][0] for i in idx]).to(device)
