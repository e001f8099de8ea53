"""Silent divergences found in review (issue 25, items 1, 3, 6): each test fails on the code before the fix."""
import argparse
import json

import pytest
import torch

from cli_inproc import cli
from conftest import TINY_PRETRAIN_FLAGS
from freezeout import build_freezer
from models_mim import create_model
from util.errors import UserError
from util.lr_sched import WarmupCosine

pytestmark = pytest.mark.usefixtures('single_thread')


def _adaptive_args(**over):
    a = dict(freeze_policy='adaptive', dont_freeze_pe=False, freeze_signal='weight', freeze_per_lr=False,
             freeze_earliest=0.5, freeze_window=3, freeze_threshold=0.5, freeze_patience=2, freeze_tail=None,
             lr=1e-3, min_lr=1e-6, lr_schedule='constant')
    a.update(over)
    return argparse.Namespace(**a)


def _model():
    torch.manual_seed(0)
    return create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)


def test_adaptive_with_constant_lr_trains_a_constant_lr():
    """Item 1: --freeze_policy adaptive --lr_schedule constant used to train a warm-up cosine."""
    args = _adaptive_args()
    model = _model()
    sched = WarmupCosine(args.lr, args.min_lr, 6, 60, shape=args.lr_schedule)
    fo = build_freezer(args, model, sched)
    opt = torch.optim.AdamW(fo.param_groups(0.05), lr=args.lr)
    for step in range(60):
        fo.step(opt, step)  # the weights never move: every unit stalls, but not before step 30 (earliest)
        if step >= 6:
            active = [g['lr'] for g in opt.param_groups if g['name'] not in {d['unit'] for d in fo.policy.decisions}]
            assert set(active) == {1e-3}, step  # held at the peak, not a cosine
    assert 'warm-up + constant schedule' in fo.format_plan(6)


def test_adaptive_flags_shape_the_run_on_resume():
    """Item 3: changing --freeze_window (or --freeze_signal, ...) on resume was accepted silently."""
    model = _model()
    sched = WarmupCosine(1e-3, 1e-6, 6, 60)
    fo = build_freezer(_adaptive_args(), model, sched)
    state = fo.state_dict()
    for flag, value in (('freeze_window', 5), ('freeze_threshold', 0.3), ('freeze_tail', 7),
                        ('freeze_patience', 3)):
        other = build_freezer(_adaptive_args(**{flag: value}), _model(), sched)
        with pytest.raises(UserError, match=rf'shaped by --{flag} \S+, this run asks for --{flag} {value}'):
            other.load_state_dict(state, None)
    other = build_freezer(_adaptive_args(dont_freeze_pe=True), _model(), sched)  # other units: named as such
    with pytest.raises(UserError, match=r'but this run schedules block1, .*; resume without --dont_freeze_pe'):
        other.load_state_dict(state, None)
    same = build_freezer(_adaptive_args(), _model(), sched)
    same.load_state_dict(state, None)  # the same flags resume


def test_adaptive_plan_says_when_it_can_never_freeze():
    """The adaptive plan's bound ignored window/tail/patience: a plan that can never freeze promised a saving."""
    model = _model()
    sched = WarmupCosine(1e-3, 1e-6, 6, 60)
    fo = build_freezer(_adaptive_args(freeze_window=20, freeze_patience=2, freeze_tail=20), model, sched)
    flops = {'unit_fwd': [1.0] * 5, 'unit_enc_fwd': [1.0] * 5, 'shared_fwd': 0.0}
    text = fo.format_plan(6, flops)
    assert 'this plan can never freeze' in text and 'at most 0.0% saving' in text
    fo = build_freezer(_adaptive_args(freeze_window=3, freeze_patience=2, freeze_tail=3), _model(), sched)
    text = fo.format_plan(6, flops)
    # first decision at W + 2 windows = 12 < earliest 30 - tail 3: the first evaluation step >= 27 is 27; +3 = 30
    assert 'first possible freeze: step 30' in text


@pytest.mark.slow
def test_logged_lr_is_the_global_schedule_and_memory_is_per_epoch(demo_root, tmp_path):
    """Item 6: the logged lr was the max over groups (lr/t_0^3 under vitfreeze after warm-up)."""
    out = tmp_path / 'run'
    rc, _, err = cli('run_pretrain.py', [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--output_dir', out,
                                         '--epochs', '6', '--t_0', '0.5', '--how_scale', 'cubic', '--vis_freq', '0'])
    assert rc == 0, err[-2000:]
    recs = [json.loads(l) for l in (out / 'log.txt').read_text().splitlines()]
    lr = recs[0]['train_lr']  # (4 steps/epoch, W = 4): after warm-up the units jump to lr / t_i > lr
    sched = WarmupCosine(1e-3 * 8 / 256, 1e-6, 4, 24)
    for r in recs:
        assert r['lr'] == pytest.approx(sched.lr_at(r['step'] - 1), rel=1e-12)
        assert r['train_max_mem_mb'] > 0
    # right after warm-up the scaled units run above the global LR: the max over groups is not what is logged
    assert max(recs[1]['unit_lr'].values()) > 1.1 * recs[1]['lr']
    assert lr <= sched.peak


def test_peak_memory_is_reset_each_epoch():
    from util.memory import peak_memory_mb, reset_peak_memory
    cpu = torch.device('cpu')
    big = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
    high = peak_memory_mb(cpu)
    del big
    reset_peak_memory(cpu)
    low = peak_memory_mb(cpu)
    if low >= high - 32:  # VmHWM stays: this kernel ignores clear_refs '5' (then the lifetime peak is reported)
        assert low == pytest.approx(high)
    else:
        assert low < high - 32


def test_reduce_overhead_compile_mode_is_refused_with_freezeout(demo_root):
    for mode in ('reduce-overhead', 'max-autotune'):
        rc, _, err = cli('run_pretrain.py', [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--output_dir', '',
                                             '--t_0', '0.5', '--compile', '--compile_mode', mode, '--plan_only'])
        assert rc == 2 and f'--compile_mode {mode}' in err and 'CUDA graphs' in err, err
