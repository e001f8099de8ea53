"""run_pretrain.py end to end, as a subprocess on the tiny demo ImageFolder: outputs, resume, bit-exactness of
--t_0 1 and of interrupt + resume mid-freeze, weights-only checkpoints, the seed command lines, --demo overrides,
and one-line errors for bad input.

All runs of this module are started from one module fixture, a few at a time, so they share the 2 CPU cores.
"""
import glob
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_PRETRAIN_FLAGS

def _log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _numbers(rec):
    """The deterministic part of a log record: drops wall-clock timings (and the data-wait share), throughput,
    memory and the "saving so far" figures (documented as covering this process's epochs only, so a resumed
    process reports its own)."""
    return {k: v for k, v in rec.items() if not any(w in k for w in ('time', 'img_per_s', 'mem', 'so_far', 'wait'))}


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _ok(res):
    assert res.returncode == 0, f'exit {res.returncode}\nSTDOUT:\n{res.stdout[-3000:]}\nSTDERR:\n{res.stderr[-3000:]}'
    return res


@pytest.fixture(scope='module')
def runs(demo_root, run_pretrain, tmp_path_factory):
    """Every run_pretrain.py invocation of this module, in two waves (the second resumes from the first)."""
    tmp = tmp_path_factory.mktemp('cli')
    base = [*TINY_PRETRAIN_FLAGS, '--model', 'MIM_vit_tiny_patch16', '--data_path', demo_root]
    d = {k: tmp / k for k in ('plain', 't1', 't1_fo', 'fo', 'resumed_plain', 'resumed_fo', 'fo_vit', 'resumed_fo_vit',
                              'demo', 'seed_accum')}
    demo_cache = tmp / 'demo_cache'
    fo_flags = ['--t_0', '0.3', '--how_scale', 'linear', '--save_freq', '1', '--freeze_schedule', 'freezeout']
    # the default (vitfreeze) schedule, with a stage-loss curriculum riding along
    vit_flags = ['--t_0', '0.3', '--how_scale', 'linear', '--save_freq', '1', '--stage_weights', 'equal',
                 '--stage_weights_end', '4321']

    wave1 = {
        'plain': base + ['--epochs', 2, '--output_dir', d['plain'], '--log_dir', d['plain'] / 'tb'],
        't1': base + ['--epochs', 2, '--output_dir', d['t1'], '--log_dir', d['t1'] / 'tb', '--t_0', 1,
                      '--how_scale', 'cubic'],
        't1_fo': base + ['--epochs', 2, '--output_dir', d['t1_fo'], '--t_0', 1, '--how_scale', 'cubic',
                         '--freeze_schedule', 'freezeout'],
        'fo': base + ['--epochs', 3, '--output_dir', d['fo'], *fo_flags],
        'fo_vit': base + ['--epochs', 3, '--output_dir', d['fo_vit'], '--log_dir', d['fo_vit'] / 'tb', *vit_flags],
        'demo': ['--demo', '--epochs', 1, '--output_dir', d['demo'], '--log_dir', d['demo'] / 'tb',
                 '--knn_eval_freq', 0, '--num_workers', 0, '--warmup_epochs', 0, '--t_0', 0.3],
        # the seed's torch.distributed.launch lines: --local-rank=0 and --world_size 1 on the command line
        'seed_accum': base + ['--epochs', 1, '--world_size', 1, '--accum_iter', 2, '--stage_weights', '1overk',
                              '--output_dir', d['seed_accum'], '--local-rank=0'],
    }
    envs = [{'VITFREEZE_DEMO_DIR': str(demo_cache)} if k == 'demo' else None for k in wave1]
    res = dict(zip(wave1, run_pretrain.many(list(wave1.values()), env=envs, timeout=600, max_parallel=3)))

    # wave 2 ------------------------------------------------------------------------------------------------------
    # (1) plain run continued to 3 epochs in a copy of its output dir
    if res['plain'].returncode == 0:
        shutil.copytree(d['plain'], d['resumed_plain'], ignore=shutil.ignore_patterns('tb'))
    # (2) the FreezeOut runs "killed during epoch 2": their output dirs as they were after epoch 1's checkpoint
    for full, cut in (('fo', 'resumed_fo'), ('fo_vit', 'resumed_fo_vit')):
        if res[full].returncode == 0:
            d[cut].mkdir()
            shutil.copy(d[full] / 'checkpoint-1.pth', d[cut] / 'checkpoint-1.pth')
            shutil.copy(d[full] / 'checkpoint-1.pth', d[cut] / 'checkpoint-last.pth')
            shutil.copy(d[full] / 'checkpoint-0.pth', d[cut] / 'checkpoint-0.pth')
            with open(d[full] / 'log.txt') as f, open(d[cut] / 'log.txt', 'w') as g:
                g.writelines(f.readlines()[:2])
    plan = base + ['--epochs', 2, '--plan_only', '--output_dir', '']
    wave2 = {
        'resumed_plain': base + ['--epochs', 3, '--output_dir', d['resumed_plain']],
        'resumed_fo': base + ['--epochs', 3, '--output_dir', d['resumed_fo'], *fo_flags],
        'resumed_fo_vit': base + ['--epochs', 3, '--output_dir', d['resumed_fo_vit'], *vit_flags],
        'seed_all_stages': [*plan, '--patch_size', 8, '--not_scale_lr', '--non_layerwise_lr', '--all_stages',
                            '--t_0', '0.8'],
        'seed_dont_freeze_pe': plan + ['--dont_freeze_pe', '--how_scale', 'cubic'],
        'err_model': base + ['--model', 'mae_vit_large_patch16', '--epochs', 1, '--output_dir', ''],
        'err_data_path': [a for a in base if a != demo_root and a != '--data_path'] + [
            '--epochs', 1, '--output_dir', ''],
    }
    if res['plain'].returncode != 0:
        wave2.pop('resumed_plain')
    if res['fo'].returncode != 0:
        wave2.pop('resumed_fo')
    if res['fo_vit'].returncode != 0:
        wave2.pop('resumed_fo_vit')
    res.update(zip(wave2, run_pretrain.many(list(wave2.values()), timeout=600, max_parallel=4)))
    return {'res': res, 'dir': d, 'demo_cache': demo_cache, 'tmp': tmp}


