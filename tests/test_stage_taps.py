"""Every layer as a stage (--stage_taps all | B1,B2,.., --stage_scales): the scale rule, decoders and prediction
shapes per tap, the FLOP model of a custom tap list against the ViT block formula, FreezeOut units and stage
switch-off for any list, the default taps unchanged bit for bit, and one-line CLI errors (taps, scales, and
--stage_weights/--stage_targets counts that do not match the taps)."""
import pytest
import torch

from cli_inproc import cli
from conftest import TINY_PRETRAIN_FLAGS
from freezeout import measure_unit_flops
from models_mim import (check_stage_scales, check_stage_taps, create_model, parse_stage_taps, stage_layout)
from util.errors import UserError

pytestmark = pytest.mark.usefixtures('single_thread')


def tiny(depth=4, **kw):
    torch.manual_seed(0)
    return create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=depth, num_heads=4,
                        decoder_embed_dim=16, **kw)


def test_scale_rule_and_explicit_scales():
    # 1-based taps 2,4,..,12 of a ViT-B: the scale of the deepest default tap (2, 4, 10, 12 -> 4, 2, 1, 0.5) at or
    # before each
    assert stage_layout(12, 16, taps=parse_stage_taps('2,4,6,8,10,12', 12)) == \
        [(1, 4.0), (3, 2.0), (5, 2.0), (7, 2.0), (9, 1.0), (11, 0.5)]
    # block 1 lies before the first default tap: twice its scale (8 -> 2 px cells at patch 16; 4 px patches: 4)
    assert stage_layout(12, 16, taps=parse_stage_taps('1,12', 12)) == [(0, 8.0), (11, 0.5)]
    assert stage_layout(12, 4, taps=parse_stage_taps('1,12', 12)) == [(0, 4.0), (11, 0.5)]
    # 'all' is --all_stages; the default taps spelled out are the default layout
    assert stage_layout(12, 16, taps=parse_stage_taps('all', 12)) == stage_layout(12, 16, all_stages=True)
    assert stage_layout(12, 16, taps=parse_stage_taps('2,4,10,12', 12)) == stage_layout(12, 16)
    assert stage_layout(12, 16, taps=parse_stage_taps('3,12', 12), tap_scales='2,1') == [(2, 2.0), (11, 1.0)]
    assert stage_layout(12, 16, tap_scales='2,2,1,0.5') == stage_layout(12, 16, (2, 2, 1, 0.5))
    assert parse_stage_taps(None, 12) is None
    with pytest.raises(UserError, match=r'--stage_scales 2: 1 scales for 2 stage taps; give one per tap'):
        stage_layout(12, 16, taps=[2, 11], tap_scales='2')
    with pytest.raises(UserError, match=r'the deepest tap must be the last block, 12'):
        parse_stage_taps('1,3,5,7,9,11', 12)
    with pytest.raises(UserError, match=r'strictly increasing within 1\.\.4'):
        parse_stage_taps('2,5', 4)


@pytest.mark.parametrize('value,ok', [('all', True), ('1,3,12', True), ('2', True), ('0,3', False), ('3,3', False),
                                      ('4,2', False), ('a,b', False), ('', False)])
def test_check_stage_taps(value, ok):
    assert (check_stage_taps('--stage_taps', value) is None) == ok


@pytest.mark.parametrize('value,ok', [('4,2,1,0.5', True), ('8', True), ('3', False), ('0.25', False),
                                      ('x', False), ('', False)])
def test_check_stage_scales(value, ok):
    assert (check_stage_scales('--stage_scales', value) is None) == ok


def test_decoders_and_shapes_per_tap():
    m = tiny(stage_taps='1,3,4', stage_weights='1,2,3')
    assert m.stage_blocks == [0, 2, 3] and m.stage_scales == [4.0, 4.0, 2.0] and m.cell_sizes == [1, 1, 2]
    assert len(m.decoder) == len(m.norm) == 3 and m.stage_weights == [1.0, 2.0, 3.0]
    torch.manual_seed(1)
    out = m(torch.randn(2, 3, 32, 32), mask_ratio=0.75, return_vis=True)
    g = m.grid
    for k, s in enumerate(m.stage_scales):
        assert out['pred'][k].shape == (2, int(g * s) ** 2, m.target_dims[k])
        assert out['target'][k].shape == out['pred'][k].shape
    out['loss'].backward()
    # every tap's decoder learns; the block feeding no tap (block 2) still gets gradient from the deeper taps
    assert all(m.decoder[k].embed.weight.grad is not None for k in range(3))
    assert m.blocks[1].attn.qkv.weight.grad is not None


def test_default_taps_spelled_out_are_bit_identical():
    a, b = tiny(depth=12), tiny(depth=12, stage_taps='2,4,10,12')
    assert a.layout == b.layout
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    la = a(x)['loss']
    torch.manual_seed(5)
    lb = b(x)['loss']
    assert torch.equal(la, lb)


def block_flops(n_tokens: int, dim: int, mlp_ratio: int = 4) -> float:
    """Forward FLOPs of one ViT block on n tokens (2 per MAC): qkv 3D², proj D², MLP 2·r·D² per token, and the
    attention matmuls QKᵀ, AV: 2·N²·D each."""
    return 2.0 * n_tokens * dim * dim * (4 + 2 * mlp_ratio) + 4.0 * n_tokens ** 2 * dim


