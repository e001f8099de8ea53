"""Mask curriculum by token distance (--mask_curriculum START:END, masking.py): the difficulty measure on hand-made
masks, random masking unchanged by default (bit for bit, same RNG use), block masks with the exact ratio whose
measured difficulty grows with the block side and matches START/END, one-line errors, and through the CLI: the
difficulty per epoch in log.txt and TensorBoard, the step reaching the generator, and an exact resume."""
import json
import math
import re
import shutil

import pytest
import torch

from cli_inproc import cli
from conftest import TINY_PRETRAIN_FLAGS
from masking import (BlockMaskCurriculum, block_shuffle, calibrate, mask_difficulty, nearest_visible_distance,
                     shuffle_to_mask)
from models_mim import create_model
from util.errors import UserError

pytestmark = pytest.mark.usefixtures('single_thread')


def tiny_model(**kw):
    torch.manual_seed(0)
    return create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                        decoder_embed_dim=16, **kw)


def mae_random_masking(x, mask_ratio):
    """MAE's random_masking (models_mae.py), re-typed as the reference."""
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones([n, length], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def masks(gen_fn, n, seed=123):
    torch.manual_seed(seed)
    return gen_fn(n)


def test_difficulty_measure_on_hand_made_masks():
    # 3x3, only the centre visible: 4 edge tokens at 1, 4 corners at sqrt(2)
    m = torch.ones(1, 9)
    m[0, 4] = 0
    assert mask_difficulty(m, 3).item() == pytest.approx((4 + 4 * math.sqrt(2)) / 8)
    # 2x2 with the top-left visible: 1, 1, sqrt(2); and a 4x4 whose left column is visible: distances 1, 2, 3
    m = torch.tensor([[0., 1., 1., 1.]])
    assert mask_difficulty(m, 2).item() == pytest.approx((2 + math.sqrt(2)) / 3)
    m = torch.ones(1, 16)
    m[0, ::4] = 0
    assert mask_difficulty(m, 4).item() == pytest.approx(2.0)
    assert nearest_visible_distance(m, 4)[0].view(4, 4)[0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert mask_difficulty(torch.zeros(2, 16), 4).tolist() == [0.0, 0.0]


def test_default_is_mae_random_masking_bit_for_bit():
    model = tiny_model()
    assert model.masking is None and not model.follows_progress and model.progress_record() == {}
    x = torch.randn(3, model.num_patches, 8)
    torch.manual_seed(5)
    ours = model.random_masking(x, 0.75)
    after_ours = torch.get_rng_state()
    torch.manual_seed(5)
    ref = mae_random_masking(x, 0.75)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref)) and torch.equal(after_ours, torch.get_rng_state())
    # the whole forward: the default model's loss is the loss with the reference masking, bit for bit
    imgs = torch.randn(2, 3, 32, 32)
    ref_model = tiny_model()
    ref_model.random_masking = mae_random_masking
    torch.manual_seed(7)
    a = model(imgs, mask_ratio=0.75)
    torch.manual_seed(7)
    b = ref_model(imgs, mask_ratio=0.75)
    assert torch.equal(a['loss'], b['loss'])


def test_block_masks_keep_the_ratio_and_are_unions_of_blocks():
    g, n = 14, 64
    for s in (1, 2, 3, 5):
        torch.manual_seed(s)
        ids = block_shuffle(torch.full((n,), s), g)
        assert torch.equal(ids.sort(dim=1).values, torch.arange(g * g).expand(n, -1))  # a permutation per image
        kept, mask, restore = shuffle_to_mask(torch.randn(n, g * g, 4), ids, 0.75)
        assert kept.shape == (n, 49, 4) and (mask.sum(1) == g * g - 49).all()
        if s > 1:
            for k in range(8):
                blocks = _tiling_of(ids[k].tolist(), g, s)
                assert blocks is not None, (s, k)  # every block's tokens are contiguous in the order
                split = [b for b in set(blocks.values()) if len({mask[k, t].item() for t in blocks if
                                                                 blocks[t] == b}) > 1]
                assert len(split) <= 1, (s, k)  # masked = whole blocks, but for one block split at `keep`