# ---- outputs of a plain 2-epoch run ------------------------------------------------------------------------------

def test_two_epochs_write_checkpoints_log_and_tensorboard(runs):
    res, out = runs['res']['plain'], runs['dir']['plain']
    _ok(res)
    for name in ('checkpoint-0.pth', 'checkpoint-1.pth', 'checkpoint-last.pth', 'log.txt'):
        assert (out / name).is_file(), name
    assert not list(out.glob('.*tmp*')), 'temporary checkpoint files left behind'
    log = _log(out / 'log.txt')
    assert [r['epoch'] for r in log] == [0, 1]
    for r in log:
        assert {'train_loss', 'train_lr', 'epoch'} <= set(r)
        assert isinstance(r['train_loss'], float) and 0 < r['train_loss'] < 100
        assert 0 < r['train_lr'] <= 1e-3 * 8 / 256
    events = glob.glob(str(out / 'tb' / 'events.out.tfevents.*'))
    assert events, 'no TensorBoard events under --log_dir'
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / 'tb'), size_guidance={'scalars': 0})
    acc.Reload()
    tags = set(acc.Tags()['scalars'])
    assert {'train_loss', 'lr'} <= tags, tags
    assert len(acc.Scalars('train_loss')) == 2 * 4  # one per optimizer step: 32 images / batch 8, 2 epochs
    # the effective batch and lr are printed
    assert 'effective batch size: 8' in res.stdout
    lr = float(re.search(r'actual lr: ([\d.e+-]+)', res.stdout).group(1))
    assert lr == pytest.approx(1e-3 * 8 / 256, rel=0.01)


