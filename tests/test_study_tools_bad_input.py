"""Issue #25, "the study tools under bad input": tools/sweep.py, tools/submitit_launch.py and tools/report.py given
bad grids, bad chained-evaluation flags, clashing runs and broken files answer in one line before anything starts
(or skip the bad input in one line and go on), never with a traceback or a silently wrong table."""
import json
import os

import pytest

from tests.cli_inproc import cli
from tools import submitit_launch as sl
from tools import sweep as sw

PRE = ['--', 'run_pretrain.py', '--demo']


def _err(out, *argv):
    """The one-line LaunchError of ``tools.sweep`` (nothing written under ``out``)."""
    with pytest.raises(sl.LaunchError) as e:
        sw.main(['--out', str(out), '--run', 'local', *argv])
    assert '\n' not in str(e.value)
    assert not os.path.exists(out)
    return str(e.value)


# ---- 1. every point and every chained evaluation is checked before anything starts ---------------------------------

def test_sweep_checks_every_point_domain_before_the_first_run(tmp_path):
    msg = _err(tmp_path / 'sw', '--grid', 't_0=0.5,2', *PRE)
    assert msg == '--grid point t_0-2: run_pretrain.py: --t_0 2.0: must be in (0, 1]'


def test_sweep_checks_chained_evaluation_flags(tmp_path):
    msg = _err(tmp_path / 'sw', '--grid', 't_0=0.5,0.8', '--then', 'knn', '--knn_args', '--nb_knn 0', *PRE)
    assert msg == '--then knn (--knn_args): run_knn.py: --nb_knn 0: must be >= 1'


def test_sweep_checks_cross_flag_rules_of_each_point(tmp_path):
    # a typed --warmup_epochs above a grid point's --epochs (util.args._relation_errors)
    msg = _err(tmp_path / 'sw', '--grid', 'epochs=1,8', *PRE, '--warmup_epochs', '4')
    assert msg == '--grid point epochs-1: run_pretrain.py: --warmup_epochs 4: must be in [0, --epochs 1]'
    # a FreezeOut rule the script checks at start-up (freezeout.resolve_freeze_args)
    msg = _err(tmp_path / 'sw', '--grid', 't_0=0.5,0.8', *PRE, '--freeze_policy', 'adaptive')
    assert msg.startswith('--grid point t_0-0.5: run_pretrain.py: --t_0 shape the scheduled FreezeOut')


@pytest.mark.parametrize('values,a,b', [('0.8,0.80', '0.8', '0.80'), ('0.8,8e-1', '0.8', '8e-1')])
def test_sweep_refuses_two_spellings_of_one_number(tmp_path, values, a, b):
    assert _err(tmp_path / 'sw', '--grid', f't_0={values}', *PRE) == \
        f'--grid t_0={values}: {a!r} and {b!r} are the same value of --t_0; keep one'


def test_sweep_refuses_two_spellings_of_one_switch(tmp_path):
    assert _err(tmp_path / 'sw', '--grid', 'all_stages=on,ON,1', *PRE) == \
        "--grid all_stages=on,ON,1: 'on' and 'ON' are the same value of --all_stages; keep one"
    assert _err(tmp_path / 'sw', '--grid', 'all_stages=off,no', *PRE) == \
        "--grid all_stages=off,no: 'off' and 'no' are the same value of --all_stages; keep one"


def test_sweep_grid_keeps_comma_list_values_whole_with_bars(tmp_path, capsys):
    out = tmp_path / 'sw'
    assert sw.main(['--out', str(out), '--grid', 'stage_weights=1,1,1,1|4,3,2,1', *PRE]) == 0
    lines = capsys.readouterr().out.splitlines()
    cmds = [l for l in lines if not l.startswith('#')]
    assert len(cmds) == 2
    assert '--stage_weights 1,1,1,1' in cmds[0] and '--stage_weights 4,3,2,1' in cmds[1]
    assert '"stage_weights": "4,3,2,1"' in lines[2]
    # without bars a comma list splits into single numbers, which --stage_weights refuses in one line
    assert _err(tmp_path / 'sw2', '--grid', 'stage_weights=1,1,1,1', *PRE) == \
        "--grid stage_weights=1,1,1,1: '1' and '1' are the same value of --stage_weights; keep one (for a " \
        "comma-list value separate the values with |, e.g. stage_weights=1,1,1,1|4,3,2,1)"
    assert 'stage_weights=1,1,1,1|4,3,2,1' in ' '.join(sw.get_args_parser().format_help().split())


