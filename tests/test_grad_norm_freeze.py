"""Gradient-signal freezing (--freeze_policy grad_norm, freeze_grad_norm.GradNormPolicy): the signal is the norm of
AdamW's bias-corrected exp_avg (checked against the EMA formula), decisions follow it (a settled prefix freezes, a
unit whose gradient norm still changes blocks the prefix, a unit that settles later freezes later), the bounds
(earliest, tail, spacing, end of run, last unit), the plan text, flag errors, bit-exact resume through the real CLI
and identical decisions on both ranks of a 2-process gloo run."""
import argparse
import json
import math
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import freezeout
from cli_inproc import cli
from conftest import TINY_PRETRAIN_FLAGS
from freeze_grad_norm import GradNormPolicy, percentile, relative_change
from models_mim import create_model
from reliability_common import env as reliability_env
from util.errors import UserError
from util.lr_sched import warmup_cosine
from test_finetune_freezeout import pretrain_ckpt  # noqa: F401,F811  (fixture: a tiny LocalMIM checkpoint)

pytestmark = pytest.mark.usefixtures('single_thread')

REPO = Path(__file__).resolve().parent.parent
BETA1 = 0.9


def tiny_model(seed=0):
    torch.manual_seed(seed)
    # 16-wide decoders: a small optimizer step (the policy only sees the units' parameters and their state)
    return create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                        decoder_embed_dim=16)


def make(model, total=60, warm=6, dont_freeze_pe=False, optim='adamw', **flags):
    a = dict(grad_window=3, grad_percentile=50.0, grad_earliest=0.0, grad_tail=4, grad_spacing=0)
    a.update(flags)
    lr_fn = lambda j: warmup_cosine(j, 1e-3, 1e-6, warm, total)  # noqa: E731
    units = freezeout.FreezeOut.unit_names(model, dont_freeze_pe)
    fo = freezeout.FreezeOut(model, GradNormPolicy(argparse.Namespace(**a), units, total, warm), dont_freeze_pe,
                             lr_fn)
    groups = fo.param_groups(0.05)
    opt = (torch.optim.AdamW(groups, lr=1e-3, betas=(BETA1, 0.95), fused=True) if optim == 'adamw'
           else torch.optim.SGD(groups, lr=1e-3, momentum=0.9))
    return fo, opt, lr_fn


def drive(model, fo, opt, steps, rate):
    """Play ``steps`` optimizer steps without data: every parameter of unit i gets the gradient dir_p · a_i(j), a
    fixed random direction times a magnitude that grows by exp(rate(i, j)) per step (rate 0: a settled unit whose
    gradient no longer changes). Returns the LR of every group per step and the magnitudes used."""
    gen = torch.Generator().manual_seed(1)
    dirs = {id(p): torch.randn(p.shape, generator=gen) for p in model.parameters()}
    mag = [1.0] * len(fo.sched_units)
    lrs, mags = [], []
    for j in range(steps):
        fo.step(opt, j)
        lrs.append({g['name']: g['lr'] for g in opt.param_groups})
        mags.append(list(mag))
        for i, u in enumerate(fo.sched_units):
            for p in u.params.values():
                if p.requires_grad:
                    p.grad = dirs[id(p)] * mag[i]
            mag[i] *= math.exp(rate(i, j))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return lrs, mags, dirs


def test_percentile_and_relative_change():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 13):
        v = rng.random(n).tolist()
        for p in (0, 10, 50, 80, 100):
            assert percentile(v, p) == pytest.approx(float(np.percentile(v, p)), rel=1e-12)
    assert percentile([1.0, math.inf, math.inf], 100) == math.inf
    assert relative_change(3.0, 2.0) == 0.5 and relative_change(1.0, 2.0) == 0.5
    assert relative_change(0.0, 0.0) == 0.0 and relative_change(1.0, 0.0) == math.inf