def _tiling_of(order, g, s):
    """The s x s tiling (at the offset that fits) in which every block's tokens form one run of ``order``:
    {token: block}, or None if no offset does."""
    for dy in range(s):
        for dx in range(s):
            blk = {t: ((t // g + dy) // s, (t % g + dx) // s) for t in order}
            seq = [blk[t] for t in order]
            runs = 1 + sum(a != b for a, b in zip(seq, seq[1:]))
            if runs == len(set(seq)):
                return blk
    return None


def test_difficulty_grows_with_block_side_and_side_1_is_random_masking():
    g, n = 14, 256
    x = torch.zeros(n, g * g, 1)
    level = []
    for s in range(1, 6):
        torch.manual_seed(10 + s)
        level.append(mask_difficulty(shuffle_to_mask(x, block_shuffle(torch.full((n,), s), g), 0.75)[1], g).mean())
    assert all(b > a + 0.2 for a, b in zip(level, level[1:])), level
    torch.manual_seed(3)
    rand = mask_difficulty(mae_random_masking(x, 0.75)[1], g).mean()
    assert level[0] == pytest.approx(rand.item(), rel=0.02)
    sides, levels = calibrate(g, 0.75, up_to=2.5)
    assert sides == [1, 2, 3, 4] and levels[-2] <= 2.5 < levels[-1]  # calibrated as far as needed
    assert levels == pytest.approx([v.item() for v in level[:4]], rel=0.03)


def test_curriculum_matches_start_and_end_and_is_linear_in_progress():
    g, n = 14, 512
    c = BlockMaskCurriculum('1.5:2.8', g, 0.75)
    x = torch.zeros(n, g * g, 1)
    for p, want in ((0.0, 1.5), (0.5, 2.15), (1.0, 2.8)):
        c.set_progress(p)
        assert c.difficulty == pytest.approx(want)
        torch.manual_seed(int(p * 10))
        got = mask_difficulty(c(x, 0.75)[1], g).mean().item()
        assert got == pytest.approx(want, rel=0.03), (p, got)
    assert c.record() == {'mask_difficulty': 2.8, 'mask_block_side': pytest.approx(c.mean_side())}
    lo, hi, prob = c.side_mix(2.8)
    assert (lo, hi) == (4, 5) and 0 < prob < 1
    mm = BlockMaskCurriculum('min:max', g, 0.75)
    sides, levels = mm._tables[0.75]
    assert mm.start == levels[0] and mm.end == levels[-1] and sides[-1] >= 6
    # one RNG stream whatever the target: the draws per batch do not depend on the difficulty
    for p in (0.0, 1.0):
        mm.set_progress(p)
        torch.manual_seed(0)
        mm(x[:4], 0.75)
        if p == 0.0:
            state0 = torch.get_rng_state()
    assert torch.equal(state0, torch.get_rng_state())


def test_model_wiring_and_out_of_reach_errors():
    model = tiny_model(mask_curriculum='min:2', mask_ratio=0.75)
    assert model.follows_progress and model.masking.grid == 8
    model.set_progress(0.5)
    assert model.progress_record()['mask_difficulty'] == pytest.approx((model.masking.start + 2.0) / 2)
    torch.manual_seed(0)
    out = model(torch.randn(2, 3, 32, 32), mask_ratio=0.75, return_vis=True)
    assert torch.isfinite(out['loss']) and (out['mask'].sum(1) == 48).all()
    assert 'masking' not in ''.join(model.state_dict())  # nothing new in checkpoints
    with pytest.raises(UserError, match=r'--mask_curriculum 1.3:9: END 9 is out of reach at --mask_ratio 0.75 on a '
                                        r'8x8 patch grid: block masks give difficulties in \[1\.\d{3}, 2\.\d{3}\]'):
        tiny_model(mask_curriculum='1.3:9')
    with pytest.raises(UserError, match=r'START 1 is out of reach'):
        tiny_model(mask_curriculum='1:2')  # random masking is ~1.27 here: nothing easier exists


# ---- through the CLI ---------------------------------------------------------------------------------------------

def _args(demo_root, out, *extra):
    # 32 images, batch 8: 4 optimizer steps per epoch, T = 12 with 3 epochs
    return [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--output_dir', out, '--epochs', '3', '--save_freq', '1',
            '--vis_freq', '0', *extra]


@pytest.mark.parametrize('value,msg', [
    ('abc', "error: --mask_curriculum 'abc': expected START:END, each a difficulty > 0"),
    ('1:-2', "error: --mask_curriculum '1:-2': expected START:END"),
    ('1.3:9', 'error: --mask_curriculum 1.3:9: END 9 is out of reach at --mask_ratio 0.75 on a 8x8 patch grid'),
])
def test_cli_errors_are_one_line(value, msg, demo_root, tmp_path):
    rc, out, err = cli('run_pretrain.py', _args(demo_root, tmp_path / 'o', '--mask_curriculum', value))
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(msg), err
    assert not (tmp_path / 'o').exists()


@pytest.mark.slow
def test_cli_logs_the_difficulty_per_epoch_and_resumes_exactly(demo_root, tmp_path):
    ref, res = tmp_path / 'ref', tmp_path / 'res'
    flags = ['--mask_curriculum', 'min:2.2', '--log_dir', ref / 'tb']
    rc, out, err = cli('run_pretrain.py', _args(demo_root, ref, *flags))
    assert rc == 0, err[-3000:]
    m = re.search(r'mask curriculum: block masks, difficulty .* ([\d.]+) -> 2\.200 linearly', out)
    assert m, out[-3000:]
    start = float(m.group(1))
    recs = [json.loads(l) for l in (ref / 'log.txt').read_text().splitlines()]
    # the value of the epoch's last optimizer step j: START + (END - START) j / T, j = 3, 7, 11 of T = 12
    for r, j in zip(recs, (3, 7, 11)):
        assert r['mask_difficulty'] == pytest.approx(start + (2.2 - start) * j / 12, abs=1e-3)
        assert 1 <= r['mask_block_side'] <= 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(ref / 'tb')).Reload()
    assert [e.value for e in ea.Scalars('mask/difficulty')] == pytest.approx([r['mask_difficulty'] for r in recs])
    # resume after epoch 0: the rest of the run (masks from the restored RNG, the step's difficulty) is bit-identical
    res.mkdir()
    shutil.copy(ref / 'checkpoint-0.pth', res / 'checkpoint-last.pth')
    (res / 'log.txt').write_text((ref / 'log.txt').read_text().splitlines(keepends=True)[0])
    rc, out, err = cli('run_pretrain.py', _args(demo_root, res, '--mask_curriculum', 'min:2.2'))
    assert rc == 0 and 'Resumed from' in out, err[-3000:]
    a = torch.load(ref / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    b = torch.load(res / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    keep = ('train_loss', 'mask_difficulty', 'mask_block_side', 'step')
    assert [{k: r[k] for k in keep} for r in recs] == \
           [{k: r[k] for k in keep} for r in map(json.loads, (res / 'log.txt').read_text().splitlines())]
    # and the masks did change the run: without the curriculum the loss differs
    rc, _, err = cli('run_pretrain.py', _args(demo_root, tmp_path / 'plain', '--epochs', '1'))
    assert rc == 0, err[-2000:]
    plain = json.loads((tmp_path / 'plain' / 'log.txt').read_text().splitlines()[0])
    assert plain['train_loss'] != recs[0]['train_loss'] and 'mask_difficulty' not in plain
