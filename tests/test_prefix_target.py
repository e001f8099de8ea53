"""--prefix_target replace|add (prefix_target.py): nothing changes before a freeze (loss and gradients bit for bit);
after one, the target is the frozen prefix's LayerNorm'ed full-image output (vs LocalMIM.unit_features), the
replace loss equals a hand computation at the masked tokens, add = HOG + replace stage by stage, gradients reach
the heads and not the frozen prefix; the heads freeze with their stage's unit; the FLOP model counts the extra
full-image pass by formula; through the CLI: the plan line, a run across a freeze, one-line refusals."""
import json

import pytest
import torch
import torch.nn.functional as F

from cli_inproc import cli
from conftest import TINY_PRETRAIN_FLAGS
from models_mim import create_model
from prefix_target import PrefixTarget, prefix_extra_flops

pytestmark = pytest.mark.usefixtures('single_thread')
L, D, E = 64, 64, 16


def tiny(**kw):
    torch.manual_seed(0)
    m = create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=D, depth=4, num_heads=4,
                     decoder_embed_dim=E, **kw)
    return m.train()


def _run(m, imgs, ids=None, seed=7):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = m(imgs, mask_ratio=0.75, ids_shuffle=ids)
    out['loss'].backward()
    return out


def test_nothing_changes_before_a_freeze():
    ref, add = tiny(), tiny(prefix_target='add')
    shared = ref.state_dict()
    assert all(torch.equal(v, add.state_dict()[k]) for k, v in shared.items())  # the heads come last in the init
    assert {k for k in add.state_dict() if k not in shared} == {f'prefix.heads.{k}.{p}' for k in range(4)
                                                                 for p in ('weight', 'bias')}
    imgs = torch.randn(2, 3, 32, 32)
    a, b = _run(ref, imgs), _run(add, imgs)
    assert torch.equal(a['loss'], b['loss'])
    named = dict(add.named_parameters())
    for n, p in ref.named_parameters():
        assert (p.grad is None) == (named[n].grad is None) and (p.grad is None or torch.equal(p.grad, named[n].grad))
    assert all(p.grad is None for p in add.prefix.parameters())


def test_heads_are_in_their_stage_unit():
    m = tiny(prefix_target='replace')
    units = m.units()
    owner = {n: i for i, u in enumerate(units) for n in u.params}
    assert len(owner) == sum(len(u.params) for u in units) == sum(p.requires_grad for p in m.parameters())  # each once
    for k, b in enumerate(m.stage_blocks):
        assert owner[f'prefix.heads.{k}.weight'] == b + 1


@pytest.mark.parametrize('frozen_blocks', [0, 1, 2])
def test_target_and_losses_after_a_freeze(frozen_blocks):
    imgs = torch.randn(3, 3, 32, 32)
    ids = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    models = {mode: tiny(prefix_target=mode, prefix_target_weight=0.5) for mode in ('add', 'replace')}
    models['hog'] = tiny()
    for m in models.values():
        m.set_frozen(frozen_blocks, embed_frozen=True)
    feats = PrefixTarget.features(models['add'], imgs)
    want = models['add'].unit_features(imgs)[frozen_blocks][:, 1:]
    assert torch.allclose(feats, F.layer_norm(want, (D,)), atol=1e-6)
    out = {k: _run(m, imgs, ids) for k, m in models.items()}
    active = models['hog'].active_stages()
    assert sorted(out['add']['stage_losses']) == sorted(out['replace']['stage_losses']) == active
    for k in active:  # add = HOG + w p_k, stage by stage
        assert torch.allclose(out['add']['stage_losses'][k], out['hog']['stage_losses'][k]
                              + out['replace']['stage_losses'][k], rtol=1e-5, atol=1e-6)
    m = models['add']
    assert all(p.grad is None for p in m.patch_embed.parameters())
    assert all(p.grad is None for b in m.blocks[:frozen_blocks] for p in b.parameters())
    for k in range(4):
        assert (m.prefix.heads[k].weight.grad is not None) == (k in active)
    # by hand: heads with zero weights predict their bias c at every token -> p_k = mean over masked tokens of
    # mean_d (c - LN(prefix(img)))^2
    rep = models['replace']
    masked = ids[:, 16:]  # keep = int(64 * 0.25) = 16 visible
    t = torch.gather(F.layer_norm(want, (D,)), 1, masked.unsqueeze(-1).expand(-1, -1, D))
    with torch.no_grad():
        for k, h in enumerate(rep.prefix.heads):
            h.weight.zero_()
            h.bias.copy_(torch.linspace(-1, 1, D) * (k + 1))
    res = _run(rep, imgs, ids)
    for k in active:
        c = torch.linspace(-1, 1, D) * (k + 1)
        assert torch.allclose(res['stage_losses'][k], 0.5 * (c - t).pow(2).mean(), rtol=1e-5)


