"""Smoke tests of the benchmark scripts and the schedule plot: they run, write the JSON keys, and the reference-style
HOG written in the bench agrees with ours. Minimal sizes (32 px, patch 4, depth 4, 2 steps); no timed asserts."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ['--model', 'MIM_vit_tiny_patch16', '--input_size', '32', '--patch_size', '4', '--depth', '4',
        '--embed_dim', '48', '--num_heads', '3', '--batch_size', '2', '--threads', '1', '--steps', '2']


def _run(args, timeout=300):
    p = subprocess.run([sys.executable] + [str(a) for a in args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f'{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    return p


def test_pretrain_step_with_hog_reference(tmp_path):
    out = tmp_path / 'step.json'
    p = _run(['-m', 'bench.pretrain_step', *TINY, '--warmup', '1', '--compare_hog_reference', '--json', out])
    r = json.loads(out.read_text())
    for key in ('img_per_s', 'step_ms', 'targets_ms', 'peak_mem_mb', 'data_ms', 'encoder_ms', 'decoders_ms',
                'backward_ms', 'optim_ms', 'hog_ref_ms', 'hog_ours_ms', 'hog_speedup', 'hog_max_abs_diff'):
        assert key in r, key
    assert r['img_per_s'] > 0 and r['step_ms'] > 0 and r['peak_mem_mb'] > 0
    assert r['hog_max_abs_diff'] < 1e-5           # the reference design and ours compute the same targets
    assert r['hog_hypot_max_abs_diff'] < 1e-5
    assert r['decomposition_abs_err'] == 0.0      # the phased step is LocalMIM.forward
    assert len(r['step_all_ms']) == 2
    assert 'speed-up' in p.stdout


@pytest.mark.parametrize('vs', ['full_decode', pytest.param('compile', marks=pytest.mark.slow)])
def test_step_ab(tmp_path, vs):
    """Both sides train in one process; the full decode counts more FLOPs (the masked-only path skips the visible
    cells' queries, MLPs and heads); the compiled side (dynamo's eager backend: no C++ build in a unit test) reports
    its compile."""
    out = tmp_path / 'ab.json'
    p = _run(['-m', 'bench.step_ab', *TINY, '--warmup', '0', '--decoder_embed_dim', '32', '--vs', vs,
              '--compile_backend', 'eager', '--json', out])
    r = json.loads(out.read_text())
    assert len(r['a_steps_s']) == len(r['b_steps_s']) == 2 and r['speedup'] > 0
    if vs == 'full_decode':
        assert r['flop_ratio'] > 1.0 and 'masked-only' in p.stdout and 'FLOP ratio' in p.stdout
    else:
        assert r['compile_first_step_s'] > 0 and 'compiled (eager)' in p.stdout


def test_reference_style_hog_matches_ours_with_bias():
    import torch
    import models_mim
    from bench import pretrain_step as ps
    torch.manual_seed(0)
    m = models_mim.create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, depth=4, embed_dim=48,
                                num_heads=3, hog_bias=True)
    x = torch.randn(2, 3, 32, 32)
    stages = list(range(4))
    ref = ps.reference_hog_for(m)(x, stages)
    ours = m.hog(x, stages)
    assert ps.hog_max_abs_diff(ours, ref) < 1e-5


def test_freezeout_saving_sweep(tmp_path):
    out = tmp_path / 'fo.json'
    p = _run(['-m', 'bench.freezeout_saving', *TINY, '--warmup', '0', '--rounds', '1', '--epochs', '4',
              '--warmup_epochs', '1', '--steps_per_epoch', '5', '--schedules', 'cubic:0.8,linear:0.5',
              '--json', out])
    r = json.loads(out.read_text())
    for key in ('single', 'summary', 'states', 'flop_rel', 'unit_names'):
        assert key in r, key
    assert r['states'][0] == 0 and len(r['states']) >= 2
    assert r['unit_names'][0] == 'embed' and len(r['unit_names']) == 5
    for n in r['states']:
        s = r['single'][str(n)]
        assert s['step_ms'] > 0 and s['activation_bytes'] > 0 and 'phase_ms' in s
    # freezing really drops what autograd keeps and what the optimizer holds
    last = r['single'][str(r['states'][-1])]
    assert last['activation_bytes'] < r['single']['0']['activation_bytes']
    assert last['trainable_state_bytes'] < r['single']['0']['trainable_state_bytes']
    assert [row['how_scale'] for row in r['summary']] == ['cubic', 'linear']
    for row in r['summary']:
        assert {'measured_saving', 'flop_saving', 'ratio', 'steps_in_state'} <= set(row)
        assert sum(row['steps_in_state']) == 20
        assert 0 < row['flop_saving'] < 1
    assert 'FLOP model' in p.stdout


def test_scaling_smoke(tmp_path):
    out = tmp_path / 'scaling.json'
    _run(['-m', 'bench.scaling', '--models', 'MIM_vit_tiny_patch16', '--batches', '1,2', '--sizes', '32,64',
          '--input_size', '64', '--rounds', '1', '--steps', '1', '--threads', '1', '--json', out])
    r = json.loads(out.read_text())
    rows = r['batch_sweep']['MIM_vit_tiny_patch16']
    assert [x['batch_size'] for x in rows] == [1, 2]
    assert all(x['step_ms'] > 0 and x['activation_mb'] > 0 and x['gflop_fwd_per_img'] > 0 for x in rows)
    assert [x['input_size'] for x in r['input_sweep']['MIM_vit_tiny_patch16']] == [32, 64]
    assert 'MIM_vit_tiny_patch16' in r['flags']