def test_submitit_launch_checks_domains_before_submitting(tmp_path):
    with pytest.raises(sl.LaunchError) as e:
        sl.main(['run_pretrain.py', '--demo', '--t_0', '5', '--output_dir', str(tmp_path / 'r'), '--cluster',
                 'local'])
    assert str(e.value) == 'run_pretrain.py: --t_0 5.0: must be in (0, 1]'
    assert not (tmp_path / 'r').exists()
    rc, out, err = cli('tools/submitit_launch.py', ['run_knn.py', '--demo', '--nb_knn', '0', '--cluster', 'local',
                                                    '--output_dir', str(tmp_path / 'k')])
    assert rc == 2 and err.strip() == 'error: run_knn.py: --nb_knn 0: must be >= 1'
    assert not (tmp_path / 'k').exists()


# ---- 2. run identity ---------------------------------------------------------------------------------------------

def _finished_run(out, *common):
    """A sweep folder holding one finished run (launch_state + log.txt + checkpoint file) of ``common`` at t_0=0.8,
    and a k-NN evaluation of it; returns the run folder."""
    opts = sw.get_args_parser().parse_args(['--out', str(out), '--grid', 't_0=0.8', '--then', 'knn'])
    sweep = sw.build_runs(opts, ['run_pretrain.py', '--demo', *common], os.getcwd())
    run = sweep['runs'][0]
    for step in run['steps']:
        sl.write_state(step['output_dir'], script=os.path.basename(step['script']), argv=step['argv'], state='done',
                       returncode=0)
    rd = run['output_dir']
    with open(os.path.join(rd, 'log.txt'), 'w') as f:
        f.write(json.dumps(dict(epoch=0, train_loss=1.0, train_epoch_time=1.0)) + '\n')
    open(os.path.join(rd, 'checkpoint-last.pth'), 'wb').close()
    with open(os.path.join(rd, 'knn', 'log.txt'), 'w') as f:
        f.write(json.dumps(dict(knn_k20_top1=50.0)) + '\n')
    return rd


def test_sweep_refuses_a_folder_holding_a_run_with_other_run_defining_flags(tmp_path, monkeypatch):
    out = tmp_path / 'sw'
    rd = _finished_run(out, '--epochs', '3')
    ran = []
    monkeypatch.setattr(sw, 'run_local', lambda sweep, cwd: ran.append(sweep) or 0)
    with pytest.raises(sl.LaunchError) as e:
        sw.main(['--out', str(out), '--run', 'local', '--grid', 't_0=0.8', '--then', 'knn', *PRE, '--epochs', '4'])
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith(f'{rd} holds a run with other run-defining flags (--epochs 3 -> 4')
    assert 'pass --overwrite after --' in msg and not ran
    assert not (out / 'sweep.json').exists()
    # a flag that does not define the run (--num_workers) resumes it, as auto-resume does
    assert sw.main(['--out', str(out), '--run', 'local', '--grid', 't_0=0.8', '--then', 'knn', *PRE, '--epochs',
                    '3', '--num_workers', '0']) == 0 and len(ran) == 1
    # --overwrite moves the old run aside, its evaluation and launch states with it
    assert sw.main(['--out', str(out), '--run', 'local', '--grid', 't_0=0.8', '--then', 'knn', *PRE, '--epochs',
                    '4', '--overwrite']) == 0 and len(ran) == 2
    left = sorted(os.listdir(rd))
    assert len(left) == 1 and left[0].startswith('previous-')
    moved = sorted(os.listdir(os.path.join(rd, left[0])))
    assert moved == ['checkpoint-last.pth', 'knn', 'launch_state.json', 'log.txt']


def test_sweep_json_holds_folders_relative_to_the_sweep(tmp_path, monkeypatch):
    out = tmp_path / 'sw'
    monkeypatch.setattr(sw, 'run_local', lambda sweep, cwd: 0)
    assert sw.main(['--out', str(out), '--run', 'local', '--grid', 't_0=0.7,0.8', *PRE]) == 0
    runs = json.loads((out / 'sweep.json').read_text())['runs']
    assert [r['output_dir'] for r in runs] == ['t_0-0.7', 't_0-0.8']