def test_signal_is_the_bias_corrected_exp_avg_norm():
    # G_i = ||dir_i|| · (1 - b) sum_k b^(t-1-k) a_i(k) / (1 - b^t) after t steps; eta = |G - G'| / G'
    model = tiny_model()
    fo, opt, _ = make(model, grad_earliest=0.99)  # measure only
    rates = [0.0, 0.01, 0.05, 0.002, 0.03]
    _, mags, dirs = drive(model, fo, opt, 13, lambda i, j: rates[i])  # evaluations at 6, 9, 12

    def g_ref(i, t):
        norm = math.sqrt(sum(dirs[id(p)].double().pow(2).sum().item() for p in fo.sched_units[i].params.values()))
        ema = (1 - BETA1) * sum(BETA1 ** (t - 1 - k) * mags[k][i] for k in range(t))
        return norm * ema / (1 - BETA1 ** t)
    pol = fo.policy
    assert pol.prev_step == 12 and set(pol.prev) == set(range(5))
    for i in range(5):
        assert pol.prev[i] == pytest.approx(g_ref(i, 12), rel=1e-5)
        eta = abs(g_ref(i, 12) - g_ref(i, 9)) / g_ref(i, 9)
        assert pol.change[pol.units[i]] == pytest.approx(eta, rel=1e-3, abs=1e-6)
    assert pol.change['embed'] == pytest.approx(0.0, abs=1e-6)  # a constant gradient: m-hat is exactly it
    assert pol.threshold == pytest.approx(percentile(list(pol.change.values()), 50), rel=1e-12)


def test_settled_prefix_freezes_a_changing_unit_blocks_the_rest():
    model = tiny_model()
    fo, opt, _ = make(model)
    n = len(fo.sched_units)
    rates = [0.001, 0.002, 0.05, 0.003, 0.004]  # block2's gradient norm keeps growing
    drive(model, fo, opt, 60, lambda i, j: rates[i])
    pol = fo.policy
    # first G at the end of warm-up (6), first change at 9: embed and block1 are at or below the median, block2 is
    # above it and stops the prefix; block3 and block4 (below the median too) wait behind block2 to the end
    assert [(d['unit'], d['step'], d['freeze_step']) for d in pol.decisions] == [('embed', 9, 13), ('block1', 9, 13)]
    assert all(d['grad_change'] <= d['threshold'] for d in pol.decisions)
    assert fo.num_frozen == 2 and model.embed_frozen and model.num_frozen_blocks == 1
    assert {g['unit'] for g in opt.param_groups} == set(range(2, n))
    assert all(not p.requires_grad for u in fo.sched_units[:2] for p in u.params.values())
    assert pol.change['block2'] > pol.threshold >= pol.change['block3']
    assert set(pol.change) == {'block2', 'block3', 'block4'}  # frozen and decided units are no longer measured


def test_a_unit_that_settles_later_freezes_later_and_decisions_may_cover_several_units():
    model = tiny_model()
    fo, opt, _ = make(model)
    rates = [0.05, 0.010, 0.011, 0.012, 0.013]
    events, observe = [], fo.policy.observe

    def spy(step, view):
        ev = observe(step, view)
        events.extend(ev)
        return ev
    fo.policy.observe = spy
    drive(model, fo, opt, 60, lambda i, j: 0.0 if (i == 0 and j >= 30) else rates[i])
    pol = fo.policy
    first = pol.decisions[0]
    # embed's gradient norm grows 5%/step until step 30 (above the median of the others' ~1%): nothing freezes; after
    # 30 its EMA settles and it is decided once its change is at or below the median
    assert first['unit'] == 'embed' and 30 < first['step'] <= 48
    sig = {e['step']: e for e in events if e['kind'] == 'signal'}
    for s, e in sig.items():
        if s < first['step']:
            assert e['plasticity']['embed'] > e['threshold']
    assert [d['unit'] for d in pol.decisions] == ['embed', 'block1', 'block2', 'block3'][:len(pol.decisions)]
    assert len(pol.decisions) >= 3 and len({d['step'] for d in pol.decisions}) < len(pol.decisions)
    steps = [d['step'] for d in pol.decisions]
    assert steps == sorted(steps) and 'block4' not in {d['unit'] for d in pol.decisions}
    texts = [e['text'] for e in events if e['kind'] == 'decision']
    assert re.match(r'embed settled \(gradient-norm change [\d.e-]+ <= [\d.e-]+, the 50th percentile of 5 units\); '
                    r'its LR anneals to 0 and it freezes at step \d+$', texts[0]), texts[0]
    line = freezeout.format_decision({'kind': 'decision', 'policy': 'grad_norm', 'step': 33, 'text': 'x y'}, 4)
    assert line == 'FreezeOut grad_norm: step 33 (epoch 4): x y'