def test_checkpoints_are_weights_only_with_plain_args(runs):
    out = runs['dir']['plain']
    for name in ('checkpoint-0.pth', 'checkpoint-1.pth', 'checkpoint-last.pth'):
        ck = _load(out / name)  # weights_only=True: no pickled classes
        assert {'model', 'optimizer', 'epoch', 'args', 'step'} <= set(ck)
        assert type(ck['args']) is dict
        assert all(v is None or isinstance(v, (bool, int, float, str, list)) for v in ck['args'].values())
        assert ck['args']['model'] == 'MIM_vit_tiny_patch16' and ck['args']['embed_dim'] == 64
    assert _load(out / 'checkpoint-0.pth')['epoch'] == 0
    last = _load(out / 'checkpoint-last.pth')
    assert last['epoch'] == 1 and last['step'] == 8
    one = _load(out / 'checkpoint-1.pth')
    for k, v in one['model'].items():
        assert torch.equal(v, last['model'][k]), k


def test_resume_continues_from_next_epoch(runs):
    res, out = runs['res']['resumed_plain'], runs['dir']['resumed_plain']
    _ok(res)
    assert 'from epoch 2' in res.stdout, res.stdout[-2000:]
    log = _log(out / 'log.txt')
    assert [r['epoch'] for r in log] == [0, 1, 2], 'only epoch 2 may be appended'
    before = _log(runs['dir']['plain'] / 'log.txt')
    assert log[:2] == before
    assert log[2]['step'] == 12
    assert (out / 'checkpoint-2.pth').is_file()
    ck = _load(out / 'checkpoint-last.pth')
    assert ck['epoch'] == 2 and ck['step'] == 12


# ---- bit-exactness --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('run', ['t1', 't1_fo'])
def test_t0_1_reproduces_plain_training_bit_exactly(runs, run):
    """--t_0 1 under the vitfreeze (default) and the freezeout schedule: the plain run, bit for bit."""
    _ok(runs['res'][run])
    plain, t1 = runs['dir']['plain'], runs['dir'][run]
    assert 'FreezeOut plan' in runs['res'][run].stdout
    assert f"schedule: {'freezeout' if run == 't1_fo' else 'vitfreeze'} (" in runs['res'][run].stdout
    lp, lt = _log(plain / 'log.txt'), _log(t1 / 'log.txt')
    assert [r['epoch'] for r in lt] == [0, 1]
    for a, b in zip(lp, lt):
        for k in ('train_loss', 'train_lr'):
            assert a[k] == b[k], (k, a[k], b[k])
        for k in a:
            if k.startswith('train_loss_s'):
                assert a[k] == b[k], k
        assert b['frozen_units'] == 0
    mp, mt = _load(plain / 'checkpoint-last.pth')['model'], _load(t1 / 'checkpoint-last.pth')['model']
    assert mp.keys() == mt.keys()
    diff = [k for k in mp if not torch.equal(mp[k], mt[k])]
    assert diff == [], f'tensors differ: {diff[:5]}'


def test_interrupt_and_resume_mid_freeze_is_bit_exact(runs):
    full_res, res = runs['res']['fo'], runs['res']['resumed_fo']
    _ok(full_res)
    _ok(res)
    full, resumed = runs['dir']['fo'], runs['dir']['resumed_fo']
    # the schedule really freezes across the interruption: T = 12, W = 4, t = .3 .475 .65 .825 1 -> steps 4 6 8 10
    ck1 = _load(full / 'checkpoint-1.pth')
    assert ck1['step'] == 8 and ck1['freezeout']['num_frozen'] == 2
    assert ck1['freezeout']['frozen_units'] == ['embed', 'block1']
    assert [r['frozen_units'] for r in _log(full / 'log.txt')] == [0, 2, 4]
    assert 'from epoch 2' in res.stdout
    a, b = _load(full / 'checkpoint-last.pth'), _load(resumed / 'checkpoint-last.pth')
    assert a['epoch'] == b['epoch'] == 2 and a['step'] == b['step'] == 12
    assert a['freezeout'] == b['freezeout'] and a['freezeout']['num_frozen'] == 4
    diff = [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])]
    assert diff == [], f'weights differ after resume: {diff[:5]}'
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
    ga, gb = a['optimizer']['param_groups'], b['optimizer']['param_groups']
    assert [(g['unit'], g['params'], g['lr']) for g in ga] == [(g['unit'], g['params'], g['lr']) for g in gb]
    assert {g['unit'] for g in ga} == {4}
    la, lb = _log(full / 'log.txt'), _log(resumed / 'log.txt')
    assert [r['epoch'] for r in lb] == [0, 1, 2]
    assert _numbers(la[2]) == _numbers(lb[2])
    assert la[2]['train_loss'] == lb[2]['train_loss']


