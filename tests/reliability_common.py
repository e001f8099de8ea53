"""Shared by the reliability tests (``tests/test_reliability_*.py``): subprocess helpers, run comparison, and the
session-wide reference runs every file builds on (made available to all tests through ``conftest.py``).

Every test runs the scripts as subprocesses (bounded by a timeout) on the tiny demo set of ``conftest.py``
(32 px images, patch 4, embed 64, depth 4, heads 4, batch 4, ``--num_workers 0``, ``OMP_NUM_THREADS=1``), except
the pre-training bad-input cases, which run the same ``__main__`` blocks in-process (:func:`run_in_process`).

Faults are injected from outside the production code: :func:`env` puts ``tests/hooks`` first on the scripts'
``PYTHONPATH``, whose ``sitecustomize.py`` acts on these variables (all no-ops when unset):
  * ``VITFREEZE_TEST_NAN_AT_STEP=<n>``: replace the loss of global micro-step ``n`` with NaN;
  * ``VITFREEZE_TEST_DUMP_RANK_WEIGHTS=<dir>``: every rank writes digests of its weights after each epoch;
and ``util/checkpoint.save_atomic`` reads ``VITFREEZE_TEST_PAUSE_IN_SAVE=<s>`` (pause between writing a checkpoint's
temp file and renaming it).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TIMEOUT = 180  # seconds, any single subprocess

TINY = ['--model', 'MIM_vit_tiny_patch16', '--input_size', '32', '--patch_size', '4', '--embed_dim', '64',
        '--depth', '4', '--num_heads', '4', '--batch_size', '4', '--warmup_epochs', '1', '--blr', '1e-2',
        '--num_workers', '0', '--device', 'cpu', '--seed', '3']
# 32 images / batch 4 = 8 iterations per epoch, T = 24 steps, W = 8. Linear t_0 = 0.3 over 5 units freezes (under
# the FreezeOut-paper schedule these tests pin) the embedding at step 8 (epoch 1 start), block1 at 12 (mid epoch 1),
# block2 at 16 (epoch 2 start), block3 at 20.
FREEZE = ['--how_scale', 'linear', '--t_0', '0.3', '--freeze_schedule', 'freezeout']
EPOCHS = 3
ITERS = 8


HOOKS = REPO / 'tests' / 'hooks'  # sitecustomize.py: fault injection (see the module docstring)


def env(**extra: str) -> Dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith('VITFREEZE_TEST_')}
    e.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **extra)
    e['PYTHONPATH'] = os.pathsep.join([str(HOOKS)] + ([e['PYTHONPATH']] if e.get('PYTHONPATH') else []))
    return e

def run(script: str, args: Sequence[str], timeout: float = TIMEOUT, **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(REPO / script), *map(str, args)], cwd=REPO, env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(script: str, args: Sequence[str]) -> subprocess.CompletedProcess:
    """``python script args`` in this interpreter: the script's own ``__main__`` block (``runpy``), sys.argv set,
    stdout/stderr captured, the exit status from its SystemExit, and any other exception as a traceback on stderr
    with status 1. The same entry point as a subprocess at a fraction of the cost (torch is imported already), for
    runs that need neither an environment of their own (fault-injection hooks, variables) nor a thread other than
    the main one (the scripts install signal handlers)."""
    path = str(REPO / script)
    argv = [path, *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    saved_argv, code = sys.argv, 0
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(path, run_name='__main__')
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 - a crash is what the callers' "no traceback" checks must see
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def pretrain_args(data: Path, out: Path, *more: str, epochs: int = EPOCHS) -> List[str]:
    return [*TINY, *FREEZE, '--epochs', str(epochs), '--data_path', str(data), '--output_dir', str(out), *more]


class Proc:
    """A subprocess whose merged stdout/stderr is read line by line in a thread, so tests can wait for a line."""

    def __init__(self, cmd: Sequence[str], **env_extra: str):
        self.p = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env(**env_extra), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: List[str] = []
        self._q: 'queue.Queue[Optional[str]]' = queue.Queue()
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> str:
        deadline = time.time() + timeout
        rx = re.compile(pattern)
        while time.time() < deadline:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                break
            if line is None:
                break
            if rx.search(line):
                return line
        self.kill()
        raise AssertionError(f'{pattern!r} not seen; output:\n{self.output}')

    def send(self, sig: int) -> None:
        self.p.send_signal(sig)

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f'process did not exit within {timeout}s (hang?); output:\n{self.output}')
        self._t.join(timeout=30)  # all output read
        return rc

    def kill(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)  # the process group: torchrun's workers too
            except ProcessLookupError:
                pass
            self.p.wait(timeout=30)

    @property
    def output(self) -> str:
        return ''.join(self.lines)


# ---- comparing runs ------------------------------------------------------------------------------------------

LOGGED = re.compile(r'^(train_loss.*|train_lr|epoch|step|frozen_units|active_stages|unit_lr|knn_.*)$')


def logged(out: Path) -> List[dict]:
    """log.txt records without timing fields."""
    recs = [json.loads(l) for l in (out / 'log.txt').read_text().splitlines() if l.strip()]
    return [{k: v for k, v in r.items() if LOGGED.match(k)} for r in recs]


def load(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same(a, b, where: str = '') -> None:
    """Bit-exact recursive equality of checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f'{where}: tensors differ (max abs diff {(a.double() - b.double()).abs().max()})'
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f'{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}'
        for k in a:
            assert_same(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{where}[{i}]')
    else:
        assert a == b, f'{where}: {a!r} != {b!r}'


def assert_same_run(ref: Path, out: Path) -> None:
    """Final weights, optimizer state (incl. LR), step, frozen set, RNG state and logged losses are bit-identical."""
    a, b = load(ref / 'checkpoint-last.pth'), load(out / 'checkpoint-last.pth')
    for k in ('model', 'optimizer', 'epoch', 'step', 'freezeout', 'scaler', 'rng'):
        assert_same(a[k], b[k], k)
    assert b['freezeout']['num_frozen'] == 4
    assert logged(ref) == logged(out)


def snapshot(d: Path) -> Dict[str, str]:
    """name -> sha256 of every file under ``d`` but the folder lock (present only while a run holds the folder)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob('*'))
            if p.is_file() and p.name != '.vitfreeze.lock'}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]



def _plain(x, where='args') -> None:
    if isinstance(x, dict):
        for k, v in x.items():
            assert isinstance(k, str), where
            _plain(v, f'{where}.{k}')
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _plain(v, f'{where}[{i}]')
    else:
        assert x is None or isinstance(x, (bool, int, float, str)), f'{where}: {type(x).__name__}'



# ---- the uninterrupted reference run ---------------------------------------------------------------------------


@pytest.fixture(scope='session')
def reference(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 epochs with FreezeOut, uninterrupted; numbered checkpoints every epoch."""
    out = tmp_path_factory.mktemp('reference') / 'out'
    r = run('run_pretrain.py', pretrain_args(demo_root, out, '--save_freq', '1'))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count('FreezeOut: step') == 4
    assert [json.loads(l)['frozen_units'] for l in (out / 'log.txt').read_text().splitlines()] == [0, 2, 4]
    return out


@pytest.fixture(scope='session')
def existing(reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output_dir as a user would have it after epoch 0: checkpoint-last.pth and log.txt (copied per test)."""
    d = tmp_path_factory.mktemp('existing') / 'out'
    d.mkdir()
    shutil.copy(reference / 'checkpoint-0.pth', d / 'checkpoint-last.pth')
    (d / 'log.txt').write_text((reference / 'log.txt').read_text().splitlines(keepends=True)[0])
    return d



PARALLEL = 2  # the bad-input runs are ~all interpreter start-up: two at a time on two cores


# ---- evaluators: fine-tune / linear probe / k-NN ------------------------------------------------------------------

EVAL = ['--input_size', '32', '--batch_size', '4', '--num_workers', '0', '--device', 'cpu', '--seed', '3']
FT = ['--lr', '1e-2', '--epochs', '2', '--warmup_epochs', '1', '--save_freq', '1']  # ~50% on the demo set: a signal
LP = ['--lr', '1.0', '--epochs', '2', '--warmup_epochs', '1', '--save_freq', '1']


def _parallel(jobs: Dict[str, tuple]) -> Dict[str, subprocess.CompletedProcess]:
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(PARALLEL) as pool:
        futs = {k: pool.submit(run, *job) for k, job in jobs.items()}
        return {k: f.result() for k, f in futs.items()}


@pytest.fixture(scope='session')
def evaluated(reference: Path, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Uninterrupted fine-tune and linear-probe runs (2 epochs each) from the pre-training reference."""
    d = tmp_path_factory.mktemp('evaluated')
    pre = ['--finetune', str(reference / 'checkpoint-2.pth'), '--data_path', str(demo_root)]
    res = _parallel({'ft': ('run_finetune.py', [*EVAL, *FT, *pre, '--output_dir', d / 'ft']),
                     'lp': ('run_linprobe.py', [*EVAL, *LP, *pre, '--output_dir', d / 'lp'])})
    for k, r in res.items():
        assert r.returncode == 0, (k, r.stdout[-2000:], r.stderr[-2000:])
    return {'ft': d / 'ft', 'lp': d / 'lp', 'pre': reference / 'checkpoint-2.pth'}



def logged_eval(out: Path) -> List[dict]:
    recs = [json.loads(l) for l in (out / 'log.txt').read_text().splitlines() if l.strip()]
    return [{k: v for k, v in r.items() if k.startswith(('train_loss', 'train_lr', 'test_', 'epoch'))} for r in recs]