def test_a_copied_sweep_reports_its_own_runs(tmp_path):
    from tools import report
    a, b = tmp_path / 'a', tmp_path / 'b'
    for d, loss in ((a, 1.0), (b, 2.0)):
        (d / 'r').mkdir(parents=True)
        (d / 'r' / 'log.txt').write_text(json.dumps(dict(epoch=0, train_loss=loss)) + '\n')
    # an old sweep.json of b with an absolute folder pointing into a
    (b / 'sweep.json').write_text(json.dumps(dict(runs=[dict(name='r', output_dir=str(a / 'r'))])))
    runs = report.discover([str(b)])
    assert [r['dir'] for r in runs] == [str(b / 'r')] and runs[0]['final_loss'] == 2.0


def test_a_second_launch_does_not_rewrite_a_live_runs_state(tmp_path, monkeypatch):
    from util import rundir
    rd = tmp_path / 'sw' / 't_0-0.8'
    rd.mkdir(parents=True)
    monkeypatch.setattr(sw, 'run_local', lambda sweep, cwd: pytest.fail('the sweep started'))
    sl.write_state(str(rd), script='run_pretrain.py', argv=['--x'], state='running', job_id='1')
    import fcntl
    fd = os.open(rd / rundir.LOCK_NAME, os.O_RDWR | os.O_CREAT)  # a live run's lock (another open file: held)
    os.write(fd, json.dumps(dict(pid=12345, host='h', started=0)).encode())
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert rundir.folder_in_use(str(rd)).startswith('pid 12345 on h')
        with pytest.raises(sl.LaunchError) as e:
            sl.main(['run_pretrain.py', '--demo', '--output_dir', str(rd), '--cluster', 'local'])
        assert str(e.value).startswith(f'--output_dir {rd} is in use by another run (pid 12345 on h')
        with pytest.raises(sl.LaunchError):
            sw.main(['--out', str(tmp_path / 'sw'), '--run', 'local', '--grid', 't_0=0.8', *PRE])
        assert sl.read_state(str(rd)) == dict(script='run_pretrain.py', argv=['--x'], state='running', job_id='1')
    finally:
        os.close(fd)
    assert rundir.folder_in_use(str(rd)) is None


# ---- 3. the report trusts nothing it parses ------------------------------------------------------------------------

def _report(*argv):
    rc, out, err = cli('tools/report.py', [*map(str, argv), '--no_figures'])
    assert rc != 'traceback', err
    return rc, out, err


def test_report_survives_bad_bytes_null_and_string_values(tmp_path):
    rd = tmp_path / 'sw' / 'r'
    rd.mkdir(parents=True)
    with open(rd / 'log.txt', 'wb') as f:
        f.write(json.dumps(dict(epoch=0, train_loss=1.5, train_epoch_time=2.0)).encode() + b'\n')
        f.write(b'\xff\xfe not utf-8 \x80\n')
        f.write(json.dumps(dict(epoch=1, train_loss=1.25, train_epoch_time=None, knn_k20_top1='n/a',
                                measured_saving_so_far='x')).encode() + b'\n')
    rc, out, err = _report(tmp_path / 'sw')
    assert rc == 0
    assert err.splitlines() == [f'note: {rd / "log.txt"}: skipped 1 line(s) that are not JSON records']
    md = (tmp_path / 'sw' / 'report.md').read_text()
    row = next(l for l in md.splitlines() if l.startswith('| 1 '))
    assert row.split(' | ')[2:7] == ['2/?', '2.0 s', '–', '–', '1.2500']  # the null time counts as none


def test_report_nan_last_epoch_shows_nan(tmp_path):
    rd = tmp_path / 'r'
    rd.mkdir()
    (rd / 'log.txt').write_text(json.dumps(dict(epoch=0, train_loss=1.5)) + '\n'
                                + '{"epoch": 1, "train_loss": NaN}\n')
    from tools import report
    run = report.discover([str(rd)])[0]
    assert run['final_loss'] != run['final_loss']  # NaN, not epoch 0's 1.5
    assert report.fmt_num(run['final_loss'], 4) == 'NaN'


@pytest.mark.parametrize('content', ['{not json', '[1, 2]', '{"runs": 5}', '{"runs": [7, {"name": null}, '
                                                                            '{"name": "r", "point": 3}]}'])
def test_report_survives_a_malformed_sweep_json(tmp_path, content):
    rd = tmp_path / 'r'
    rd.mkdir()
    (rd / 'log.txt').write_text(json.dumps(dict(epoch=0, train_loss=1.5)) + '\n')
    (tmp_path / 'sweep.json').write_text(content)
    rc, out, err = _report(tmp_path)
    assert rc == 0 and 'report:' in out
    notes = err.splitlines()
    assert notes and all(l.startswith(f'note: {tmp_path / "sweep.json"}: ') for l in notes)