def test_vitfreeze_resume_mid_freeze_is_bit_exact_and_logs_the_jump_and_curriculum(runs):
    """The default schedule with a stage-weight curriculum: T = 12, W = 4, linear t_0 0.3 -> freeze at 4 + 8 t_i =
    6.4, 7.8, 9.2, 10.6 -> steps 7, 8, 10, 11; resumed from epoch 1's checkpoint (1 unit frozen, 3 freezes ahead)
    it ends bit-identical. log.txt/TensorBoard show every unit at the global ramp before W and at a_i = lr/t_i at W;
    the stage weights of each epoch's last step are the curriculum formula over the active stages."""
    from freezeout import FreezeOutSchedule
    from models_mim import StageWeightSchedule
    full_res, res = runs['res']['fo_vit'], runs['res']['resumed_fo_vit']
    _ok(full_res)
    _ok(res)
    full, resumed = runs['dir']['fo_vit'], runs['dir']['resumed_fo_vit']
    lr = 1e-3 * 8 / 256
    sched = FreezeOutSchedule(['embed', 'block1', 'block2', 'block3', 'block4'], 12, 4, lr, 1e-6, 0.3, 'linear')
    assert [u.freeze_step for u in sched.units] == [7, 8, 10, 11, None]
    events = [int(s) for s in re.findall(r'FreezeOut: step (\d+) \(epoch', full_res.stdout)]
    assert events == [7, 8, 10, 11]
    ck1 = _load(full / 'checkpoint-1.pth')
    assert ck1['step'] == 8 and ck1['freezeout']['num_frozen'] == 1
    a, b = _load(full / 'checkpoint-last.pth'), _load(resumed / 'checkpoint-last.pth')
    assert a['step'] == b['step'] == 12 and a['freezeout'] == b['freezeout'] and a['freezeout']['num_frozen'] == 4
    assert [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])] == []
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))
                                          for i in sa for k in sa[i])
    la, lb = _log(full / 'log.txt'), _log(resumed / 'log.txt')
    assert _numbers(la[2]) == _numbers(lb[2])
    # the jump: epoch 0's record is at step W = 4, where every unit is at a_i = lr / t_i
    for name, u in zip(['embed', 'block1', 'block2', 'block3', 'block4'], sched.units):
        assert la[0]['unit_lr'][name] == pytest.approx(lr / u.t, rel=1e-12)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for name, u in zip(['embed', 'block2', 'block4'], [sched.units[0], sched.units[2], sched.units[4]]):
        acc = EventAccumulator(str(full / 'tb' / f'freezeout_unit_lr_{name}'), size_guidance={'scalars': 0})
        acc.Reload()
        by_x = {e.step: e.value for e in acc.Scalars('freezeout/unit_lr')}
        assert by_x[750] == pytest.approx(lr * 3 / 4, rel=1e-6)  # step W-1 (iteration 3 of epoch 0): the ramp
        assert by_x[1000] == pytest.approx(lr / u.t, rel=1e-6)  # step W: the jump
    # the curriculum equal -> 4321 over the active stages, at each epoch's last optimizer step
    curr = StageWeightSchedule('equal', '4321', 4)
    for rec in la:
        last = rec['step'] - 1
        assert rec['stage_weights'] == pytest.approx(curr.at(last / 12, rec['active_stages']), rel=1e-12)
    assert la[-1]['active_stages'] == [1, 3] and la[-1]['stage_weights'][0] == 0.0


