"""Adaptive freezing (--freeze_policy adaptive, freezeout.AdaptiveFreezeOut): decisions follow the signal (a unit
whose weights cannot change is frozen first, a unit still moving is not), prefix order, the bounds, the LR tail,
what freezing does to the optimizer, the plan, flag errors, bit-exact resume and identical decisions on both ranks
of a 2-process gloo run (the last two through the real CLI)."""
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_PRETRAIN_FLAGS
from reliability_common import env as reliability_env
from freezeout import AdaptiveBounds, AdaptiveFreezeOut, decided_saving, step_cost
from models_mim import create_model
from util.lr_sched import warmup_cosine

pytestmark = pytest.mark.usefixtures('single_thread')

REPO = Path(__file__).resolve().parent.parent


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)


def drive(model, fo, opt, steps, moving, lr_fn, per_lr=False):
    """Play ``steps`` optimizer steps without data: units in ``moving`` drift along a fixed direction by a constant
    step (or, with ``per_lr``, by lr·step: a unit that keeps learning at its LR), the others do not change at all."""
    gen = torch.Generator().manual_seed(1)
    dirs = {id(p): torch.randn(p.shape, generator=gen) for p in model.parameters()}
    lrs = []
    for j in range(steps):
        fo.step(opt, j)
        lrs.append({g['name']: g['lr'] for g in opt.param_groups})
        with torch.no_grad():
            for i in moving:
                if i >= fo.num_frozen:
                    for p in fo.sched_units[i].params.values():
                        p.add_(dirs[id(p)], alpha=(lr_fn(j) if per_lr else 1e-3) * 1e-2)
    return lrs


def make(model, total=60, warm=6, bounds=None, **kw):
    lr_fn = lambda j: warmup_cosine(j, 1e-3, 1e-6, warm, total)  # noqa: E731
    bounds = bounds or AdaptiveBounds(earliest=0.0, window=3, threshold=0.5, patience=2, tail=4)
    fo = AdaptiveFreezeOut(model, total, warm, lr_fn, bounds, **kw)
    opt = torch.optim.AdamW(fo.param_groups(0.05), lr=1e-3)
    return fo, opt, lr_fn


def test_unit_that_cannot_change_freezes_first_moving_units_do_not():
    model = tiny_model()
    fo, opt, lr_fn = make(model)
    n = len(fo.sched_units)
    drive(model, fo, opt, 60, moving=range(1, n), lr_fn=lr_fn)
    assert [d['unit'] for d in fo.policy.decisions] == ['embed']
    d = fo.policy.decisions[0]
    # evaluations at 6, 9, 12, ...: the first measurement is at 9 (plasticity 0 < 0.5), patience 2 -> decided at 12
    assert d['step'] == 12 and d['freeze_step'] == 16 and d['plasticity'] == 0.0
    assert fo.num_frozen == 1 and model.embed_frozen and model.num_frozen_blocks == 0
    assert all(not p.requires_grad for p in fo.sched_units[0].params.values())
    assert {g['unit'] for g in opt.param_groups} == set(range(1, n))
    # the blocks keep moving: plastic (~1) to the end
    assert all(v > 0.9 for v in fo.policy.plasticity.values()) and set(fo.policy.plasticity) == {'block1', 'block2', 'block3'}


def test_per_lr_judges_change_per_unit_lr():
    # blocks that move by lr·step (learning at their LR, which decays with the cosine): the raw change shrinks, so
    # the default signal sees them stall; per unit LR they stay plastic
    model = tiny_model()
    fo, opt, lr_fn = make(model, per_lr=True)
    drive(model, fo, opt, 60, moving=range(1, 5), lr_fn=lr_fn, per_lr=True)
    assert [d['unit'] for d in fo.policy.decisions] == ['embed'] and all(v > 0.9 for v in fo.policy.plasticity.values())
    model = tiny_model()
    fo, opt, lr_fn = make(model)
    drive(model, fo, opt, 60, moving=range(1, 5), lr_fn=lr_fn, per_lr=True)
    assert [d['unit'] for d in fo.policy.decisions][:2] == ['embed', 'block1']