def test_report_refuses_a_file_as_out_in_one_line(tmp_path):
    rd = tmp_path / 'r'
    rd.mkdir()
    (rd / 'log.txt').write_text(json.dumps(dict(epoch=0, train_loss=1.5)) + '\n')
    (tmp_path / 'f').write_text('x')
    rc, out, err = _report(rd, '--out', tmp_path / 'f')
    assert rc == 2 and err.strip() == f'error: --out {tmp_path / "f"}: is a file, not a folder; choose another --out'


def test_report_adaptive_saving_and_knn_k_in_the_column(tmp_path):
    from tools import report
    for name, k in (('a', 20), ('b', 10)):
        rd = tmp_path / name
        (rd / 'knn').mkdir(parents=True)
        (rd / 'log.txt').write_text(json.dumps(dict(epoch=0, train_loss=1.0, decided_saving_so_far=0.2,
                                                    measured_saving_so_far=0.15)) + '\n')
        (rd / 'knn' / 'log.txt').write_text(json.dumps({f'knn_k{k}_top1': 40.0 + k}) + '\n')
    runs = report.discover([str(tmp_path)])
    assert runs[0]['planned_saving'] == 0.2 and runs[0]['measured_saving'] == 0.15
    head, rows, _, _ = report.table(runs)
    assert 'knn (k=20) top-1' in head and 'knn (k=10) top-1' in head
    i20, i10 = head.index('knn (k=20) top-1'), head.index('knn (k=10) top-1')
    assert rows[0][i20] == '60.00' and rows[0][i10] == '–'
    assert rows[1][i10] == '50.00' and rows[1][i20] == '–'


# ---- 4. Ctrl-C on --cluster local ----------------------------------------------------------------------------------

def test_local_cluster_job_does_not_wait_for_a_requeue(tmp_path, monkeypatch):
    jobs = []

    class FakeExecutor:
        def submit(self, fn):
            jobs.append(fn)
            return type('J', (), {'job_id': '1'})()
    monkeypatch.setattr(sl, 'make_executor', lambda opts, job_dir, name: FakeExecutor())
    monkeypatch.setattr(sl, 'wait_for', lambda job: 0)
    for cluster, wait in (('local', 0.0), ('slurm', 120.0)):
        sl.main(['run_pretrain.py', '--demo', '--output_dir', str(tmp_path / cluster), '--cluster', cluster])
        assert jobs[-1].preempt_wait_s == wait


def test_report_measured_saving_spans_every_resume(tmp_path):
    from tools import report
    rd = tmp_path / 'r'
    rd.mkdir()
    recs = [dict(epoch=e, train_loss=1.0, train_step_time=st, train_compute_time=10 * st, frozen_units=fz,
                 measured_saving_so_far=ms)
            for e, st, fz, ms in ((0, 1.0, 0, 0.0), (1, 1.0, 0, 0.0), (2, 0.5, 2, 1 / 6))]
    recs.append(dict(epoch=3, train_loss=1.0, train_step_time=0.5, train_compute_time=5.0, frozen_units=3,
                     measured_saving_so_far=0.0))  # a resumed process: its only epoch is its own baseline
    (rd / 'log.txt').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    run = report.discover([str(rd)])[0]
    assert run['measured_saving'] == pytest.approx(1 - 30 / 40)  # base 1.0 s/step, 40 steps, 30 s spent


def test_report_hides_an_evaluation_of_a_run_since_overwritten(tmp_path):
    import time
    from tools import report
    rd = tmp_path / 'r'
    (rd / 'knn').mkdir(parents=True)
    (rd / 'log.txt').write_text(json.dumps(dict(epoch=0, train_loss=1.0)) + '\n')
    (rd / 'knn' / 'log.txt').write_text(json.dumps(dict(knn_k20_top1=55.0)) + '\n')
    old = time.time() - 100
    os.utime(rd / 'knn' / 'log.txt', (old, old))
    (rd / 'run.json').write_text(json.dumps(dict(run_id='new', created=time.time() - 10)))
    rc, out, err = _report(rd, '--out', tmp_path / 'rep')
    assert rc == 0 and 'an evaluation of an earlier run' in err
    assert report.discover([str(rd)])[0]['evals'] == {}
    os.utime(rd / 'knn' / 'log.txt')  # evaluated after the run started: shown
    assert list(report.discover([str(rd)])[0]['evals']) == ['knn (k=20)']
