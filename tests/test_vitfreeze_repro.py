"""Issue 24 items 1, 3, 4: ViTFreeze's LR floors, its weight decay, and its freeze step, as this code reproduces them.

1. Under ``--freeze_schedule vitfreeze`` a freezing unit's own cosine ends at 0 (ViTFreeze's a_i/2 (1 + cos)), the
   global curve at --min_lr; a typed --min_lr sets both; t_i = 1 units keep the global curve (``--t_0 1`` stays the
   plain run bit for bit).
3. ``--freezeout_weight_decay`` sets the units' matrices' weight decay (ViTFreeze's builder used 1e-5), the
   never-frozen embedding keeps --weight_decay.
4. Non-layer-wise, a unit still trains at a whole freeze point F_i (ViTFreeze: frozen once j - W > t_i (T - W)); its
   LR there is the global one (~0.48 lr for unit 0 of cubic 0.8). Layer-wise it freezes at F_i, where ViTFreeze's
   extra step has LR 0, which AdamW turns into no change at all.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY_PRETRAIN_FLAGS
from freezeout import FreezeOutSchedule, resolve_freeze_args
from util.lr_sched import WarmupCosine

NAMES = [f'u{i}' for i in range(13)]


def vitfreeze_freeze_step(t: float, total: int, warm: int):
    """ViTFreeze's rule: the first step j with j - W > t (T - W), in exact arithmetic (t (T - W) rounded to 1e-6:
    5/6 · 900 is 749.9999999999999 in floats, where ViTFreeze's own float test would freeze one step early; its
    micro-batch counting moves F_i by a fraction of a step anyway). None when F_i is not before T; a step == T is
    never reached."""
    x = round(t * (total - warm), 6)
    return next(j for j in range(warm, total + 2) if j - warm > x) if warm + x < total else None


# ---- 1. LR floors -------------------------------------------------------------------------------------------------

def test_layerwise_unit_curves_end_at_the_unit_floor_and_the_global_curve_at_min_lr():
    total, warm, lr, min_lr = 1000, 100, 1e-3, 1e-6
    s = FreezeOutSchedule(NAMES, total, warm, lr, min_lr, t_0=0.8, how_scale='cubic', unit_min_lr=0.0)
    plain = WarmupCosine(lr, min_lr, warm, total)
    for i, u in enumerate(s.units):
        if u.freeze_step is None:  # the last block (t = 1): the plain schedule, bit for bit, floor min_lr
            assert s.floor(i) == min_lr and all(s.lr_at(i, j) == plain.lr_at(j) for j in range(total))
            continue
        assert s.floor(i) == 0.0
        for j in range(warm, u.freeze_step):  # ViTFreeze: a_i/2 (1 + cos(pi (j - W) / (t_i (T - W))))
            want = u.alpha / 2 * (1 + math.cos(math.pi * (j - warm) / (u.t * (total - warm))))
            assert s.lr_at(i, j) == pytest.approx(want, rel=1e-12, abs=1e-20)
        # at its freeze point the curve is at 0 (the unit freezes there), not at min_lr
        assert s.lr_at(i, math.ceil(u.end_step)) == 0.0
    assert s.global_lr_at(total - 1) > min_lr and plain.lr_at(total) == pytest.approx(min_lr)
    line = s.describe_floors()
    assert 'freezing units (12) end their own curves at 0 at their freeze step (ViTFreeze' in line
    assert 'u12 (t = 1, never frozen) and the global curve end at min_lr=1e-06' in line
    # the default (None) is min_lr everywhere: the earlier behaviour, and the freezeout convention's
    d = FreezeOutSchedule(NAMES, total, warm, lr, min_lr, t_0=0.8, how_scale='cubic')
    assert {d.floor(i) for i in range(13)} == {min_lr} and 'from --min_lr' in d.describe_floors()
    # non-layer-wise: one curve, one floor
    nl = FreezeOutSchedule(NAMES, total, warm, lr, min_lr, t_0=0.8, how_scale='cubic', layerwise_lr=False,
                           unit_min_lr=0.0)
    assert {nl.floor(i) for i in range(13)} == {min_lr}
    assert nl.describe_floors() == 'LR floor: every unit is on the global curve, which ends at min_lr=1e-06'
    with pytest.raises(Exception, match='must be >= 0'):
        FreezeOutSchedule(NAMES, total, warm, lr, min_lr, unit_min_lr=-1.0)


@pytest.mark.parametrize('lr_schedule', ['cosine', 'constant'])
def test_t0_1_with_the_vitfreeze_floor_is_the_plain_run_bit_for_bit(lr_schedule):
    total, warm, lr, min_lr = 97, 13, 3e-4, 1e-6
    s = FreezeOutSchedule(NAMES, total, warm, lr, min_lr, t_0=1.0, how_scale='cubic', unit_min_lr=0.0,
                          lr_schedule=lr_schedule)
    plain = WarmupCosine(lr, min_lr, warm, total, shape=lr_schedule)
    assert all(u.freeze_step is None for u in s.units)
    assert all(s.lr_at(i, j) == plain.lr_at(j) for i in range(13) for j in range(total))


def test_constant_lr_tail_ends_at_the_unit_floor():
    total, warm, lr = 1000, 100, 1e-3
    s = FreezeOutSchedule(NAMES[:5], total, warm, lr, 1e-6, t_0=0.5, how_scale='linear', lr_schedule='constant',
                          constant_tail=0.2, unit_min_lr=0.0)
    for i, u in enumerate(s.units[:-1]):
        end, start = u.end_step, u.end_step - 0.2 * (u.end_step - warm)
        j = u.freeze_step - 1
        assert s.lr_at(i, j) == pytest.approx(u.alpha / 2 * (1 + math.cos(math.pi * (j - start) / (end - start))),
                                              rel=1e-9)


def _args(parser_mod, argv):
    parser = parser_mod.get_args_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    return args


@pytest.mark.parametrize('argv,want', [
    (['--t_0', '0.8'], 0.0),                                           # vitfreeze default: ViTFreeze's 0
    (['--t_0', '0.8', '--min_lr', '1e-6'], 1e-6),                      # typed: it wins
    (['--t_0', '0.8', '--min_lr=2e-6'], 2e-6),
    (['--t_0', '0.8', '--freeze_schedule', 'freezeout'], 1e-6),       # the paper's convention: --min_lr
    (['--freeze_policy', 'adaptive'], 0.0),
])
def test_resolve_freeze_args_unit_floor(argv, want):
    import run_finetune
    import run_pretrain
    for mod in (run_pretrain, run_finetune):
        args = _args(mod, argv)
        resolve_freeze_args(args, argv)
        assert args.unit_min_lr == want, (mod.__name__, argv)
        assert args.min_lr == (2e-6 if '--min_lr=2e-6' in argv else 1e-6)  # the global floor is untouched


# ---- 4. freeze step -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('total,warm,t0,how', [(62500, 6250, 0.8, 'cubic'), (1000, 100, 0.5, 'linear'),
                                               (200, 20, 0.5, 'linear'), (97, 13, 0.7, 'squared'),
                                               (12, 4, 0.8, 'cubic'), (62500, 6250, 0.5, 'linear')])
def test_freeze_steps_against_vitfreezes_rule(total, warm, t0, how):
    lw = FreezeOutSchedule(NAMES, total, warm, 1.6e-3, 1e-6, t0, how, unit_min_lr=0.0)
    nl = FreezeOutSchedule(NAMES, total, warm, 1.6e-3, 1e-6, t0, how, layerwise_lr=False, scale_lr=False)
    for i, (a, b) in enumerate(zip(lw.units, nl.units)):
        vit = vitfreeze_freeze_step(a.t, total, warm)
        assert b.freeze_step == vit, i  # non-layer-wise: exactly ViTFreeze's step
        if a.freeze_step != vit:  # layer-wise: one step earlier, only at a whole F_i, where ViTFreeze's LR is 0
            assert a.freeze_step == vit - 1 and abs(a.end_step - round(a.end_step)) < 1e-6, i
            j = a.freeze_step
            assert a.alpha / 2 * (1 + math.cos(math.pi * (j - warm) / (a.t * (total - warm)))) == 0.0
            assert nl.num_frozen_at(j) == i and nl.num_frozen_at(j + 1) == i + 1  # non-layer-wise: still trained
    if (total, warm, t0, how) == (62500, 6250, 0.8, 'cubic'):  # the seed's recipe, unit 0
        assert (lw.units[0].freeze_step, nl.units[0].freeze_step) == (35050, 35051)
        # the step ViTFreeze still takes non-layer-wise runs at the global LR, ~0.48 lr: a real update
        c = 0.5 * (1 + math.cos(math.pi * 0.512))
        assert nl.lr_at(0, 35050) == pytest.approx(1e-6 + (1.6e-3 - 1e-6) * c, rel=1e-12)
        assert 0.48 < nl.lr_at(0, 35050) / 1.6e-3 < 0.49


def test_an_adamw_step_at_lr_0_moves_nothing():
    """Why layer-wise freezing at a whole F_i (one step before ViTFreeze) trains the same weights: ViTFreeze's extra
    step has LR 0, and AdamW's update and its decoupled weight decay both scale with the LR."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-5)
    for lr in (1e-3, 0.0):
        opt.param_groups[0]['lr'] = lr
        before = p.detach().clone()
        p.grad = torch.randn(8, 8)
        opt.step()
        assert torch.equal(p.detach(), before) == (lr == 0.0)