def test_prefix_order_a_stalled_block_waits_for_the_unit_before_it():
    model = tiny_model()
    fo, opt, lr_fn = make(model)
    drive(model, fo, opt, 60, moving=[0, 2, 3, 4], lr_fn=lr_fn)  # block1 (unit 1) cannot change, embed moves
    assert fo.policy.decisions == [] and fo.num_frozen == 0
    assert fo.policy.plasticity['block1'] == 0.0 and fo.policy.below[1] >= 2 and fo.policy.plasticity['embed'] > 0.9


def test_lr_tail_bounds_last_unit_never_and_saving():
    model = tiny_model()
    total, warm = 60, 6
    bounds = AdaptiveBounds(earliest=0.5, window=3, threshold=0.5, patience=1, tail=5)
    fo, opt, lr_fn = make(model, total, warm, bounds)
    lrs = drive(model, fo, opt, total, moving=[], lr_fn=lr_fn)  # nothing moves: everything stalls at once
    steps = [d['step'] for d in fo.policy.decisions]
    # first step with step + tail >= earliest (30) on the evaluation grid 6, 9, ...: 27; all chained at once
    assert steps == [27] * 4 and [d['unit'] for d in fo.policy.decisions] == ['embed', 'block1', 'block2', 'block3']
    assert all(d['freeze_step'] == 32 >= bounds.earliest * total for d in fo.policy.decisions)
    assert fo.num_frozen == 4 and 'block4' not in {d['unit'] for d in fo.policy.decisions}  # the last unit never
    for j in range(27, 32):  # tail: LR x 1/2(1 + cos(pi (j - 27) / 5))
        assert lrs[j]['embed'] == pytest.approx(lr_fn(j) * 0.5 * (1 + math.cos(math.pi * (j - 27) / 5)), rel=1e-12)
        assert lrs[j]['block4'] == lr_fn(j)
    assert lrs[26]['embed'] == lr_fn(26)
    assert 'embed' not in lrs[32] and lrs[32]['block4'] == lr_fn(32)
    assert fo.num_frozen_at(31) == 0 and fo.num_frozen_at(32) == 4 and fo.state_boundaries() == [32]
    flops = {'unit_fwd': [1.0] * 5, 'unit_enc_fwd': [1.0] * 5, 'shared_fwd': 0.0}
    # steps [0, 32) cost 15, [32, 60) cost 4·1 + 3
    expect = 1 - (32 * 15 + 28 * 7) / (60 * 15)
    assert decided_saving(fo, flops, 60, False) == pytest.approx(expect)
    assert step_cost(flops, 4, False) == 7.0


def test_dont_freeze_pe_and_all_stages():
    torch.manual_seed(0)
    model = create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                         all_stages=True)
    fo, opt, lr_fn = make(model, dont_freeze_pe=True)
    assert [u.name for u in fo.sched_units] == ['block1', 'block2', 'block3', 'block4']
    assert any(n.startswith('decoder.0.') for n in fo.sched_units[0].params)  # --all_stages: block1 feeds stage 0
    lrs = drive(model, fo, opt, 60, moving=[1, 2, 3], lr_fn=lr_fn)  # block1 (with its decoder) cannot change
    assert [d['unit'] for d in fo.policy.decisions] == ['block1'] and fo.num_frozen == 1
    assert model.num_frozen_blocks == 1 and not model.embed_frozen and model.active_stages() == [1, 2, 3]
    assert lrs[-1]['embed'] == lr_fn(59)  # the embedding is never frozen and follows the global schedule
    assert all(p.requires_grad for p in model.units()[0].params.values())


def test_no_decision_whose_freeze_falls_at_or_after_the_end():
    model = tiny_model()
    bounds = AdaptiveBounds(earliest=0.9, window=3, threshold=0.5, patience=1, tail=6)
    fo, opt, lr_fn = make(model, 60, 6, bounds)
    drive(model, fo, opt, 60, moving=[], lr_fn=lr_fn)
    # earliest step 54: decisions need step >= 48 and step + 6 < 60: only the evaluation at 48 or 51
    assert fo.policy.decisions and all(48 <= d['step'] <= 53 and d['freeze_step'] < 60 for d in fo.policy.decisions)


