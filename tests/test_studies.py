"""Studies: tools/submitit_launch.py (submitit's local executor: finish; pre-emption -> requeue -> exact resume),
tools/sweep.py (expansion, naming, one-line grid errors, skip finished / resume unfinished) and tools/report.py
(a real 2x2 sweep of tiny runs with k-NN chained: table values equal the logs, figures written; no matplotlib).
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, TINY_PRETRAIN_FLAGS, _pretrain_env

from tools import report as rp
from tools import submitit_launch as sl
from tools import sweep as sw


def _log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _numbers(rec):
    """The deterministic part of a pre-training record (no timings, throughput, memory, per-process savings; a
    requeued job continues the same run, but the run id of a separate reference run differs)."""
    return {k: v for k, v in rec.items()
            if k != 'run_id' and not any(w in k for w in ('time', 'img_per_s', 'mem', 'so_far', 'data_wait'))}


def _ok(res):
    assert res.returncode == 0, f'exit {res.returncode}\nSTDOUT:\n{res.stdout[-3000:]}\nSTDERR:\n{res.stderr[-3000:]}'
    return res


def _tool(name, args, timeout=900, env=None):
    return subprocess.run([sys.executable, '-m', f'tools.{name[:-3]}', *map(str, args)], cwd=REPO_ROOT,
                          env=_pretrain_env(env), capture_output=True, text=True, timeout=timeout)


# ---- launcher -----------------------------------------------------------------------------------------------------

def _launch(demo_root, out, log_file, epochs=4):
    flags = [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--epochs', epochs, '--t_0', '0.8', '--vis_freq', '0',
             '--output_dir', out]
    cmd = [sys.executable, '-m', 'tools.submitit_launch', 'run_pretrain.py', *map(str, flags),
           '--cluster', 'local', '--ngpus', '0', '--timeout', '30']
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=_pretrain_env(), stdout=open(log_file, 'w'),
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(cond, what, timeout=600, every=0.05):
    end = time.time() + timeout
    while time.time() < end:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f'timed out waiting for {what}')


def _job_log(out):
    return '\n'.join(p.read_text() for p in sorted(Path(out, 'submitit').glob('*_log.*')))


@pytest.mark.slow
def test_launcher_local_finishes_and_preempted_job_requeues_and_resumes_exactly(demo_root, tmp_path):
    full, cut = tmp_path / 'full', tmp_path / 'cut'
    p_full = _launch(demo_root, full, tmp_path / 'full.txt')
    p_cut = _launch(demo_root, cut, tmp_path / 'cut.txt')
    ctl = int(_wait_for(lambda: re.search(r'submitted job (\d+)', (tmp_path / 'cut.txt').read_text()),
                        'the job id').group(1))
    # pre-empt once an epoch is on disk: submitit's signal (USR2) to the job's task, as `scancel --signal` would
    _wait_for(lambda: (cut / 'log.txt').is_file() and (cut / 'log.txt').read_text().strip(), 'the first epoch')
    children = Path(f'/proc/{ctl}/task/{ctl}/children').read_text().split()
    assert len(children) == 1, children
    os.kill(int(children[0]), signal.SIGUSR2)
    for p, name in ((p_full, 'full'), (p_cut, 'cut')):
        assert p.wait(timeout=900) == 0, (tmp_path / f'{name}.txt').read_text() + _job_log(tmp_path / name)

    # uninterrupted: finished, state recorded, job logs where the launcher said
    said = (tmp_path / 'full.txt').read_text()
    assert re.search(rf'log: {re.escape(str(full))}/submitit/\d+_0_log.out', said) and 'finished' in said
    assert [r['epoch'] for r in _log(full / 'log.txt')] == [0, 1, 2, 3]
    state = json.loads((full / 'launch_state.json').read_text())
    assert state['state'] == 'done' and state['returncode'] == 0 and state['script'] == 'run_pretrain.py'
    assert 'attempt 1' in _job_log(full) and 'attempt 2' not in _job_log(full)

    # pre-empted: stopped by the launcher, requeued by submitit, resumed from its checkpoint
    log = _job_log(cut)
    assert 'pre-emption/time-out signal: stopping run_pretrain.py' in log, log
    assert 'Requeued job' in log and 'attempt 2' in log, log
    assert re.search(r'Resumed from .*checkpoint-last\.pth: epoch \d done', log), log
    assert [_numbers(r) for r in _log(cut / 'log.txt')] == [_numbers(r) for r in _log(full / 'log.txt')]
    a = torch.load(full / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    b = torch.load(cut / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert a['epoch'] == b['epoch'] == 3 and a['step'] == b['step']
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert a['freezeout'] == b['freezeout']


def test_launcher_errors_and_requeue_argv(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'submitit', None)  # as if not installed
    with pytest.raises(sl.LaunchError, match=r'^submitit is not installed: pip install submitit'):
        sl.import_submitit()
    with pytest.raises(sl.LaunchError, match=r'^run_pretrain\.py: unrecognized arguments: --bogus 3$'):
        sl.main(['run_pretrain.py', '--epochs', '2', '--bogus', '3', '--cluster', 'local'])
    with pytest.raises(sl.LaunchError, match=r'^train\.py: not one of the scripts run_pretrain\.py'):
        sl.main(['train.py', '--cluster', 'local'])
    # a requeued attempt resumes from what this job wrote, even if the user asked to start over / resume elsewhere
    out = tmp_path / 'o'
    out.mkdir()
    step = dict(script='run_pretrain.py', argv=['--no_auto_resume', '--resume', 'x.pth', '--epochs', '3'],
                output_dir=str(out))
    job = sl.StepsJob([step], str(tmp_path))
    job.first_start = time.time()
    assert job._argv_for(step) == step['argv']  # first attempt: as typed
    (out / 'checkpoint-last.pth').write_bytes(b'')
    job.attempt = 1
    assert job._argv_for(step) == ['--epochs', '3', '--resume', str(out / 'checkpoint-last.pth')]
    job.first_start = time.time() + 60  # a checkpoint older than this job is another run's: leave argv alone
    assert job._argv_for(step) == step['argv']


# ---- sweep --------------------------------------------------------------------------------------------------------

def test_sweep_print_expands_grid_into_named_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # record.sh and the script are printed as typed when they are here
    out = tmp_path / 'sw'
    assert sw.main(['--grid', 't_0=0.7,0.9', '--grid', 'all_stages=on,off', '--then', 'knn,linprobe', '--out', str(out),
                    '--run', 'print', '--', 'CUDA_VISIBLE_DEVICES=0', 'torchrun', '--nproc_per_node=2',
                    'run_pretrain.py', '--demo', '--epochs', '2', '--log_dir', 'ignored']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = ['t_0-0.7_all_stages-on', 't_0-0.7_all_stages-off', 't_0-0.9_all_stages-on', 't_0-0.9_all_stages-off']
    heads = [l for l in lines if l.startswith('# ')]
    assert heads == [f'# {n}: {json.dumps(dict(t_0=n[4:7], all_stages=n.rsplit("-", 1)[1]))}' for n in names]
    cmds = [shlex.split(l) for l in lines if not l.startswith('#')]
    assert len(cmds) == 12
    for i, n in enumerate(names):
        pre, knn, lp = cmds[3 * i: 3 * i + 3]
        run = str(out / n)
        assert pre[:5] == ['bash', 'record.sh', 'CUDA_VISIBLE_DEVICES=0', 'torchrun', '--nproc_per_node=2']
        assert pre[5:] == ['run_pretrain.py', '--demo', '--epochs', '2', '--t_0', n[4:7],
                           *(['--all_stages'] if n.endswith('-on') else []), '--output_dir', run,
                           '--log_dir', f'{run}/tb']
        for ev, words in (('knn', knn), ('linprobe', lp)):
            # the environment words apply to evaluations too; they run as one process each
            assert words[:4] == ['bash', 'record.sh', 'CUDA_VISIBLE_DEVICES=0', sys.executable]
            assert words[4:] == [f'run_{ev}.py', '--demo', '--finetune', f'{run}/checkpoint-last.pth',
                                 '--output_dir', f'{run}/{ev}']
    assert not out.exists()  # printing creates nothing


def test_sweep_device_and_amp_reach_every_step(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / 'sw'
    base = ['--grid', 't_0=0.7,0.9', '--then', 'knn,finetune', '--out', str(out), '--run', 'print']
    assert sw.main([*base, '--device', 'cuda', '--amp', 'bf16', '--', 'run_pretrain.py', '--demo']) == 0
    cmds = [shlex.split(l) for l in capsys.readouterr().out.splitlines() if l and not l.startswith('#')]
    assert len(cmds) == 6
    for words in cmds:  # pre-training, k-NN and fine-tuning: one --device and one --amp each
        assert [words[i + 1] for i, w in enumerate(words) if w == '--device'] == ['cuda'], words
        assert [words[i + 1] for i, w in enumerate(words) if w == '--amp'] == ['bf16'], words
    # the default: nothing added, the scripts' own defaults (CPU runs unchanged)
    assert sw.main([*base, '--', 'run_pretrain.py', '--demo']) == 0
    printed = capsys.readouterr().out
    assert '--device' not in printed and '--amp' not in printed

    def err(*argv):
        with pytest.raises(sl.LaunchError) as e:
            sw.main([*base, *argv])
        return str(e.value)
    assert err('--amp', 'fp16', '--', 'run_pretrain.py', '--demo', '--amp', 'bf16') == \
        "--amp fp16 and --amp bf16 in the common flags: give it once (the sweep's --amp applies to every step)"
    assert err('--device', 'cpu', '--knn_args', '--device cuda', '--', 'run_pretrain.py', '--demo') == \
        "--device cpu and --device in --knn_args: give it once (the sweep's --device applies to every step)"
    assert err('--amp', 'fp8', '--', 'run_pretrain.py', '--demo').startswith("argument --amp: invalid choice: 'fp8'")
    assert not out.exists()


def test_sweep_bad_grid_fails_in_one_line_before_anything_starts(tmp_path):
    out = tmp_path / 'sw'
    res = _tool('sweep.py', ['--grid', 't_0=0.7,0.8', '--grid', 'bogus=1,2', '--out', out, '--run', 'local', '--',
                             'run_pretrain.py', '--demo'], timeout=300)
    assert res.returncode == 2 and res.stdout == ''
    assert res.stderr.splitlines() == ['error: --grid bogus=1,2: run_pretrain.py has no flag --bogus (see '
                                       'run_pretrain.py --help)']
    assert not out.exists()

    def err(*argv):
        with pytest.raises(sl.LaunchError) as e:
            sw.main(['--out', str(out), '--run', 'local', *argv])
        assert '\n' not in str(e.value)
        return str(e.value)
    pre = ['--', 'run_pretrain.py', '--demo']
    assert err('--grid', 't_0=', *pre) == '--grid t_0=: empty value; give comma-separated values, e.g. t_0=A,B'
    assert err('--grid', 't_0=0.7,,0.9', *pre).startswith('--grid t_0=0.7,,0.9: empty value')
    assert err('--grid', 't_0', *pre) == '--grid t_0: expected KEY=V1,V2,... (e.g. --grid t_0=0.7,0.8)'
    assert err('--grid', 't_0=abc', *pre) == "--grid point t_0-abc: run_pretrain.py: argument --t_0: invalid " \
                                             "float value: 'abc'"
    assert err('--grid', 'all_stages=yes,maybe', *pre) == "--grid all_stages=yes,maybe: --all_stages is a switch; " \
                                                          "its values are on/off, not 'maybe'"
    assert err('--grid', 't_0=0.7', '--grid', 't_0=0.8', *pre).endswith('--t_0 is given twice; put all its values '
                                                                        'in one --grid')
    assert err('--grid', 'epochs=1,2', *pre, '--epochs', '3').endswith('--epochs is also among the common flags '
                                                                      'after --; keep one')
    assert err('--grid', 't_0=0.7', *pre, '--output_dir', 'x').startswith('--output_dir in the common flags: the '
                                                                         'sweep sets it for every run')
    assert err('--grid', 't_0=0.7', '--then', 'probe', *pre) == '--then probe: expected one of knn, linprobe, finetune'
    assert err('--grid', 't_0=0.7', '--then', 'knn', '--', 'run_pretrain.py', '--data_path', str(tmp_path)) == \
        '--then knn: no data for the evaluation: pass --knn_args "--data_path ROOT" (ROOT holding train/ and val/)'
    assert err('--grid', 't_0=0.7', '--', '--demo').startswith('no script after --')
    assert not out.exists()


SWEEP_GRID = ['--grid', 't_0=0.7,1', '--grid', 'how_scale=cubic,linear']


def _sweep_cmd(demo_root, out):
    return [*SWEEP_GRID, '--then', 'knn', '--knn_args', '--num_workers 0 --batch_size 16', '--out', out,
            '--run', 'local', '--', 'run_pretrain.py', *TINY_PRETRAIN_FLAGS, '--data_path', demo_root,
            '--epochs', '2', '--knn_eval_freq', '1', '--vis_freq', '0',
            '--freeze_schedule', 'freezeout']  # freezes blocks within 8 steps (vitfreeze: only the embedding)


@pytest.fixture(scope='module')
def sweep_dir(demo_root, tmp_path_factory):
    """A real 2x2 sweep of tiny 2-epoch runs, each with online k-NN and a chained run_knn.py."""
    out = tmp_path_factory.mktemp('study') / 'sweep'
    _ok(_tool('sweep.py', _sweep_cmd(demo_root, out), timeout=1500))
    return out


RUNS = ['t_0-0.7_how_scale-cubic', 't_0-0.7_how_scale-linear', 't_0-1_how_scale-cubic', 't_0-1_how_scale-linear']


def _md_rows(md):
    rows = [l for l in md.splitlines() if l.startswith('| ')]
    head = [c.strip() for c in rows[0].strip('|').split('|')]
    return [dict(zip(head, (c.strip() for c in r.strip('|').split('|')))) for r in rows[1:]]


@pytest.mark.slow
def test_report_table_equals_the_logs_and_figures_are_written(sweep_dir, tmp_path):
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == RUNS
    broken = sweep_dir / 'broken'  # a run that failed at start-up: listed, not dropped
    broken.mkdir(exist_ok=True)
    (broken / 'launch_state.json').write_text(json.dumps(dict(script='run_pretrain.py', argv=[], state='failed',
                                                              returncode=1)))
    try:
        res = _ok(_tool('report.py', [sweep_dir], timeout=300))
        md = (sweep_dir / 'report.md').read_text()
        rows = _md_rows(md)
        assert [r['run'] for r in rows] == RUNS + ['broken']
        for r in rows[:4]:
            run = sweep_dir / r['run']
            log = _log(run / 'log.txt')
            last = log[-1]
            assert r['t_0'] == {'0.7': '0.7', '1': '1'}[r['run'][4:].split('_')[0]]
            assert r['how_scale'] == r['run'].rsplit('-', 1)[1]
            assert r['epochs'] == '2/2' and r['status'] == 'finished'
            assert r['final loss'] == f'{last["train_loss"]:.4f}'
            assert r['train time'] == rp.fmt_time(sum(x['train_epoch_time'] for x in log))
            assert r['saving planned'] == f'{100 * last["planned_saving_so_far"]:.1f}%'
            assert r['saving measured'] == (f'{100 * last["measured_saving_so_far"]:.1f}%'
                                            if 'measured_saving_so_far' in last else '–')
            assert r['online k-NN top-1'] == f'{last["knn_k20_top1"]:.2f} (k=20, ep 1)'
            assert r['knn (k=20) top-1'] == f'{_log(run / "knn" / "log.txt")[-1]["knn_k20_top1"]:.2f}'
        assert rows[4]['status'] == 'failed (exit status 1) after 0 epochs'
        assert f'- [5] broken: failed (exit status 1) after 0 epochs ({broken})' in md
        t0 = [r for r in rows[:4] if r['t_0'] == '0.7']
        assert all(float(r['saving planned'][:-1]) > 0 for r in t0)  # t_0 < 1 freezes something
        for png in ('loss_per_stage.png', 'step_time.png', 'accuracy_vs_compute.png'):
            data = (sweep_dir / png).read_bytes()
            assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 10_000, png
            assert f']({png})' in md
        assert 'report.md (5 runs, 3 figures)' in res.stdout

        # without matplotlib: the same table, and the report says the figures are missing
        code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
                f"sys.argv = ['report.py', {str(sweep_dir)!r}, '--out', {str(tmp_path)!r}]; "
                "runpy.run_module('tools.report', run_name='__main__', alter_sys=True)")
        res = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, env=_pretrain_env(), capture_output=True,
                             text=True, timeout=300)
        _ok(res)
        md2 = (tmp_path / 'report.md').read_text()
        assert [{k: v for k, v in r.items()} for r in _md_rows(md2)] == rows
        assert 'Figures not written: matplotlib is not installed' in md2
        assert 'note: figures not written: matplotlib is not installed' in res.stderr
        assert not list(tmp_path.glob('*.png'))
    finally:
        for p in broken.iterdir():
            p.unlink()
        broken.rmdir()


def test_report_formats():
    assert (rp.fmt_time(12.34), rp.fmt_time(3723.0), rp.fmt_time(None)) == ('12.3 s', '01:02:03', '–')
    assert (rp.fmt_pct(0.1234), rp.fmt_num(0.123456, 4), rp.fmt_flag(1.0), rp.fmt_flag(0.7)) == \
        ('12.3%', '0.1235', '1', '0.7')


def test_pareto_front():
    pts = [(2.0, 50.0), (1.0, 40.0), (1.5, 40.0), (3.0, 49.0), (1.0, 45.0), (4.0, 60.0)]
    assert rp.pareto(pts) == [4, 0, 5]


@pytest.mark.slow
def test_sweep_rerun_skips_finished_runs_and_resumes_unfinished(demo_root, sweep_dir):
    # rewind one run to "stopped after epoch 0": its epoch-1 checkpoint and record are gone
    run = sweep_dir / RUNS[0]
    log = _log(run / 'log.txt')
    (run / 'checkpoint-1.pth').unlink()
    (run / 'checkpoint-last.pth').unlink()
    (run / 'log.txt').write_text(json.dumps(log[0]) + '\n')
    state = json.loads((run / 'launch_state.json').read_text())
    (run / 'launch_state.json').write_text(json.dumps(dict(state, state='stopped', returncode=143)))
    before = {r: (sweep_dir / r / 'log.txt').stat().st_mtime_ns for r in RUNS[1:]}
    knn_before = len(_log(run / 'knn' / 'log.txt'))

    res = _ok(_tool('sweep.py', _sweep_cmd(demo_root, sweep_dir), timeout=900))
    skipped = re.findall(r'\[sweep\] (\S+): (\S+) finished before, skipped', res.stdout)
    assert sorted(skipped) == sorted((r, s) for r in RUNS[1:] for s in ('run_pretrain.py', 'run_knn.py'))
    assert {r: (sweep_dir / r / 'log.txt').stat().st_mtime_ns for r in RUNS[1:]} == before
    assert re.search(r'Resumed from \S+/checkpoint-0\.pth: epoch 0 done', res.stdout), res.stdout[-3000:]
    assert [_numbers(r) for r in _log(run / 'log.txt')] == [_numbers(r) for r in log]  # exact resume
    assert json.loads((run / 'launch_state.json').read_text())['state'] == 'done'
    assert len(_log(run / 'knn' / 'log.txt')) == knn_before + 1  # its evaluation ran again on the new checkpoint