def test_spacing_delays_the_next_decision():
    def run(spacing):
        model = tiny_model()
        fo, opt, _ = make(model, 80, grad_spacing=spacing)
        rates = [0.05, 0.010, 0.011, 0.012, 0.013]
        drive(model, fo, opt, 80, lambda i, j: 0.0 if (i == 0 and j >= 30) else rates[i])
        return sorted({d['step'] for d in fo.policy.decisions})
    free, spaced = run(0), run(12)
    assert free[0] == spaced[0] and free[1] - free[0] < 12
    assert all(b - a >= 12 for a, b in zip(spaced, spaced[1:])) and len(spaced) >= 2


def test_bounds_tail_last_unit_never_and_saving():
    model = tiny_model()
    total = 60
    fo, opt, lr_fn = make(model, total, 6, grad_earliest=0.5, grad_tail=5, grad_percentile=100.0)
    lrs, _, _ = drive(model, fo, opt, total, lambda i, j: 0.0)  # P100: every unit is at or below the maximum
    pol = fo.policy
    # earliest step 30: the first evaluation (6, 9, ...) with step + 5 >= 30 is 27; all chained in one decision
    assert [d['step'] for d in pol.decisions] == [27] * 4 and pol.earliest_step == 30
    assert [d['unit'] for d in pol.decisions] == ['embed', 'block1', 'block2', 'block3']
    assert fo.num_frozen == 4 and all(d['freeze_step'] == 32 for d in pol.decisions)
    for j in range(27, 32):
        assert lrs[j]['embed'] == pytest.approx(lr_fn(j) * 0.5 * (1 + math.cos(math.pi * (j - 27) / 5)), rel=1e-12)
        assert lrs[j]['block4'] == lr_fn(j)
    for j in range(27):
        assert set(lrs[j].values()) == {lr_fn(j)}  # plain training, number for number, before any decision
    assert 'embed' not in lrs[32] and lrs[32]['block4'] == lr_fn(32)
    assert fo.num_frozen_at(31) == 0 and fo.num_frozen_at(32) == 4 and fo.state_boundaries() == [32]
    flops = {'unit_fwd': [1.0] * 5, 'unit_enc_fwd': [1.0] * 5, 'shared_fwd': 0.0}
    assert freezeout.decided_saving(fo, flops, 60, False) == pytest.approx(1 - (32 * 15 + 28 * 7) / (60 * 15))
    assert pol.first_possible_freeze() == 32


def test_no_decision_whose_freeze_falls_at_or_after_the_end():
    model = tiny_model()
    fo, opt, _ = make(model, 60, 6, grad_earliest=0.9, grad_tail=6, grad_percentile=100.0)
    drive(model, fo, opt, 60, lambda i, j: 0.0)
    # earliest step 54: a decision needs step + 6 >= 54 and step + 6 < 60: the evaluation at 48 or 51
    assert fo.policy.decisions and all(48 <= d['step'] <= 53 for d in fo.policy.decisions)
    model = tiny_model()
    # evaluations 6, 16, ..., 56: none has step + 5 in [57, 60)
    fo, opt, _ = make(model, 60, 6, grad_window=10, grad_earliest=0.95, grad_tail=5, grad_percentile=100.0)
    drive(model, fo, opt, 60, lambda i, j: 0.0)
    assert fo.policy.decisions == [] and fo.policy.first_possible_freeze() is None


