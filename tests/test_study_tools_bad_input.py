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
    assert _err(tmp_path / 'sw2', '--grid', 'stage_weights=1,1,1,1', *PRE).startswith(
        "--grid stage_weights=1,1,1,1: '1' and '1' are the same value")
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