def test_flop_model_of_a_custom_tap_list_matches_the_formula():
    m = tiny(stage_taps='1,3,4')
    f = measure_unit_flops(m, 32, 0.75, torch.device('cpu'), time_targets=False)
    n = 1 + int(m.num_patches * 0.25)  # cls + visible tokens
    enc = block_flops(n, 64)
    assert f['unit_enc_fwd'][1:] == [enc] * 4
    dec = [f['unit_fwd'][b + 1] - f['unit_enc_fwd'][b + 1] for b in range(4)]
    assert dec[1] == 0.0  # block 2 feeds no stage: its unit is the block alone
    # a stage's decoder cost depends on its scale only: a two-tap model's 4x and 2x decoders cost the same
    ref = tiny(stage_taps='2,4')
    assert ref.layout == [(1, 4.0), (3, 2.0)]
    fr = measure_unit_flops(ref, 32, 0.75, torch.device('cpu'), time_targets=False)
    assert fr['unit_enc_fwd'][1:] == [enc] * 4
    dec4, dec2 = (fr['unit_fwd'][b] - fr['unit_enc_fwd'][b] for b in (2, 4))
    assert dec[0] == dec[2] == dec4 and dec[3] == dec2 and dec4 > dec2 > 0
    # the per-image total: embedding, 4 blocks, 3 decoders, shared (targets, masking)
    assert f['total_fwd'] == pytest.approx(sum(f['unit_fwd']) + f['shared_fwd'])


def test_freezeout_units_and_stage_switch_off_with_custom_taps():
    m = tiny(stage_taps='1,3,4')
    units = m.units()
    assert [u.name for u in units] == ['embed', 'block1', 'block2', 'block3', 'block4']
    assert any(n.startswith('decoder.0.') for n in units[1].params)
    assert not any(n.startswith(('decoder.', 'norm.')) for n in units[2].params)
    assert any(n.startswith('decoder.1.') for n in units[3].params)
    assert any(n.startswith('decoder.2.') for n in units[4].params)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert sorted(n for u in units for n in u.params) == sorted(names)  # a partition
    m.set_frozen(2, embed_frozen=True)  # blocks 1-2 (0-based 0, 1) frozen: stage 0 (block 1) off
    assert m.active_stages() == [1, 2]
    out = m(torch.randn(2, 3, 32, 32))
    assert set(out['stage_losses']) == {1, 2}
    m.set_frozen(3, embed_frozen=True)
    assert m.active_stages() == [2]


def _plan(demo_root, *extra):
    return cli('run_pretrain.py', [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--epochs', '3', '--plan_only',
                                   '--output_dir', '', *extra])


def test_plan_only_with_custom_taps_and_freezeout(demo_root):
    rc, out, err = _plan(demo_root, '--stage_taps', '1,3,4', '--stage_scales', '4,2,1', '--t_0', '0.8',
                         '--how_scale', 'cubic')
    assert rc == 0, err
    assert 'stages (block, scale, cell px): [(0, 4.0, 1), (2, 2.0, 2), (3, 1.0, 4)]' in out
    assert 'projected saving of training FLOPs' in out
    rc, out, err = _plan(demo_root, '--stage_taps', 'all')
    assert rc == 0 and '[(0, 4.0, 1), (1, 4.0, 1), (2, 4.0, 1), (3, 2.0, 2)]' in out, err


@pytest.mark.parametrize('extra,msg', [
    (['--stage_taps', '1,2'], 'error: --stage_taps 1,2: the deepest tap must be the last block, 4'),
    (['--stage_taps', '3,2,4'], "error: --stage_taps '3,2,4': block indices must be >= 1 and strictly increasing"),
    (['--stage_taps', 'every'], "error: --stage_taps 'every': must be 'all' or a comma list of 1-based block"),
    (['--stage_taps', '2,5'], 'error: --stage_taps 2,5: blocks must be strictly increasing within 1..4'),
    (['--stage_scales', '3,2,1,0.5'], "error: --stage_scales '3,2,1,0.5': every scale must be 0.5 or a power of two"),
    (['--stage_taps', '2,4', '--stage_scales', '1'], 'error: --stage_scales 1: 1 scales for 2 stage taps'),
    (['--stage_taps', '1,2,4', '--stage_weights', '1,2'], 'error: --stage_weights: got 2 weights for 3 stages'),
    (['--stage_taps', '1,2,4', '--stage_targets', 'hog,pixel'],
     "error: --stage_targets 'hog,pixel': 2 targets for 3 stages"),
])
def test_cli_errors_are_one_line(demo_root, extra, msg):
    rc, out, err = _plan(demo_root, *extra)
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(msg), err


def test_all_stages_and_a_tap_list_are_one_or_the_other():
    assert tiny(all_stages=True, stage_taps='all').layout == tiny(all_stages=True).layout
    with pytest.raises(UserError, match=r'--all_stages and --stage_taps 2,4: --all_stages is --stage_taps all'):
        tiny(all_stages=True, stage_taps='2,4')
