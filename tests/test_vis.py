"""TensorBoard pictures: glyph orientation, render_stages content and RNG isolation, images in a real event file."""
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models_mim import HOGTargets, create_model
from util.vis import glyph_kernels, hog_glyphs, render_stages

ROOT = Path(__file__).resolve().parents[1]


def _stripes(vertical: bool, size: int = 32, period: int = 8) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float32)
    wave = torch.sin(2 * torch.pi * t / period)
    img = wave[None, :].expand(size, size) if vertical else wave[:, None].expand(size, size)
    return img.expand(3, size, size).unsqueeze(0).contiguous()


def _line_direction(img: torch.Tensor) -> str:
    """A vertical line concentrates brightness in few columns, so column sums vary more than row sums."""
    a = img.squeeze().numpy()
    col_var, row_var = a.sum(axis=0).var(), a.sum(axis=1).var()
    return 'vertical' if col_var > row_var else 'horizontal'


def test_glyphs_draw_edges_along_the_stripes():
    """Vertical stripes have vertical edges: their HOG glyphs are vertical lines (and horizontal for horizontal)."""
    hog = HOGTargets(9, [8])
    for vertical in (True, False):
        maps = hog.maps(_stripes(vertical))[0]            # [1, 27, 4, 4]
        tile = hog_glyphs(maps[:, :, 1:2, 1:2], 9, cell_px=15)
        assert tile.shape == (1, 1, 15, 15)
        assert _line_direction(tile[0]) == ('vertical' if vertical else 'horizontal')


def test_glyph_kernels_one_line_per_bin():
    k = glyph_kernels(9, 9)
    assert k.shape == (9, 1, 9, 9)
    assert torch.all(k.sum(dim=(1, 2, 3)) > 0) and k.max() <= 1
    assert not torch.equal(k[0], k[4])


def test_render_stages_tags_shapes_and_rng_isolation():
    torch.manual_seed(0)
    model = create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2)
    imgs = torch.randn(2, 3, 32, 32)
    before = torch.get_rng_state()
    pics = render_stages(model, imgs, 0.75)
    assert torch.equal(torch.get_rng_state(), before), 'visualising must not shift the training RNG stream'
    assert set(pics) == {'vis/input_mask'} | {f'vis/stage{k}_target_vs_pred' for k in range(4)}
    for img in pics.values():
        assert img.ndim == 3 and img.shape[0] == 3 and 0 <= img.min() and img.max() <= 1
    model.set_frozen(2, embed_frozen=True)                # stages fed by frozen blocks are not drawn
    assert set(render_stages(model, imgs, 0.75)) == {'vis/input_mask'} | {f'vis/stage{k}_target_vs_pred'
                                                                           for k in model.active_stages()}
    assert model.training, 'render_stages restores train mode'


@pytest.mark.slow
def test_event_file_holds_decodable_images(tmp_path, demo_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / 'run'
    cmd = [sys.executable, str(ROOT / 'run_pretrain.py'), '--data_path', str(demo_root), '--input_size', '32',
           '--patch_size', '4', '--embed_dim', '32', '--depth', '4', '--num_heads', '2', '--batch_size', '8',
           '--num_workers', '0', '--device', 'cpu', '--epochs', '1', '--warmup_epochs', '0', '--vis_freq', '1',
           '--output_dir', str(out), '--log_dir', str(out / 'tb')]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ea = EventAccumulator(str(out / 'tb'), size_guidance={'images': 0})
    ea.Reload()
    tags = ea.Tags()['images']
    assert 'vis/input_mask' in tags and 'vis/stage0_target_vs_pred' in tags
    ev = ea.Images('vis/stage0_target_vs_pred')[-1]
    png = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)))
    assert png.shape[0] == ev.height and png.shape[1] == ev.width and png.std() > 0
    assert ev.step == 1000  # epoch_1000x after epoch 0
