"""LocalMIM model (models_mim.py): masking, per-stage mask resampling, loss vs a literal formula, stage weights,
stage layout and HOG cell sizes, factories at their native sizes, the tiny forward, FreezeOut units, errors."""
import math

import pytest
import torch

import models_mim
from models_mim import LocalMIM, cell_size, create_model, parse_stage_weights, stage_layout
from util.errors import UserError

pytestmark = pytest.mark.usefixtures('single_thread')

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return create_model('MIM_vit_tiny_patch16', **{**TINY, **kw})


# ---- literal references ---------------------------------------------------------------------------------------------

def literal_stage_mask(mask: torch.Tensor, g: int, s: float) -> torch.Tensor:
    """Plain-Python loops over a [B, g*g] patch mask: nearest x s (s >= 1) or 2x2 mean (s = 0.5), row-major."""
    rows = mask.tolist()
    out = []
    if s >= 1:
        s = int(s)
        big = g * s
        for m in rows:
            out.append([m[(r // s) * g + c // s] for r in range(big) for c in range(big)])
    else:
        small = g // 2
        for m in rows:
            out.append([sum(m[(2 * r + dr) * g + 2 * c + dc] for dr in (0, 1) for dc in (0, 1)) / 4.0
                        for r in range(small) for c in range(small)])
    return torch.tensor(out)


def literal_stage_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> float:
    """sum_{b,j} w[b,j] * mean_c (pred - target)^2 / sum_{b,j} w[b,j], in plain Python floats."""
    num, den = 0.0, 0.0
    for pb, tb, wb in zip(pred.tolist(), target.tolist(), weight.tolist()):
        for pj, tj, w in zip(pb, tb, wb):
            if w == 0:
                continue
            num += w * sum((p - t) ** 2 for p, t in zip(pj, tj)) / len(pj)
            den += w
    return num / den


# ---- masking ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('ratio', [0.75, 0.6, 0.5, 0.0, 0.9])
def test_random_masking_invariants(ratio):
    model = tiny()
    b, n, d = 3, 64, 5
    x = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(b, n, d).clone()  # token l carries value l
    torch.manual_seed(123)
    kept, mask, ids_restore = model.random_masking(x, ratio)
    keep = int(n * (1 - ratio))
    assert kept.shape == (b, keep, d)
    assert mask.shape == (b, n) and ids_restore.shape == (b, n)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(1) == n - keep).all()
    for bi in range(b):
        # ids_restore is a permutation; its inverse (ids_shuffle) starts with the kept tokens, in kept order
        assert sorted(ids_restore[bi].tolist()) == list(range(n))
        ids_shuffle = torch.argsort(ids_restore[bi])
        assert torch.equal(ids_restore[bi][ids_shuffle], torch.arange(n))
        assert torch.equal(ids_shuffle[ids_restore[bi]], torch.arange(n))
        kept_idx = kept[bi, :, 0].long()
        assert torch.equal(kept_idx, ids_shuffle[:keep])
        assert (kept[bi] == kept[bi, :, :1]).all()
        # the mask is 0 exactly at the kept tokens
        assert set(kept_idx.tolist()) == set(torch.nonzero(mask[bi] == 0).flatten().tolist())
        # the decoder's unshuffle (kept ++ placeholders, gathered by ids_restore) puts every kept token back
        filler = torch.full((n - keep, d), -1.0)
        restored = torch.cat([kept[bi], filler])[ids_restore[bi]]
        vis = mask[bi] == 0
        assert torch.equal(restored[vis, 0], torch.arange(n, dtype=torch.float32)[vis])
        assert (restored[~vis] == -1).all()
    if 0 < ratio < 1 and b > 1:
        assert not torch.equal(mask[0], mask[1])  # per-sample masks


@pytest.mark.parametrize('ratio', [1.0, 0.0, 1e-17])
def test_forward_mask_ratio_out_of_range(ratio):
    """1: nothing left to encode; 0 (or a ratio too small to remove one patch): no masked patch, so a loss of 0 that
    trains nothing."""
    model = tiny()
    with pytest.raises(UserError, match=r'^--mask_ratio .*: must be in \(0, 1\) and remove at least one of the 64'):
        model(torch.randn(1, 3, 32, 32), mask_ratio=ratio)


# ---- stage masks ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('scale', [4.0, 2.0, 1.0, 0.5])
def test_stage_mask_matches_literal(scale):
    model = tiny()
    g = model.grid
    assert g == 8
    torch.manual_seed(int(scale * 10))
    _, mask, _ = model.random_masking(torch.zeros(2, g * g, 1), 0.75)
    got = model.stage_mask(mask, scale)
    ref = literal_stage_mask(mask, g, scale)
    assert got.shape == (2, int(g * scale) ** 2)
    assert torch.equal(got, ref)
    if scale >= 1:
        assert set(got.unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(got.sum(1), mask.sum(1) * scale ** 2)
    else:
        assert set(got.unique().tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
        # 2x2 averaging over a partition preserves the total: sum = masked patches / 4
        torch.testing.assert_close(got.sum(1), mask.sum(1) / 4)


# ---- loss --------------------------------------------------------------------------------------------------------------

def test_stage_loss_equals_literal_formula_on_random_tensors():
    model = tiny()
    g = torch.Generator().manual_seed(5)
    for n, soft in ((64, False), (16, True), (256, False)):
        pred = torch.randn(2, n, 27, generator=g)
        target = torch.rand(2, n, 27, generator=g)
        if soft:
            w = torch.randint(0, 5, (2, n), generator=g).float() / 4
        else:
            w = (torch.rand(2, n, generator=g) < 0.75).float()
        got = model.stage_loss(pred, target, w)
        assert got.shape == ()
        assert abs(got.item() - literal_stage_loss(pred, target, w)) < 1e-5
        # visible locations (weight 0) do not matter
        pred2 = pred.clone()
        pred2[w == 0] = 1e3
        assert abs(model.stage_loss(pred2, target, w).item() - got.item()) < 1e-5


@pytest.mark.parametrize('spec,weights', [('equal', [1, 1, 1, 1]), ('4321', [4, 3, 2, 1]), ('cum4321', [24, 6, 2, 1]),
                                          ('1overk', [1, 1 / 2, 1 / 3, 1 / 4]), ('inv4321', [1 / 4, 1 / 3, 1 / 2, 1]),
                                          ('0.5,1,2,0', [0.5, 1, 2, 0])])
def test_forward_loss_is_weighted_sum_of_literal_stage_losses(spec, weights):
    model = tiny(seed=0, stage_weights=spec)
    assert model.stage_weights == pytest.approx(weights)
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(42)
    with torch.no_grad():
        out = model(imgs, mask_ratio=0.75, return_vis=True)
    mask = out['mask']
    assert mask.shape == (2, 64) and (mask.sum(1) == 64 - 16).all()
    hog = model.hog(imgs)
    expected_total = 0.0
    for k, s in enumerate(model.stage_scales):
        n = int(8 * s) ** 2
        assert out['pred'][k].shape == (2, n, 27)
        assert out['target'][k].shape == (2, n, 27)
        assert torch.equal(out['target'][k], hog[k])
        lit = literal_stage_loss(out['pred'][k], out['target'][k], literal_stage_mask(mask, 8, s))
        assert abs(out['stage_losses'][k].item() - lit) < 1e-5, (k, s)
        expected_total += weights[k] * lit
    assert abs(out['loss'].item() - expected_total) < 1e-4
    # same init + same mask with equal weights: identical stage losses, different total unless weights are equal
    ref = tiny(seed=0)
    torch.manual_seed(42)
    with torch.no_grad():
        out_eq = ref(imgs, mask_ratio=0.75, return_vis=True)  # the full path, as `out`: bit-equal stage losses
        torch.manual_seed(42)
        out_train = ref(imgs, mask_ratio=0.75)  # the masked-only training path: equal up to float reassociation
    for k in range(4):
        assert torch.equal(out_eq['stage_losses'][k], out['stage_losses'][k])
        torch.testing.assert_close(out_train['stage_losses'][k], out['stage_losses'][k], rtol=1e-6, atol=1e-7)
    assert abs(out_eq['loss'].item() - sum(v.item() for v in out['stage_losses'].values())) < 1e-5


def test_parse_stage_weights_presets_and_errors():
    assert parse_stage_weights('equal', 4) == [1.0] * 4
    assert parse_stage_weights(None, 3) == [1.0] * 3
    assert parse_stage_weights('4321', 4) == [4.0, 3.0, 2.0, 1.0]
    assert parse_stage_weights('cum4321', 4) == [24.0, 6.0, 2.0, 1.0]
    assert parse_stage_weights('1overk', 4) == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert parse_stage_weights('inv4321', 4) == pytest.approx([0.25, 1 / 3, 0.5, 1.0])
    assert parse_stage_weights('1, 2.5,0,3', 4) == [1.0, 2.5, 0.0, 3.0]
    # all_stages with 12 stages: presets generalise to S..1, 1..1/S and 1/S..1
    assert parse_stage_weights('4321', 12) == [float(12 - k) for k in range(12)]
    assert parse_stage_weights('1overk', 12)[-1] == pytest.approx(1 / 12)
    assert parse_stage_weights('inv4321', 12)[0] == pytest.approx(1 / 12)
    for bad, msg in (('1,2,3', 'got 3 weights for 4 stages'), ('1,2,3,4,5', 'got 5 weights'),
                     ('a,b,c,d', 'comma list'), ('1,-1,1,1', '>= 0'), ('nan,1,1,1', 'finite'),
                     ('inf,1,1,1', 'finite'), ('4312', 'got 1 weights')):
        with pytest.raises(UserError, match=msg):
            parse_stage_weights(bad, 4)
    with pytest.raises(UserError, match='stage_weights'):
        tiny(stage_weights='1,2')


def vitfreeze_weights(spec, active, num_stages):
    """ViTFreeze's weighted loss: its stage list shrank as stages were switched off; stage k of the remaining list
    (k = 0 shallowest) got len(pred) - k ('4321') or 1 / (k + 1) ('1overk'). 'cum4321' replays its mid-January
    loop literally, ``loss += L_k; loss *= len(pred) - k``, on the coefficient of every stage."""
    out = [0.0] * num_stages
    if spec == 'cum4321':
        coef = [0.0] * num_stages
        for k, stage in enumerate(sorted(active)):
            coef[stage] += 1.0
            coef = [c * (len(active) - k) for c in coef]
        return coef
    for k, stage in enumerate(sorted(active)):
        out[stage] = {'4321': len(active) - k, '1overk': 1 / (k + 1)}[spec]
    return out


@pytest.mark.parametrize('spec', ['4321', 'cum4321', '1overk', 'inv4321', '1,2,3,4'])
def test_stage_weight_presets_before_and_after_a_stage_switches_off(spec):
    """depth 4: taps [1, 3, 1, 3]; freezing blocks 1-2 switches off stages 0 and 2 (fed by block 2)."""
    model = tiny(seed=0, stage_weights=spec)
    fixed = {'inv4321': [1 / 4, 1 / 3, 1 / 2, 1], '1,2,3,4': [1, 2, 3, 4]}
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    for frozen, active in ((0, [0, 1, 2, 3]), (1, [0, 1, 2, 3]), (2, [1, 3])):
        model.set_frozen(frozen, embed_frozen=frozen > 0)
        assert model.active_stages() == active
        want = fixed[spec] if spec in fixed else vitfreeze_weights(spec, active, 4)
        want = [w if k in active else 0.0 for k, w in enumerate(want)]
        assert model.current_stage_weights() == pytest.approx(want, rel=1e-7)
        assert model.stage_weight.tolist() == pytest.approx(want, rel=1e-7)  # the buffer the loss reads
        assert models_mim.stage_weights_for(spec, 4, active) == pytest.approx(want)
        torch.manual_seed(1)
        with torch.no_grad():
            out = model(imgs, mask_ratio=0.75)
        assert sorted(out['stage_losses']) == active
        total = sum(want[k] * out['stage_losses'][k].item() for k in active)
        assert out['loss'].item() == pytest.approx(total, rel=1e-6)
    if spec == '4321':  # after the shift: the shallowest active stage weighs S_active = 2, the deepest 1
        assert model.current_stage_weights() == [0.0, 2.0, 0.0, 1.0]
    if spec == '1overk':
        assert model.current_stage_weights() == [0.0, 1.0, 0.0, 0.5]
    if spec == 'cum4321':  # 2 active: (2 L1) * 1 + L3 -> 2, 1; with 4 active it was 24, 6, 2, 1
        assert model.current_stage_weights() == [0.0, 2.0, 0.0, 1.0]
        assert vitfreeze_weights(spec, [0, 1, 2, 3], 4) == [24.0, 6.0, 2.0, 1.0]
        assert models_mim.stage_weights_for(spec, 4, [1, 2, 3]) == [0.0, 6.0, 2.0, 1.0]


def test_stage_weight_curriculum_is_linear_in_progress_and_written_only_on_change():
    model = tiny(seed=0, stage_weights='equal', stage_weights_end='0,1,2,4')
    sched = model.stage_weight_schedule
    assert sched.varies and not models_mim.StageWeightSchedule('4321', None, 4).varies
    for p in (0.0, 0.25, 0.5, 0.999):
        assert sched.at(p) == pytest.approx([1 + (w - 1) * p for w in (0, 1, 2, 4)])
    assert model.update_stage_weights(0.5) is True
    assert model.stage_weight.tolist() == pytest.approx([0.5, 1.0, 1.5, 2.5])
    assert model.update_stage_weights(0.5) is False  # unchanged: no write
    # presets at both ends rank the active stages: equal -> 4321 with stages 0 and 2 off
    m2 = tiny(seed=0, stage_weights='equal', stage_weights_end='4321')
    m2.update_stage_weights(0.5)
    m2.set_frozen(2, embed_frozen=True)
    assert m2.current_stage_weights() == pytest.approx([0.0, 1 + (2 - 1) * 0.5, 0.0, 1.0])
    with pytest.raises(UserError, match='--stage_weights_end: got 2 weights for 4 stages'):
        tiny(stage_weights_end='1,2')
    # not in the state dict: checkpoints keep their keys, the weights follow from the step
    assert 'stage_weight' not in model.state_dict()


# ---- stage layout and HOG cells ------------------------------------------------------------------------------------

def test_stage_layout_default_and_all_stages():
    assert stage_layout(12, 16) == [(1, 4.0), (3, 2.0), (9, 1.0), (11, 0.5)]
    assert models_mim.default_taps(12) == [1, 3, 9, 11]
    assert models_mim.default_taps(24) == [1, 3, 21, 23]
    lay = stage_layout(12, 16, all_stages=True)
    assert [b for b, _ in lay] == list(range(12))
    assert [s for _, s in lay] == [8, 4, 4, 2, 2, 2, 2, 2, 2, 1, 1, 0.5]  # the seed's table
    # the documented generalisation to depth 24: before tap 1 -> 8, taps 1..3 -> 4, 3..21 -> 2, 21.. -> 1, 23 -> .5
    lay24 = [s for _, s in stage_layout(24, 16, all_stages=True)]
    assert lay24 == [8] + [4] * 2 + [2] * 18 + [1] * 2 + [0.5]
    # patch 4: 4/8 = 0.5 px is not a cell, so block 0 falls back to the first tap's scale (documented rule)
    assert stage_layout(12, 4, all_stages=True)[0] == (0, 4.0)
    with pytest.raises(UserError, match='at least 4'):
        stage_layout(3, 16)


def test_model_cells_and_all_stages_model():
    m = tiny()
    assert m.stage_blocks == [1, 3, 1, 3] and m.stage_scales == [4, 2, 1, 0.5]
    assert m.cell_sizes == [1, 2, 4, 8]
    m8 = tiny(patch_size=8, all_stages=True)
    assert m8.stage_blocks == [0, 1, 2, 3] and len(m8.decoder) == 4 and len(m8.norm) == 4
    # depth 4 taps [1, 3, 1, 3]: block 0 -> 2x the first tap's scale (8, cell 1 px), then the last tap at or
    # before the block (first listed wins on repeats)
    assert m8.stage_scales == [8, 4, 4, 2]
    assert m8.cell_sizes == [1, 2, 2, 4]


def test_non_integer_cells_rejected_clearly():
    with pytest.raises(UserError) as e:
        cell_size(4, 8)
    assert '0.5' in str(e.value) and '--patch_size' in str(e.value)
    # ViT-Ti with 14 px patches and the default 4/2/1/0.5 scales: 3.5 px cells
    with pytest.raises(UserError, match=r'3\.5'):
        create_model('MIM_vit_tiny_patch16', img_size=224, patch_size=14)
    # an explicit scale set that needs half-pixel cells
    with pytest.raises(UserError, match=r'0\.5'):
        LocalMIM(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, stage_scales=(8, 2, 1, 0.5))
    # patch 6 / scale 4 = 1.5 px
    with pytest.raises(UserError, match=r'1\.5'):
        LocalMIM(img_size=36, patch_size=6, embed_dim=64, depth=4, num_heads=4)


def test_bad_geometry_rejected():
    with pytest.raises(UserError, match='square'):
        tiny(img_size=(32, 48))
    with pytest.raises(UserError, match='square'):
        tiny(img_size=(32, 32, 3))
    assert tiny(img_size=(32, 32)).grid == 8
    with pytest.raises(UserError, match='divisible'):
        tiny(img_size=30)
    # an odd grid cannot be 2x2-pooled for the 0.5 stage
    with pytest.raises(UserError, match='grid'):
        tiny(img_size=36)


# ---- factories ----------------------------------------------------------------------------------------------------

def _block_params(d):
    return 12 * d * d + 13 * d


def _decoder_params(d_in, scale, out=27, e=256):
    n = d_in * e + e + e + _block_params(e) + 2 * e  # embed, mask token, block, norm
    if scale == 4:
        n += (e * 128 * 4 + 128) + 2 * 128 + (128 * 64 * 4 + 64) + (64 * out + out)
    elif scale == 2:
        n += (e * 128 * 4 + 128) + (128 * out + out)
    else:
        n += e * out + out
    return n


@pytest.mark.parametrize('name,d,depth,heads,patch', [
    ('MIM_vit_tiny_patch16', 192, 12, 3, 16), ('MIM_vit_small_patch16', 384, 12, 6, 16),
    ('MIM_vit_base_patch16', 768, 12, 12, 16), ('MIM_vit_large_patch16', 1024, 24, 16, 16)])
def test_factories_native_construct_and_param_count(name, d, depth, heads, patch):
    with torch.device('meta'):  # construct only: shapes and counts, no memory, no init cost
        m = create_model(name)
    assert (m.embed_dim, m.depth, m.patch_size, m.img_size, m.grid) == (d, depth, patch, 224, 14)
    assert m.blocks[0].attn.num_heads == heads
    assert m.stage_blocks == [1, 3, depth - 3, depth - 1] and m.cell_sizes == [4, 8, 16, 32]
    enc = 3 * patch * patch * d + d + d + depth * _block_params(d) + 4 * 2 * d
    decs = [_decoder_params(d, s) for s in (4, 2, 1, 0.5)]
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == enc + sum(decs)
    for k, dec in enumerate(m.decoder):
        assert sum(p.numel() for p in dec.parameters() if p.requires_grad) == decs[k]
    assert not m.pos_embed.requires_grad and m.pos_embed.shape == (1, 197, d)
    if name == 'MIM_vit_base_patch16':  # the spec's analytic numbers: 85.65 M encoder, 89.9 M in all
        assert abs(enc / 1e6 - 85.65) < 0.01 and abs(trainable / 1e6 - 89.9) < 0.05
    if name == 'MIM_vit_large_patch16':
        assert abs(enc / 1e6 - 303.1) < 0.05


def test_vit_huge_patch14_at_224_constructs_with_whole_pixel_cells():
    with torch.device('meta'):
        m = create_model('MIM_vit_huge_patch14')
    assert (m.embed_dim, m.depth, m.patch_size, m.grid) == (1280, 32, 14, 16)
    assert m.cell_sizes == [7, 7, 14, 28]
    assert m.stage_scales == [2, 2, 1, 0.5]
    assert m.stage_blocks == [1, 3, 29, 31]
    # prediction grids equal target grids: (16*s)^2 cells and 224/cell per side
    for s, c in zip(m.stage_scales, m.cell_sizes):
        assert 16 * s == 224 // c


def test_tiny_native_forward_shapes():
    torch.manual_seed(0)
    m = create_model('MIM_vit_tiny_patch16')
    with torch.no_grad():
        out = m(torch.randn(1, 3, 224, 224), return_vis=True)
    assert {k: tuple(v.shape) for k, v in out['pred'].items()} == {
        0: (1, 3136, 27), 1: (1, 784, 27), 2: (1, 196, 27), 3: (1, 49, 27)}
    assert {k: tuple(v.shape) for k, v in out['target'].items()} == {
        0: (1, 3136, 27), 1: (1, 784, 27), 2: (1, 196, 27), 3: (1, 49, 27)}
    assert out['mask'].shape == (1, 196) and out['mask'].sum() == 196 - 49
    assert math.isfinite(out['loss'].item())


@pytest.mark.parametrize('nb', [9, 18])
def test_tiny_forward_32px_patch4(nb):
    m = tiny(hog_nbins=nb)
    imgs = torch.randn(4, 3, 32, 32)
    out = m(imgs, return_vis=True)
    assert set(out) == {'loss', 'stage_losses', 'pred', 'target', 'mask'}
    assert out['loss'].shape == () and math.isfinite(out['loss'].item()) and out['loss'].item() > 0
    assert out['loss'].requires_grad
    for k, s in enumerate([4, 2, 1, 0.5]):
        assert out['pred'][k].shape == (4, int(8 * s) ** 2, 3 * nb)
        assert out['target'][k].shape == (4, int(8 * s) ** 2, 3 * nb)
        assert out['stage_losses'][k].requires_grad
    assert out['mask'].shape == (4, 64)
    out['loss'].backward()
    # every trainable parameter receives a gradient
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    no_vis = m(imgs)
    assert set(no_vis) == {'loss', 'stage_losses'}


# ---- units ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('all_stages,patch', [(False, 4), (True, 8)])
def test_units_partition_trainable_params(all_stages, patch):
    m = tiny(all_stages=all_stages, patch_size=patch)
    units = m.units()
    assert len(units) == m.depth + 1
    assert set(units[0].params) == {'cls_token', 'patch_embed.proj.weight', 'patch_embed.proj.bias'}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    seen = [n for u in units for n in u.params]
    assert len(seen) == len(set(seen)), 'a parameter is in two units'
    assert set(seen) == trainable, 'every trainable parameter must be in exactly one unit'
    assert 'pos_embed' not in seen and not any(n.endswith('.pos_embed') for n in seen)
    named = dict(m.named_parameters())
    for k in range(1, m.depth + 1):
        b = k - 1
        expect = {n for n in trainable if n.startswith(f'blocks.{b}.')}
        for s, blk in enumerate(m.stage_blocks):
            if blk == b:
                expect |= {n for n in trainable if n.startswith(f'norm.{s}.') or n.startswith(f'decoder.{s}.')}
        assert set(units[k].params) == expect, k
        for n, p in units[k].params.items():
            assert p is named[n]
    if not all_stages:
        # depth 4: taps [1, 3, 1, 3] -> block 1 (unit 2) feeds stages 0 and 2, block 3 (unit 4) stages 1 and 3
        assert {n.split('.')[1] for n in units[2].params if n.startswith('decoder.')} == {'0', '2'}
        assert {n.split('.')[1] for n in units[4].params if n.startswith('decoder.')} == {'1', '3'}
        assert not any(n.startswith(('decoder.', 'norm.')) for n in units[1].params)


def test_unknown_model_name_is_user_error():
    with pytest.raises(UserError) as e:
        create_model('mae_vit_large_patch16')
    msg = str(e.value)
    assert 'mae_vit_large_patch16' in msg
    for name in models_mim.MODEL_NAMES:
        assert name in msg
    assert len(msg.splitlines()) == 1