def test_flop_model_counts_the_full_image_prefix_pass():
    m = tiny(prefix_target='add')
    got = prefix_extra_flops(m, 32, 0.75, torch.device('cpu'))
    extra = got['prefix_extra']
    n = L + 1  # tokens with cls
    embed = 2 * L * (3 * 4 * 4) * D
    block = 2 * n * D * 3 * D + 2 * 2 * n * n * D + 2 * n * D * D + 2 * 2 * n * D * 4 * D
    head = 2 * 48 * E * D  # 48 masked tokens
    assert extra[0] == 0 and len(extra) == len(m.units()) + 1
    for count in range(1, 6):
        nb = count - 1
        active = [k for k, b in enumerate(m.stage_blocks) if b >= nb]
        assert extra[count] == pytest.approx(embed + nb * block + 3 * head * len(active), rel=1e-9)
        assert got['prefix_pass'][count] == pytest.approx(embed + nb * block, rel=1e-9)


def _args(demo_root, out, *extra):
    return [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--output_dir', out, '--epochs', '2', '--save_freq', '1',
            '--vis_freq', '0', *extra]


def test_cli_plan_and_a_run_across_a_freeze(demo_root, tmp_path):
    fo = ['--t_0', '0.5', '--how_scale', 'linear']
    rc, out, err = cli('run_pretrain.py', _args(demo_root, '', '--plan_only', *fo, '--prefix_target', 'add'))
    assert rc == 0, err[-3000:]
    line = next(l for l in out.splitlines() if l.startswith('prefix target (add)'))
    with_pt = float(line.split('saving ')[1].split('%')[0])
    alone = float(line.split('FreezeOut alone: ')[1].split('%')[0])
    assert with_pt < alone
    rc, out, err = cli('run_pretrain.py', _args(demo_root, tmp_path / 'r', *fo, '--prefix_target', 'replace'))
    assert rc == 0, err[-3000:]
    recs = [json.loads(l) for l in (tmp_path / 'r' / 'log.txt').read_text().splitlines()]
    assert recs[-1]['frozen_units'] >= 1 and all(r['train_loss'] > 0 for r in recs)


@pytest.mark.parametrize('extra,msg', [
    (['--prefix_target', 'add'], 'error: --prefix_target add: needs FreezeOut'),
    (['--prefix_target', 'add', '--t_0', '0.5', '--dont_freeze_pe'], 'error: --prefix_target add with --dont_freeze_pe'),
    (['--prefix_target', 'add', '--t_0', '0.5', '--prefix_target_weight', '-1'], 'error: --prefix_target_weight -1'),
])
def test_cli_errors_are_one_line(demo_root, tmp_path, extra, msg):
    rc, out, err = cli('run_pretrain.py', _args(demo_root, tmp_path / 'o', *extra))
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc != 0 and len(lines) == 1 and lines[0].startswith(msg), err
    assert not (tmp_path / 'o').exists()


def test_not_combined_with_self_distillation():
    from util.errors import UserError
    with pytest.raises(UserError, match=r'^--prefix_target with --self_distill: not combined .*; choose one$'):
        tiny(prefix_target='add', self_distill=1.0)