# ---- seed command lines -----------------------------------------------------------------------------------------------

def test_seed_line_not_scale_non_layerwise_all_stages(runs):
    out = _ok(runs['res']['seed_all_stages']).stdout
    assert 'scale_lr=False, layerwise_lr=False' in out
    # all_stages at patch 8: every block feeds a stage
    assert 'stages (block, scale, cell px): [(0, 8.0, 1), (1, 4.0, 2), (2, 4.0, 2), (3, 2.0, 4)]' in out, out


def test_seed_line_dont_freeze_pe(runs):
    out = _ok(runs['res']['seed_dont_freeze_pe']).stdout
    assert 'backward still runs through frozen blocks' in out
    assert 'block1' in out and ' 0.5120 ' in out  # the first *block* freezes at s(t_0)
    assert 'FreezeOut plan: cubic t_0=0.8' in out  # t_0 defaults to 0.8 when only --how_scale is given


def test_seed_line_world_size_accum_stage_weights(runs):
    res, out = runs['res']['seed_accum'], runs['dir']['seed_accum']
    _ok(res)
    assert 'effective batch size: 16' in res.stdout and 'accumulate grad iterations: 2' in res.stdout
    assert 'stage weights [1.0, 0.5, 0.3333333333333333, 0.25]' in res.stdout  # ViTFreeze's 1/(k+1)
    log = _log(out / 'log.txt')
    assert len(log) == 1 and log[0]['step'] == 2  # 4 micro-batches / accum 2
    args = _load(out / 'checkpoint-last.pth')['args']
    assert args['stage_weights'] == '1overk' and args['local_rank'] == 0
    assert 'unrecognized arguments' not in res.stderr  # the torch.distributed.launch spelling --local-rank=0


def test_demo_defaults_yield_to_explicit_flags(runs):
    res, out = runs['res']['demo'], runs['dir']['demo']
    _ok(res)
    log = _log(out / 'log.txt')
    assert [r['epoch'] for r in log] == [0]
    assert (out / 'checkpoint-0.pth').is_file() and (out / 'checkpoint-last.pth').is_file()
    assert not (out / 'checkpoint-1.pth').exists()
    args = _load(out / 'checkpoint-last.pth')['args']
    assert args['epochs'] == 1 and args['knn_eval_freq'] == 0
    assert Path(args['output_dir']) == out
    # demo defaults for everything not given: the evaluators' demo encoder, FreezeOut on
    assert (args['model'], args['input_size'], args['embed_dim'], args['depth']) == ('MIM_vit_tiny_patch16', 32, 96, 6)
    import run_pretrain
    assert (run_pretrain.DEMO_DEFAULTS['how_scale'], run_pretrain.DEMO_DEFAULTS['t_0']) == ('cubic', 0.8)
    assert (args['how_scale'], args['t_0'], args['freeze_schedule'], args['decoder_embed_dim'], args['batch_size']) \
        == ('cubic', 0.3, 'vitfreeze', 64, 16)  # --t_0 0.3 given: it wins over the demo's 0.8
    assert 'FreezeOut plan: cubic t_0=0.3' in res.stdout and 'projected saving' in res.stdout
    summary = res.stdout[res.stdout.index('ViTFreeze demo: summary'):]
    for needle in ('FreezeOut: cubic t_0=0.3, --freeze_schedule vitfreeze', 'saving: planned', 'files: checkpoints',
                   f'{out}/checkpoint-*.pth', 'tensorboard --logdir', 'run_knn.py --demo --finetune',
                   'run_linprobe.py --demo', 'run_finetune.py --demo', '--plan_only', '--demo --t_0 1'):
        assert needle in summary, (needle, summary)
    assert 'k-NN top-1' not in summary  # --knn_eval_freq 0 given: no k-NN, none reported
    # T = 400 / 16 = 25, W = 0, t = (0.3 + 0.7 i / 6)^3 -> freeze steps ceil(25 t) = 1, 2, 4, 7, 12, 18: printed as
    # they happen
    assert re.findall(r'FreezeOut: step (\d+) \(epoch 0\)', res.stdout) == ['1', '2', '4', '7', '12', '18']
    assert 'frozen by the end: 6 of 7 units' in summary and '  block5   frozen at step 18 (epoch 0.72)' in summary
    assert Path(args['data_path']) == runs['demo_cache']
    assert (runs['demo_cache'] / 'train').is_dir() and (runs['demo_cache'] / 'val').is_dir()
    assert glob.glob(str(out / 'tb' / 'events.out.tfevents.*'))