def test_no_decision_is_plain_lr_and_state_dict_roundtrip():
    model = tiny_model()
    fo, opt, lr_fn = make(model)
    lrs = drive(model, fo, opt, 14, moving=range(1, 5), lr_fn=lr_fn)
    for j in range(12):
        assert set(lrs[j].values()) == {lr_fn(j)}  # bit-identical to the global schedule before any decision
    state = fo.state_dict()
    assert state['policy_state']['tails'] == {'0': [12, 16]} and state['policy_state']['snapshot_step'] == 12
    torch.save(state, '/dev/null')  # plain tensors and containers only
    model2 = tiny_model()
    model2.load_state_dict(model.state_dict())
    fo2, opt2, _ = make(model2)
    fo2.load_state_dict(state, opt2)
    assert fo2.policy.tails == {0: [12, 16]} and fo2.policy.peak == fo.policy.peak and fo2.policy.below == fo.policy.below
    assert all(torch.equal(a, b) for i in fo.policy.snapshot for a, b in zip(fo.policy.snapshot[i], fo2.policy.snapshot[i]))


def test_output_signal_uses_the_probe():
    model = tiny_model()
    imgs = torch.randn(2, 3, 32, 32)
    calls = []

    def probe():
        calls.append(1)
        return model.unit_features(imgs)
    fo, opt, lr_fn = make(model, signal='output', probe=probe)
    drive(model, fo, opt, 30, moving=range(1, 5), lr_fn=lr_fn)
    # evaluations at 6, 9, ..., 27; the embedding's output cannot change (its weights do not), the blocks' can
    assert len(calls) == 8
    assert [d['unit'] for d in fo.policy.decisions] == ['embed']
    assert fo.policy.plasticity['block1'] > 0.5


# ---- through the CLI ---------------------------------------------------------------------------------------------