def test_dont_freeze_pe_units_and_state_dict_roundtrip():
    model = tiny_model()
    fo, opt, _ = make(model, dont_freeze_pe=True)
    rates = [0.001, 0.05, 0.002, 0.003]
    drive(model, fo, opt, 14, lambda i, j: rates[i])
    assert [u.name for u in fo.sched_units] == ['block1', 'block2', 'block3', 'block4']
    assert [d['unit'] for d in fo.policy.decisions] == ['block1']
    state = fo.state_dict()
    ps = state['policy_state']
    assert ps['tails'] == {'0': [9, 13]} and ps['prev_step'] == 12 and set(ps['prev']) == {'1', '2', '3'}
    torch.save(state, '/dev/null')  # plain containers only
    model2 = tiny_model()
    model2.load_state_dict(model.state_dict())
    fo2, opt2, _ = make(model2, dont_freeze_pe=True)
    fo2.load_state_dict(state, opt2)
    p1, p2 = fo.policy, fo2.policy
    assert (p2.prev, p2.prev_step, p2.tails, p2.decisions, p2.change, p2.threshold) == \
           (p1.prev, p1.prev_step, p1.tails, p1.decisions, p1.change, p1.threshold)
    assert fo2.num_frozen == 1 and not model2.embed_frozen


def test_an_optimizer_without_exp_avg_is_refused_in_one_line():
    model = tiny_model()
    fo, opt, _ = make(model, optim='sgd')  # SGD with momentum keeps momentum_buffer only
    with pytest.raises(UserError, match=r"grad_norm reads the optimizer's exp_avg .*keeps \['momentum_buffer'\]"):
        drive(model, fo, opt, 10, lambda i, j: 0.0)


# ---- through the CLI ---------------------------------------------------------------------------------------------

# 32 train images, batch 4: 8 steps/epoch, T = 24, W = 8; evaluations every 2 steps from 8. Measured (seed 3): embed
# is decided at step 10 (freezes at 12), block1 at 14 (freezes at 16, i.e. after the epoch-1 checkpoint at step 16)
# and block2 at 16: the checkpoint holds a pending tail and the previous evaluation's norms.
GRAD = ['--freeze_policy', 'grad_norm', '--grad_window', '2', '--grad_tail', '2', '--grad_earliest', '0.3']
TINY = [*TINY_PRETRAIN_FLAGS[:TINY_PRETRAIN_FLAGS.index('--batch_size')], '--batch_size', '4',
        *TINY_PRETRAIN_FLAGS[TINY_PRETRAIN_FLAGS.index('--batch_size') + 2:], '--seed', '3']


def _records(out):
    # not the savings: the FLOP model prices the HOG targets by timing them, so they differ from run to run
    keep = re.compile(r'^(train_loss.*|train_lr|epoch|step|frozen_units|active_stages|unit_lr|freeze_.*)$')
    recs = [json.loads(l) for l in (out / 'log.txt').read_text().splitlines() if l.strip()]
    return [{k: v for k, v in r.items() if keep.match(k)} for r in recs]


def _same(a, b, where=''):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _same(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f'{where}[{i}]')
    else:
        assert a == b, f'{where}: {a!r} != {b!r}'