def test_demo_summary_reports_the_knn_lift(tmp_path):
    import argparse
    import run_pretrain
    (tmp_path / 'val' / 'a').mkdir(parents=True)
    (tmp_path / 'val' / 'b').mkdir()
    with open(tmp_path / 'log.txt', 'w') as f:
        f.write(json.dumps({'epoch': 0, 'knn_init_k20_top1': 48.0, 'knn_k20_top1': 50.0}) + '\n')
        f.write(json.dumps({'epoch': 1}) + '\n')
        f.write(json.dumps({'epoch': 2, 'knn_k20_top1': 75.0}) + '\n')
    args = argparse.Namespace(output_dir=str(tmp_path), data_path=str(tmp_path), knn_data_path=None, log_dir=None,
                              dont_freeze_pe=False)
    text = run_pretrain.demo_summary(args, None, None, 12)
    assert 'k-NN top-1 (k=20, val split): random init 48.0% -> pre-trained 75.0% (chance 50%)' in text
    assert 'FreezeOut: off' in text and 'tensorboard' not in text


# ---- bad input ------------------------------------------------------------------------------------------------------

def _one_line_error(returncode, stdout, stderr, needle):
    assert returncode not in (0, None), stdout[-1000:]
    err = stderr.strip()
    assert 'Traceback' not in err and 'Traceback' not in stdout, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:'), err
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize('case,needle', [('err_model', "'mae_vit_large_patch16'"), ('err_data_path', 'data_path')])
def test_bad_input_one_line_error_subprocess(runs, case, needle):
    res = runs['res'][case]
    _one_line_error(res.returncode, res.stdout, res.stderr, needle)
    if case == 'err_model':
        assert 'MIM_vit_base_patch16' in res.stderr  # names the valid choices


@pytest.mark.parametrize('flags,needle', [
    (['--input_size', 30], '--input_size 30'), (['--mask_ratio', 1.0], '--mask_ratio'),
    (['--mask_ratio', 0], '--mask_ratio 0.0: must be in (0, 1)'),
    (['--batch_size', 0], '--batch_size'), (['--accum_iter', 0], '--accum_iter'),
    (['--epochs', 0], '--epochs'), (['--stage_weights', '1,2'], '--stage_weights')])
def test_bad_input_one_line_error(flags, needle, demo_root, tmp_path, monkeypatch, capsys):
    """The same entry point as ``python run_pretrain.py`` (run_main), in-process to spare 2 CPU cores 5 s of
    imports per case; the subprocess cases above cover the ``__main__`` wrapper."""
    import run_pretrain
    argv = [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--epochs', 1, '--output_dir', tmp_path / 'out', *flags]
    monkeypatch.setattr(sys, 'argv', ['run_pretrain.py', *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        run_pretrain.run_main(run_pretrain.main, run_pretrain.get_args_parser())
    cap = capsys.readouterr()
    _one_line_error(e.value.code, cap.out, cap.err, needle)
    assert not (tmp_path / 'out' / 'log.txt').exists()
