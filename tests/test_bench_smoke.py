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


def test_supply_demand_prediction_is_the_max_formula():
    """bench.supply_demand on injected numbers: a step in state k takes max(t_k, B / supply); the plan's saving
    integrates that over the steps per state; infinite supply is bench.freezeout_saving's compute saving."""
    from types import SimpleNamespace
    from bench import freezeout_saving as fs
    from bench import supply_demand as sd
    step_ms, steps, b = {0: 100.0, 1: 80.0, 2: 50.0}, [4, 3, 3], 10
    free = sd.predict(step_ms, steps, b, math.inf)
    assert free['saving'] == pytest.approx(1 - (4 * 100 + 3 * 80 + 3 * 50) / (10 * 100))
    assert free['bound_from_state'] is None and free['data_bound_steps'] == 0
    plan = SimpleNamespace(steps_in_state=lambda: steps, total_steps=10)
    assert free['saving'] == pytest.approx(fs.measured_saving(plan, step_ms))
    mid = sd.predict(step_ms, steps, b, 160.0)  # 62.5 ms per batch: only state 2 (50 ms) waits for data
    assert mid['supply_ms_per_batch'] == pytest.approx(62.5)
    assert mid['saving'] == pytest.approx(1 - (400 + 240 + 3 * 62.5) / 1000)
    assert mid['bound_from_state'] == 2 and mid['data_bound_steps'] == pytest.approx(0.3)
    slow = sd.predict(step_ms, steps, b, 50.0)  # 200 ms per batch: data-bound throughout, nothing saved
    assert slow['saving'] == pytest.approx(0.0) and slow['bound_from_state'] == 0
    with pytest.raises(ValueError, match='must be > 0'):
        sd.predict(step_ms, steps, b, 0.0)
    res = {'demand_step_ms': step_ms, 'steps_in_state': steps, 'batch_size': b, 'flop_saving': 0.25,
           'supply': {'pil': {'img_per_s': 20.0, 'img_per_s_per_core': 20.0, 'cores': 1},
                      'dali_gpu': {'img_per_s': 1000.0, 'img_per_s_per_core': 125.0, 'cores': 8, 'per_gpu': True}}}
    rows = sd.table(res, cores_per_gpu=8, host_cores=16)
    assert [r['gpus'] for r in rows] == [1, 2, 4, 8] and [r['cores_per_gpu'] for r in rows] == [8, 8, 4, 2]
    assert [r['backends']['pil']['supply_img_s'] for r in rows] == [160.0, 160.0, 80.0, 40.0]
    assert [r['backends']['pil']['saving'] for r in rows] == pytest.approx([mid['saving']] * 2 + [0.0, 0.0])
    assert all(r['backends']['dali_gpu']['supply_img_s'] == 1000.0 for r in rows)  # the GPU decodes: not per core
    assert all(r['backends']['dali_gpu']['saving'] == pytest.approx(free['saving']) for r in rows)
    assert all(r['compute_saving'] == pytest.approx(free['saving']) and r['flop_saving'] == 0.25 for r in rows)


def test_supply_demand_smoke(tmp_path, capsys):
    """The tiny config end to end in-process: every requested backend measured, one demand per freeze state of the
    plan, the 1/2/4/8-GPU table is the formula on those numbers; --from_json re-predicts for other cores."""
    from bench import supply_demand as sd
    backends = ['pil', 'pil_prepared']
    try:
        import nvidia.dali  # noqa: F401
        backends.append('dali_cpu')
    except ImportError:
        pass
    out, fig = tmp_path / 'sd.json', tmp_path / 'sd.png'
    tiny = TINY[:TINY.index('--steps')]  # this bench's --steps is per freeze state
    res = sd.main([*tiny, '--steps', '1', '--warmup', '0', '--rounds', '1', '--epochs', '2', '--warmup_epochs', '0',
                   '--steps_per_epoch', '4', '--images', '6', '--supply_batches', '2', '--max_side', '64',
                   '--dir', str(tmp_path / 'img'), '--backends', ','.join(backends), '--cores_per_gpu', '4',
                   '--host_cores', '8', '--json', str(out), '--out', str(fig)])
    assert list(res['supply']) == backends and all(s['img_per_s'] > 0 for s in res['supply'].values())
    steps = res['steps_in_state']
    assert sum(steps) == 8 and {k for k, n in enumerate(steps) if n} <= set(res['demand_step_ms'])
    assert (tmp_path / 'img' / 'prepared-64' / 'c0').is_dir()  # pil_prepared read tools/prepare_dataset's copy
    rows = res['table']
    assert [r['gpus'] for r in rows] == [1, 2, 4, 8] and [r['cores_per_gpu'] for r in rows] == [4, 4, 2, 1]
    for r in rows:
        assert list(r['backends']) == backends
        for name, cell in r['backends'].items():
            per_core = res['supply'][name]['img_per_s_per_core']
            assert cell['supply_img_s'] == pytest.approx(per_core * r['cores_per_gpu'])
            assert cell['saving'] == pytest.approx(
                sd.predict(res['demand_step_ms'], steps, 2, cell['supply_img_s'])['saving'])
    printed = capsys.readouterr().out
    assert 'predicted wall saving of the plan' in printed and 'GPUs cores/GPU' in printed
    assert fig.stat().st_size > 0
    again = sd.main(['--from_json', str(out), '--cores_per_gpu', '2'])
    assert [r['cores_per_gpu'] for r in again['table']] == [2] * 4
    assert again['table'][0]['backends']['pil']['supply_img_s'] == pytest.approx(
        res['supply']['pil']['img_per_s_per_core'] * 2)


def test_e2e_variants_parse_and_print(capsys):
    from bench import freezeout_saving as fs
    assert fs.parse_variants(None) == fs.DEFAULT_VARIANTS
    assert fs.parse_variants('plain:--t_0 1; cache:--t_0 0.8 --prefix_cache {run}/pc') == [
        ('plain', ['--t_0', '1']), ('cache', ['--t_0', '0.8', '--prefix_cache', '{run}/pc'])]
    for bad in ('plain', 'plain:--t_0 1', 'a:x;a:y', 'no name:--t_0 1;b:x'):
        with pytest.raises(SystemExit, match='^error: --e2e_variants'):
            fs.parse_variants(bad)
    e = {'command': 'run_pretrain.py --demo', 'baseline': 'plain', 'repeats': 2, 'variants': {
        'plain': dict(train_loop_s=100.0, measured_saving=0.0, measured_saving_compute=0.0,
                      measured_saving_process_cpu=0.0, flop_saving=0.0),
        'cache': dict(train_loop_s=80.0, measured_saving=0.2, measured_saving_compute=0.25,
                      measured_saving_process_cpu=0.1, flop_saving=0.16)}}
    fs.print_e2e(e)
    out = capsys.readouterr().out.splitlines()
    assert out[1] == 'end to end (run_pretrain.py --demo), 2 run(s) per variant, interleaved; savings vs plain:'
    assert out[-1].split() == ['cache', '80.0', '20.0%', '25.0%', '10.0%', '16.0%', '1.25']
