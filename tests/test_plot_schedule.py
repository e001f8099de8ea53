"""tools/plot_schedule.py draws the schedule a run trains: it takes run_pretrain.py's own flags (or --run DIR) and
its JSON freeze steps equal --plan_only's for the same flags, with gradient accumulation and on 2 processes."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cli_inproc import cli
from conftest import TINY_PRETRAIN_FLAGS

pytestmark = [pytest.mark.usefixtures('single_thread'),
              pytest.mark.filterwarnings('ignore::UserWarning')]
REPO = Path(__file__).resolve().parent.parent


def _flags(demo_root, *extra):
    # 32 images, batch 2: 16 batches, 4 optimizer steps per epoch with --accum_iter 4 (2 on 2 processes)
    return [*TINY_PRETRAIN_FLAGS, '--data_path', str(demo_root), '--batch_size', '2', '--accum_iter', '4',
            '--epochs', '20', '--warmup_epochs', '2', '--how_scale', 'linear', '--t_0', '0.3', *extra]


def _plan_steps(text):
    """unit name -> freeze step (None = never) from --plan_only's table."""
    rows = re.findall(r'^\s+\d+ (\w+)\s+[\d.]+\s+[\d.e+-]+\s+[\d.]+\s+(\d+|never)\s', text, re.M)
    return {n: (None if s == 'never' else int(s)) for n, s in rows}


def _plot(tmp_path, argv):
    pytest.importorskip('matplotlib', reason='matplotlib is a dev-only dependency (requirements-dev.txt)')
    from tools.plot_schedule import main
    png = tmp_path / 'sched.png'
    assert main(['--out', str(png), *argv]) == 0
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 5000
    data = json.loads(png.with_suffix('.json').read_text())
    return data, dict(zip(data['units'], data['freeze_steps']))


def test_json_equals_plan_only_with_accumulation(demo_root, tmp_path):
    flags = _flags(demo_root)
    rc, out, err = cli('run_pretrain.py', [*flags, '--output_dir', '', '--plan_only'])
    assert rc == 0, err
    want = _plan_steps(out)
    assert len(want) == 5 and want['block4'] is None and want['embed'] is not None
    data, got = _plot(tmp_path, ['--', *flags])
    assert got == want and data['total_steps'] == 80 and data['steps_per_epoch'] == 4


def test_run_dir_replays_the_saved_command(demo_root, tmp_path):
    out_dir = tmp_path / 'run'
    flags = _flags(demo_root, '--epochs', '2', '--warmup_epochs', '1', '--output_dir', str(out_dir))
    rc, out, err = cli('run_pretrain.py', flags)
    assert rc == 0, err[-2000:]
    data, got = _plot(tmp_path, ['--run', str(out_dir)])
    assert got == _plan_steps(out) and data['total_steps'] == 8


def test_a_policy_without_a_plan_is_refused(demo_root, tmp_path):
    pytest.importorskip('matplotlib')
    flags = [a for a in _flags(demo_root) if a not in ('--how_scale', 'linear', '--t_0', '0.3')]
    rc, out, err = cli('tools/plot_schedule.py', ['--out', str(tmp_path / 'x.png'), '--', *flags,
                                                  '--freeze_policy', 'adaptive'])
    assert rc == 2 and re.search(r'error: --freeze_policy adaptive decides while training', err), err


@pytest.mark.slow
def test_json_equals_plan_only_on_two_processes(demo_root, tmp_path):
    flags = _flags(demo_root)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                        str(port), 'run_pretrain.py', *flags, '--output_dir', '', '--plan_only'],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    want = _plan_steps(r.stdout)
    data, got = _plot(tmp_path, ['--nproc', '2', '--', *flags])
    assert got == want and data['total_steps'] == 40 and data['processes'] == 2