# ---- 3. --freezeout_weight_decay, and the plan's floor line, through run_pretrain ----------------------------------

def plan(argv, monkeypatch, capsys):
    import run_pretrain
    from util.args import check_flags
    got = {}
    orig = run_pretrain.param_group_summary

    def summary(groups):
        got['groups'] = groups
        return orig(groups)
    monkeypatch.setattr(run_pretrain, 'param_group_summary', summary)
    parser = run_pretrain.get_args_parser()
    args = parser.parse_args(argv)
    check_flags(args, parser, argv)
    args.argv = argv
    capsys.readouterr()
    run_pretrain.main(args)
    return got['groups'], capsys.readouterr().out


def _split(groups):
    """weight decay of the matrix groups and of the 1-D groups, per kind (units / embedding / plain)."""
    out = {}
    for g in groups:
        kind = 'plain' if 'unit' not in g else 'units' if g['unit'] >= 0 else 'embed'
        mats = all(p.ndim > 1 for p in g['params'])
        out.setdefault((kind, mats), set()).add(g['weight_decay'])
    return out


def test_freezeout_weight_decay_and_floor_line_in_the_plan(demo_root, monkeypatch, capsys, single_thread):
    base = TINY_PRETRAIN_FLAGS + ['--data_path', str(demo_root), '--epochs', '3', '--output_dir', '', '--plan_only']
    groups, out = plan(base + ['--t_0', '0.8', '--freezeout_weight_decay', '1e-5'], monkeypatch, capsys)
    assert _split(groups) == {('units', True): {1e-5}, ('units', False): {0.0}}
    assert 'AdamW weight decay (' in out and 'FreezeOut units: 1e-05 on ' in out
    assert 'freezing units (4) end their own curves at 0 at their freeze step (ViTFreeze' in out
    # --dont_freeze_pe: the never-frozen embedding keeps --weight_decay (ViTFreeze's was 0: pass --weight_decay 0)
    groups, out = plan(base + ['--t_0', '0.8', '--freezeout_weight_decay', '1e-5', '--dont_freeze_pe',
                               '--weight_decay', '0.03'], monkeypatch, capsys)
    assert _split(groups) == {('units', True): {1e-5}, ('units', False): {0.0}, ('embed', True): {0.03},
                              ('embed', False): {0.0}}
    assert 'never-frozen embedding: 0.03 on ' in out
    # default: --weight_decay everywhere; a typed --min_lr is every curve's floor
    groups, out = plan(base + ['--t_0', '0.8', '--min_lr', '1e-6'], monkeypatch, capsys)
    assert _split(groups) == {('units', True): {0.05}, ('units', False): {0.0}}
    assert 'end their own curves at 1e-06 at their freeze step (from --min_lr)' in out
    # without FreezeOut the flag does nothing, and says so
    groups, out = plan(base + ['--freezeout_weight_decay', '1e-5'], monkeypatch, capsys)
    assert _split(groups) == {('plain', True): {0.05}, ('plain', False): {0.0}}
    assert 'note: --freezeout_weight_decay only acts with FreezeOut' in out


@pytest.mark.parametrize('value', ['-1', 'nan'])
def test_bad_freezeout_weight_decay_is_one_line(value, demo_root):
    from cli_inproc import cli
    rc, out, err = cli('run_pretrain.py', TINY_PRETRAIN_FLAGS + ['--data_path', str(demo_root), '--t_0', '0.8',
                                                                 '--freezeout_weight_decay', value, '--plan_only'])
    assert rc == 2 and out == ''
    assert len(err.strip().splitlines()) == 1 and err.startswith('error: --freezeout_weight_decay')