@pytest.mark.slow
def test_cli_grad_norm_trains_logs_and_resumes_bit_exactly(demo_root, tmp_path):
    ref, res = tmp_path / 'ref', tmp_path / 'res'
    args = [*TINY, *GRAD, '--epochs', '3', '--data_path', demo_root, '--vis_freq', '0']
    rc, out, err = cli('run_pretrain.py', [*args, '--output_dir', ref, '--save_freq', '1'])
    assert rc == 0, err[-3000:]
    lines = re.findall(r'FreezeOut grad_norm: step (\d+) \(epoch \d\): (\w+) settled \(gradient-norm change .*'
                       r'freezes at step (\d+)', out)
    assert lines, out[-3000:]
    ck1 = torch.load(ref / 'checkpoint-1.pth', map_location='cpu', weights_only=True)
    fo1 = ck1['freezeout']
    assert ck1['step'] == 16 and fo1['policy'] == 'grad_norm'
    ps = fo1['policy_state']
    assert ps['prev_step'] == 14 and ps['prev'] and ps['tails'], ps  # mid-window, with a pending freeze
    assert fo1['flags'] == {'grad_window': 2, 'grad_percentile': 50.0, 'grad_earliest': 0.3, 'grad_tail': 2,
                            'grad_spacing': 0, 'dont_freeze_pe': False}
    recs = _records(ref)
    assert [(str(d['step']), d['unit'], str(d['freeze_step'])) for r in recs for d in r['freeze_decisions']] == lines
    assert recs[-1]['frozen_units'] >= 1 and recs[-1]['freeze_grad_change'] and recs[-1]['freeze_grad_threshold'] > 0
    last = json.loads((ref / 'log.txt').read_text().splitlines()[-1])
    assert 0 < last['decided_saving_so_far'] < 1
    # resume from the epoch-1 checkpoint: the rest of the run is bit-identical
    res.mkdir()
    shutil.copy(ref / 'checkpoint-1.pth', res / 'checkpoint-last.pth')
    (res / 'log.txt').write_text(''.join((ref / 'log.txt').read_text().splitlines(keepends=True)[:2]))
    rc, out2, err = cli('run_pretrain.py', [*args, '--output_dir', res])
    assert rc == 0, err[-3000:]
    assert 'Resumed from' in out2
    a = torch.load(ref / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    b = torch.load(res / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    for k in ('model', 'optimizer', 'step', 'freezeout', 'rng'):
        _same(a[k], b[k], k)
    assert _records(ref) == _records(res)
    # a resume with another percentile is refused in one line naming both
    rc, _, err = cli('run_pretrain.py', [*args, '--output_dir', tmp_path / 'bad', '--resume', ref / 'checkpoint-1.pth',
                                         '--grad_percentile', '60'])
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and 'shaped by --grad_percentile 50.0, this run asks for --grad_percentile ' \
                                            '60.0' in lines[0], err


def test_cli_plan_only(demo_root):
    rc, out, err = cli('run_pretrain.py', [*TINY, '--epochs', '3', '--data_path', demo_root, '--output_dir', '',
                                           '--freeze_policy', 'grad_norm', '--grad_window', '3', '--grad_spacing',
                                           '4', '--plan_only'])
    assert rc == 0, err
    assert ("FreezeOut policy: grad_norm (AutoFreeze: signal = relative change of each unit's accumulated gradient "
            "norm, AdamW's bias-corrected exp_avg, over the window), T=24 optimizer steps (8/epoch), warm-up "
            "W=8") in out
    assert 'earliest freeze: 0.5 of training = step 12 (epoch 1.50)' in out
    assert 'window: every 3 steps (0.38 epochs) from step 8: 6 evaluations' in out
    assert ('threshold: the prefix freezes up to the first unit whose change is above the 50th percentile of the '
            "measured units' changes") in out
    assert 'tail: LR x 1/2(1 + cos) over 3 steps (0.38 epochs)' in out and 'spacing: decisions at least 4 steps' in out
    assert 'order: prefix (embed, block1, block2, block3); block4 never freezes' in out
    # first change at 11 (G at 8 and 11), 11 + 3 >= 12: the first freeze can be at 14
    assert 'first possible freeze: step 14 (epoch 1.75)' in out
    assert re.search(r'FLOP model: at most \d+\.\d% saving', out)


@pytest.mark.parametrize('flags,msg', [
    (['--grad_percentile', '101'], 'error: --grad_percentile 101.0: must be in [0, 100]'),
    (['--grad_earliest', '1'], 'error: --grad_earliest 1.0: must be in [0, 1)'),
    (['--grad_window', '0'], 'error: --grad_window 0: must be >= 1'),
    (['--grad_tail', '-1'], 'error: --grad_tail -1: must be >= 0'),
    (['--grad_spacing', '-2'], 'error: --grad_spacing -2: must be >= 0'),
    (['--t_0', '0.8'], 'error: --t_0 shape the scheduled FreezeOut; with --freeze_policy grad_norm there is no t_i: '
                       'drop it or use --freeze_policy schedule'),
])
def test_cli_flag_errors(flags, msg, demo_root, tmp_path):
    out_dir = tmp_path / 'o'
    rc, out, err = cli('run_pretrain.py', [*TINY, '--epochs', '3', '--data_path', demo_root, '--output_dir', out_dir,
                                           '--freeze_policy', 'grad_norm', *flags])
    assert (rc, err.strip()) == (2, msg)
    assert not out_dir.exists()


def test_cli_grad_flags_with_another_policy_say_they_do_nothing(demo_root):
    rc, out, err = cli('run_pretrain.py', [*TINY, '--epochs', '3', '--data_path', demo_root, '--output_dir', '',
                                           '--freeze_policy', 'adaptive', '--grad_window', '5', '--plan_only'])
    assert rc == 0, err
    assert 'note: --grad_window only act with --freeze_policy grad_norm' in out
    assert 'FreezeOut policy: adaptive' in out


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_ranks_take_identical_decisions(demo_root, tmp_path):
    out, dumps = tmp_path / 'out', tmp_path / 'dumps'
    # per rank 16 images, batch 4, accum 2: 2 steps/epoch, T = 6 with 3 epochs; W = 2; evaluations every step
    args = [*TINY, '--accum_iter', '2', '--epochs', '3', '--data_path', demo_root, '--output_dir', out,
            '--freeze_policy', 'grad_norm', '--grad_window', '1', '--grad_tail', '1', '--grad_percentile', '100',
            '--grad_earliest', '0']
    env = reliability_env(MKL_NUM_THREADS='1', VITFREEZE_TEST_DUMP_RANK_WEIGHTS=str(dumps))  # tests/hooks
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                        f'--master_port={_free_port()}', str(REPO / 'run_pretrain.py'), *map(str, args)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert 'FreezeOut grad_norm: step' in r.stdout
    for epoch in range(3):
        d = [json.loads((dumps / f'rank{k}-epoch{epoch}.json').read_text()) for k in (0, 1)]
        assert d[0]['freezeout'] == d[1]['freezeout'], epoch
        assert d[0]['model'] == d[1]['model'] and d[0]['optimizer'] == d[1]['optimizer'], epoch
    assert d[0]['freezeout']['policy_state']['decisions'] and d[0]['freezeout']['num_frozen'] >= 1


def test_cli_finetune_grad_norm_decides_and_freezes(demo_root, tmp_path, capsys, pretrain_ckpt):
    """AutoFreeze's own setting: fine-tuning (timm ViT, layer-decay groups split by unit, AdamW betas 0.9/0.999)."""
    from test_finetune_freezeout import FT, ckpt, finetune
    out_dir = tmp_path / 'o'
    finetune(*FT, '--epochs', '3', '--finetune', pretrain_ckpt, '--data_path', demo_root, '--output_dir', out_dir,
             '--freeze_policy', 'grad_norm', '--grad_window', '2', '--grad_tail', '1', '--grad_percentile', '100',
             '--grad_earliest', '0')
    out = capsys.readouterr().out
    recs = [json.loads(l) for l in (out_dir / 'log.txt').read_text().splitlines()]
    decisions = [d for r in recs for d in r['freeze_decisions']]
    # P100: every measured unit is at or below the maximum: the whole prefix is decided at the first change
    assert [d['unit'] for d in decisions] == ['embed', 'block1', 'block2', 'block3']
    assert len({d['step'] for d in decisions}) == 1
    assert out.count('FreezeOut grad_norm: step') == 4 and recs[-1]['frozen_units'] == 4
    assert ckpt(out_dir)['freezeout']['policy'] == 'grad_norm' and recs[-1]['decided_saving_so_far'] > 0