# 32 train images, batch 4: 8 steps/epoch, T = 24, W = 8; evaluations every 3 steps from 8 (8, 11, 14, 17, 20, 23):
# the epoch-1 checkpoint (step 16) lies inside a window, so resuming needs the saved snapshot. Threshold 0.845 and
# The CLI tests check the mechanism (evaluation grid, patience, spacing, earliest step, resume), not the signal's
# meaning (the drive() tests above do that, numbers against formulas): threshold 1 makes every measured evaluation
# stalled, so the decisions fall exactly where the bounds put them. 8 steps/epoch, T = 24, W = 8, window 3:
# snapshot at 8, first measurement at 11; one decision per evaluation (spacing = one window): embed at 11,
# block1 at 14, block2 at 17, block3 at 20 (freezing 3 steps later). The epoch-1 checkpoint (step 16) holds block1
# decided but not yet frozen and block2/block3 still measured.
ADAPTIVE = ['--freeze_policy', 'adaptive', '--freeze_window', '3', '--freeze_tail', '3', '--freeze_threshold', '1',
            '--freeze_patience', '1', '--freeze_earliest', '0.3']
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
def test_cli_adaptive_resume_is_bit_exact(demo_root, tmp_path, run_pretrain, signal='weight'):
    ref, res = tmp_path / 'ref', tmp_path / 'res'
    args = [*TINY, *ADAPTIVE, '--freeze_signal', signal, '--epochs', '3', '--data_path', demo_root]
    r = run_pretrain([*args, '--output_dir', ref, '--save_freq', '1'])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = re.findall(r'FreezeOut adaptive: step (\d+) \(epoch \d\): (\w+) stalled .* freezes at step (\d+)',
                       r.stdout)
    # threshold 1: a unit stalls at the first evaluation whose rate is below its peak; which evaluation that is
    # depends on the numerics (11 or 14), the rest does not: one decision per evaluation (window = spacing = 3),
    # units in depth order, each freezing a tail of 3 steps later, until the last one fits before step 24
    first = int(lines[0][0]) if lines else -1
    assert first in (11, 14), r.stdout[-3000:]
    units = ['embed', 'block1', 'block2', 'block3']
    assert lines == [(str(s), u, str(s + 3)) for s, u in zip(range(first, 21, 3), units)], r.stdout[-3000:]
    ck1 = torch.load(ref / 'checkpoint-1.pth', map_location='cpu', weights_only=True)
    fo1 = ck1['freezeout']['policy_state']  # the adaptive policy's own state (policy seam)
    assert ck1['step'] == 16 and fo1['snapshot_step'] == 14 and max(fo1['peak']) > 0
    # a decided unit whose freeze is after the checkpoint, and undecided ones with their snapshot (from step 14)
    assert fo1['tails'] and fo1['snapshot'] and not set(fo1['tails']) & set(fo1['snapshot'])
    assert 0 < json.loads((ref / 'log.txt').read_text().splitlines()[-1])['decided_saving_so_far'] < 1
    recs = _records(ref)
    assert sum(len(x['freeze_decisions']) for x in recs) == len(lines)
    assert [(str(d['step']), d['unit'], str(d['freeze_step'])) for x in recs for d in x['freeze_decisions']] == lines
    assert recs[-1]['frozen_units'] >= 1
    # resume from the epoch-1 checkpoint: the rest of the run is bit-identical
    res.mkdir()
    shutil.copy(ref / 'checkpoint-1.pth', res / 'checkpoint-last.pth')
    (res / 'log.txt').write_text(''.join((ref / 'log.txt').read_text().splitlines(keepends=True)[:2]))
    r2 = run_pretrain([*args, '--output_dir', res])
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert 'Resumed from' in r2.stdout
    a = torch.load(ref / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    b = torch.load(res / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    for k in ('model', 'optimizer', 'step', 'freezeout', 'rng'):
        _same(a[k], b[k], k)
    assert _records(ref) == _records(res)


def _run_main(argv, monkeypatch, capsys):
    """run_pretrain's command-line entry point (run_main), in-process: returns (exit code, stdout, stderr)."""
    import run_pretrain
    monkeypatch.setattr(sys, 'argv', ['run_pretrain.py', *map(str, argv)])
    code = 0
    try:
        run_pretrain.run_main(run_pretrain.main, run_pretrain.get_args_parser())
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip()


def test_cli_plan_only(demo_root, tmp_path, monkeypatch, capsys):
    code, out, err = _run_main([*TINY, '--epochs', '3', '--data_path', demo_root, '--output_dir', '',
                                '--freeze_policy', 'adaptive', '--freeze_window', '3', '--plan_only'],
                               monkeypatch, capsys)
    assert code == 0, err
    assert ('FreezeOut policy: adaptive, signal=coherence (plasticity = update coherence = net displacement / path '
            'of the weights over the window)') in out
    assert 'spacing: one decision per evaluation, the next at least 3 steps later' in out
    # W = 8, window 3, patience 2: first decision at 14 >= earliest 12 - tail 3; it freezes at 17
    assert 'first possible freeze: step 17 (epoch 2.12)' in out
    assert 'earliest freeze: 0.5 of training = step 12 (epoch 1.50)' in out
    assert 'window: every 3 steps (0.38 epochs) from step 8: 6 evaluations' in out
    assert 'threshold: plasticity < 0.5 for 2 consecutive evaluations' in out
    assert 'tail: LR x 1/2(1 + cos) over 3 steps' in out and 'block4 never freezes' in out
    assert re.search(r'FLOP model: at most \d+\.\d% saving', out)


def test_cli_demo_summary_of_an_adaptive_run(demo_root, tmp_path, monkeypatch, capsys):
    """--demo --freeze_policy adaptive: the end summary reports the decisions (it once read a schedule that the
    adaptive policy does not have, and crashed after training)."""
    code, out, err = _run_main(['--demo', *TINY, *ADAPTIVE, '--epochs', '3', '--data_path', demo_root,
                                '--knn_eval_freq', '0', '--vis_freq', '0', '--output_dir', tmp_path / 'out'],
                               monkeypatch, capsys)
    assert code == 0, err
    summary = out[out.index('ViTFreeze demo: summary'):]
    m = re.search(r'FreezeOut: adaptive policy; frozen by the end: (\d+) units; decided saving (\d+\.\d)% \(FLOP '
                  r'model\), measured -?\d+\.\d%', summary)
    assert m, summary
    last = json.loads((tmp_path / 'out' / 'log.txt').read_text().splitlines()[-1])
    assert int(m.group(1)) == last['frozen_units'] >= 1
    assert m.group(2) == f"{100 * last['decided_saving_so_far']:.1f}"


@pytest.mark.parametrize('flags,msg', [
    (['--t_0', '0.8'], 'error: --t_0 shape the scheduled FreezeOut; with --freeze_policy adaptive there is no t_i: '
                       'drop it or use --freeze_policy schedule'),
    (['--how_scale', 'cubic', '--not_scale_lr'], 'error: --how_scale/--not_scale_lr shape the scheduled FreezeOut; '
     'with --freeze_policy adaptive there is no t_i: drop them or use --freeze_policy schedule'),
    (['--freeze_threshold', '0'], 'error: --freeze_threshold 0.0: must be in (0, 1]'),
    (['--freeze_earliest', '1'], 'error: --freeze_earliest 1.0: must be in [0, 1)'),
    (['--freeze_window', '0'], 'error: --freeze_window 0: must be >= 1'),
    (['--freeze_patience', '0'], 'error: --freeze_patience 0: must be >= 1'),
    (['--freeze_tail', '-1'], 'error: --freeze_tail -1: must be >= 0'),
])
def test_cli_flag_errors(flags, msg, demo_root, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / 'o'
    code, out, err = _run_main([*TINY, '--epochs', '3', '--data_path', demo_root, '--output_dir', out_dir,
                                '--freeze_policy', 'adaptive', *flags], monkeypatch, capsys)
    assert (code, err) == (2, msg)
    assert not out_dir.exists()


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_ranks_take_identical_decisions(demo_root, tmp_path):
    out, dumps = tmp_path / 'out', tmp_path / 'dumps'
    # per rank 16 images, batch 4, accum 2: 2 steps/epoch, T = 6 with 3 epochs; coherence over windows of 2 steps
    # (below 1 unless two updates are exactly collinear, so threshold 1 decides at every evaluation)
    args = [*TINY, '--accum_iter', '2', '--epochs', '3', '--data_path', demo_root, '--output_dir', out,
            '--freeze_policy', 'adaptive', '--freeze_window', '2', '--freeze_tail', '1', '--freeze_threshold', '1',
            '--freeze_patience', '1', '--freeze_earliest', '0']
    env = reliability_env(MKL_NUM_THREADS='1', VITFREEZE_TEST_DUMP_RANK_WEIGHTS=str(dumps))  # tests/hooks
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                        f'--master_port={_free_port()}', str(REPO / 'run_pretrain.py'), *map(str, args)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert 'FreezeOut adaptive: step' in r.stdout
    for epoch in range(3):
        d = [json.loads((dumps / f'rank{k}-epoch{epoch}.json').read_text()) for k in (0, 1)]
        assert d[0]['freezeout'] == d[1]['freezeout'], epoch
        assert d[0]['model'] == d[1]['model'] and d[0]['optimizer'] == d[1]['optimizer'], epoch
    assert d[0]['freezeout']['policy_state']['decisions'] and d[0]['freezeout']['num_frozen'] >= 1


# ---- the coherence signal (default): scale-free, so the LR decay is not read as convergence -------------------


def _drive_pattern(model, fo, opt, steps, pattern):
    """``pattern(unit, j) -> (direction sign, scale)``: unit i moves by sign·scale·1e-5 along its fixed direction."""
    gen = torch.Generator().manual_seed(1)
    dirs = {id(p): torch.randn(p.shape, generator=gen) for p in model.parameters()}
    for j in range(steps):
        fo.step(opt, j)
        with torch.no_grad():
            for i in range(fo.num_frozen, len(fo.sched_units)):
                sign, scale = pattern(i, j)
                for p in fo.sched_units[i].params.values():
                    p.add_(dirs[id(p)], alpha=sign * scale * 1e-5)


def _coherence(model, total=60, warm=6, **bounds):
    lr_fn = lambda j: warmup_cosine(j, 1e-3, 1e-6, warm, total)  # noqa: E731
    b = dict(earliest=0.0, window=8, threshold=0.5, patience=2, tail=4, spacing=0)
    b.update(bounds)
    fo = AdaptiveFreezeOut(model, total, warm, lr_fn, AdaptiveBounds(**b), signal='coherence')
    return fo, torch.optim.AdamW(fo.param_groups(0.05), lr=1e-3), lr_fn


def test_coherence_ignores_the_lr_decay_and_catches_jitter():
    """Units moving along one direction with a step that decays like the cosine stay coherent (plasticity 1);
    under the weight signal the same drift reads as a stall. A unit whose steps alternate in sign (jitter around a
    minimum: it goes nowhere) has coherence ~0 and is the one decided."""
    model = tiny_model()
    fo, opt, lr_fn = _coherence(model)
    _drive_pattern(model, fo, opt, 60, lambda i, j: ((-1) ** j, 1.0) if i == 0 else (1.0, lr_fn(j) / 1e-3 + 1e-3))
    assert [d['unit'] for d in fo.policy.decisions] == ['embed']
    assert fo.policy.decisions[0]['plasticity'] < 0.2
    assert all(v > 0.99 for v in fo.policy.plasticity.values()), fo.policy.plasticity
    # the same decaying drift under the LR-dependent weight signal: everything stalls
    model = tiny_model()
    lr2 = lambda j: warmup_cosine(j, 1e-3, 1e-6, 6, 60)  # noqa: E731
    fo_w = AdaptiveFreezeOut(model, 60, 6, lr2, AdaptiveBounds(earliest=0.0, window=8, threshold=0.5, patience=2,
                                                               tail=4), signal='weight')
    opt_w = torch.optim.AdamW(fo_w.param_groups(0.05), lr=1e-3)
    _drive_pattern(model, fo_w, opt_w, 60, lambda i, j: (1.0, lr2(j) / 1e-3 + 1e-3))
    assert len(fo_w.policy.decisions) >= 2


def test_coherence_value_is_net_over_path():
    """A unit that moves +1, +1, -1 per segment (stride 1 with window 3... here window 8 -> stride 1): coherence =
    |sum| / sum |.| exactly, per the definition."""
    model = tiny_model()
    fo, opt, _ = _coherence(model, window=8, patience=99)
    pattern = [1, 1, 1, -1, 1, 1, -1, 1]  # net 4, path 8 over each window after W = 6
    _drive_pattern(model, fo, opt, 6 + 8 + 8 + 1, lambda i, j: (pattern[(j - 6) % 8] if j >= 6 else 1.0, 1.0))
    assert fo.policy.stride == 1
    assert all(abs(v - 0.5) < 1e-4 for v in fo.policy.plasticity.values()), fo.policy.plasticity


def test_spacing_decides_one_unit_at_a_time():
    model = tiny_model()
    fo, opt, _ = _coherence(model, window=4, patience=1, spacing=8, tail=2)
    _drive_pattern(model, fo, opt, 60, lambda i, j: ((-1) ** j, 1.0))  # every unit jitters: all stalled
    steps = [d['step'] for d in fo.policy.decisions]
    assert len(steps) == 4 and all(b - a >= 8 for a, b in zip(steps, steps[1:])), steps
    assert [d['unit'] for d in fo.policy.decisions] == ['embed', 'block1', 'block2', 'block3']


def test_coherence_state_resumes_exactly():
    model = tiny_model()
    fo, opt, _ = _coherence(model, patience=99)
    _drive_pattern(model, fo, opt, 17, lambda i, j: ((-1) ** (j // 3), 1.0))  # mid-window: prev and path are live
    state = fo.state_dict()
    assert state['policy_state']['path'] and state['policy_state']['prev']
    model2 = tiny_model()
    model2.load_state_dict(model.state_dict())
    fo2, opt2, _ = _coherence(model2, patience=99)
    fo2.load_state_dict(state, opt2)
    for f, m, o in ((fo, model, opt), (fo2, model2, opt2)):
        _drive_pattern(m, f, o, 0, lambda i, j: (1.0, 1.0))
    # continue both for the rest of the run from step 17
    for f, m, o in ((fo, model, opt), (fo2, model2, opt2)):
        gen = torch.Generator().manual_seed(5)
        dirs = {n: torch.randn(p.shape, generator=gen) for n, p in m.named_parameters()}
        for j in range(17, 40):
            f.step(o, j)
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if p.requires_grad:
                        p.add_(dirs[n], alpha=1e-5 * (-1) ** (j // 3))
    assert fo.policy.plasticity == fo2.policy.plasticity and fo.policy.below == fo2.policy.below
