"""Reliability through the real CLI: exact resume, crash-safe checkpoints, signals, NaN, bad input, DDP on CPU.

Every test runs the scripts as subprocesses (bounded by a timeout) on the tiny demo set of ``conftest.py``
(32 px images, patch 4, embed 64, depth 4, heads 4, batch 4, ``--num_workers 0``, ``OMP_NUM_THREADS=1``).

Test-only hooks used (all read from the environment, all no-ops when unset):
  * ``VITFREEZE_TEST_PAUSE_IN_SAVE=<s>``: pause between writing a checkpoint's temp file and renaming it;
  * ``VITFREEZE_TEST_NAN_AT_STEP=<n>``: replace the loss of global micro-step ``n`` with NaN;
  * ``VITFREEZE_TEST_DUMP_RANK_WEIGHTS=<dir>``: every rank writes digests of its weights after each epoch.

``python tests/test_reliability.py --table`` runs the bad-input cases and prints the message table (markdown).
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
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
# 32 images / batch 4 = 8 iterations per epoch, T = 24 steps, W = 8. Linear t_0 = 0.3 over 5 units freezes the
# embedding at step 8 (epoch 1 start), block1 at 12 (mid epoch 1), block2 at 16 (epoch 2 start), block3 at 20.
FREEZE = ['--how_scale', 'linear', '--t_0', '0.3']
EPOCHS = 3
ITERS = 8


def env(**extra: str) -> Dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith('VITFREEZE_TEST_')}
    e.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **extra)
    return e


def run(script: str, args: Sequence[str], timeout: float = TIMEOUT, **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(REPO / script), *map(str, args)], cwd=REPO, env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)


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
    """name -> sha256 of every file under ``d``."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob('*'))
            if p.is_file()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ---- the uninterrupted reference run ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def reference(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 epochs with FreezeOut, uninterrupted; numbered checkpoints every epoch."""
    out = tmp_path_factory.mktemp('reference') / 'out'
    r = run('run_pretrain.py', pretrain_args(demo_root, out, '--save_freq', '1'))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count('FreezeOut: step') == 4
    assert [json.loads(l)['frozen_units'] for l in (out / 'log.txt').read_text().splitlines()] == [0, 2, 4]
    return out


@pytest.fixture(scope='module')
def existing(reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output_dir as a user would have it after epoch 0: checkpoint-last.pth and log.txt (copied per test)."""
    d = tmp_path_factory.mktemp('existing') / 'out'
    d.mkdir()
    shutil.copy(reference / 'checkpoint-0.pth', d / 'checkpoint-last.pth')
    (d / 'log.txt').write_text((reference / 'log.txt').read_text().splitlines(keepends=True)[0])
    return d


# ---- 1. exact resume -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_from_epoch_boundary_checkpoint_is_bit_exact(reference: Path, demo_root: Path, tmp_path: Path) -> None:
    """Interrupted right after epoch 1 (2 units already frozen): the copied checkpoint-1 + `--resume` ≡ reference."""
    out = tmp_path / 'out'
    out.mkdir()
    shutil.copy(reference / 'checkpoint-1.pth', tmp_path / 'ckpt1.pth')
    (out / 'log.txt').write_text(''.join((reference / 'log.txt').read_text().splitlines(keepends=True)[:2]))
    r = run('run_pretrain.py', pretrain_args(demo_root, out, '--resume', tmp_path / 'ckpt1.pth'))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'epoch 1 done, optimizer step 16' in r.stdout
    assert 'warning: resuming' not in r.stdout
    assert_same_run(reference, out)


@pytest.mark.slow
def test_sigterm_during_save_finishes_the_save_then_stops_and_resumes_exactly(reference: Path, demo_root: Path,
                                                                             tmp_path: Path) -> None:
    """SIGTERM while checkpoint-last of epoch 0 is being written: the save completes, the run stops at epoch 1
    iteration 0 with exit 143 and one line; rerunning the same command (auto-resume) ≡ the uninterrupted run."""
    out = tmp_path / 'out'
    args = pretrain_args(demo_root, out, '--save_freq', '1')
    p = Proc([PY, REPO / 'run_pretrain.py', *args], VITFREEZE_TEST_PAUSE_IN_SAVE='2.5')
    p.wait_for(r'\[test hook\] pausing .* inside save of .*checkpoint-last\.pth')
    p.send(signal.SIGTERM)
    assert p.wait() == 128 + signal.SIGTERM
    last = f'{out / "checkpoint-last.pth"}'
    assert (f'interrupted by SIGTERM at epoch 1 iteration 0; last checkpoint: {last} (epoch 0); rerun the same '
            f'command to resume') in p.output, p.output
    assert 'Traceback' not in p.output
    assert sorted(os.listdir(out)) == ['checkpoint-0.pth', 'checkpoint-last.pth', 'log.txt']  # no temp file left
    assert load(out / 'checkpoint-last.pth')['epoch'] == 0
    assert len(logged(out)) == 1
    r = run('run_pretrain.py', args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'Auto resume checkpoint: {last}' in r.stdout
    assert_same_run(reference, out)


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGINT])
def test_kill_mid_epoch_after_freezing_then_auto_resume_is_bit_exact(sig: int, reference: Path, demo_root: Path,
                                                                      tmp_path: Path) -> None:
    """Killed (SIGKILL) or interrupted (SIGINT) inside epoch 2, after 2 units froze: the files are those of epoch 1;
    auto-resume ≡ reference (resumed for SIGKILL only: SIGINT leaves the very same files, checked by hash)."""
    out = tmp_path / 'out'
    args = pretrain_args(demo_root, out)
    p = Proc([PY, REPO / 'run_pretrain.py', *args])
    p.wait_for(r'Epoch: \[2\]\s+\[0/8\]')  # epoch 1's checkpoint-last exists; epoch 2 is under way
    before = snapshot(out)
    p.send(sig)
    rc = p.wait()
    ck = load(out / 'checkpoint-last.pth')
    assert ck['epoch'] == 1 and ck['freezeout']['num_frozen'] == 2
    if sig == signal.SIGINT:
        assert rc == 130, p.output
        assert re.search(r'interrupted by SIGINT at epoch 2 iteration \d; last checkpoint: .*checkpoint-last\.pth '
                         r'\(epoch 1\); rerun the same command to resume', p.output), p.output
        assert 'Traceback' not in p.output
        assert snapshot(out) == before  # nothing of epoch 2 written
        return
    assert rc == -signal.SIGKILL
    r = run('run_pretrain.py', args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Auto resume checkpoint:' in r.stdout and 'epoch 1 done, optimizer step 16' in r.stdout
    assert_same_run(reference, out)


def _job_changed_flags(tmp: Path, demo: Path, ref: Path, existing_dir: Path):
    out = tmp / 'out'
    out.mkdir()
    shutil.copy(ref / 'checkpoint-last.pth', out / 'checkpoint-last.pth')
    return run('run_pretrain.py', pretrain_args(demo, out, '--blr', '2e-2', '--mask_ratio', '0.5'))


def test_resume_with_changed_flags_warns(bad_input_results) -> None:
    r = bad_input_results['_changed_flags']
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: resuming with --blr 0.02 but the checkpoint was trained with 0.01" in r.stdout
    assert "warning: resuming with --mask_ratio 0.5 but the checkpoint was trained with 0.75" in r.stdout


# ---- 2. crash-safe checkpoints ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_during_save_leaves_no_truncated_checkpoint(reference: Path, demo_root: Path, tmp_path: Path) -> None:
    """SIGKILL while checkpoint-last.pth of epoch 0 is half-saved: only the temp file exists. Auto-resume ignores
    it, skips a planted corrupt checkpoint-9.pth saying why, resumes from checkpoint-0.pth and ends ≡ reference;
    `--keep_last 1` then prunes the old numbered files but keeps the newest."""
    out = tmp_path / 'out'
    args = pretrain_args(demo_root, out, '--save_freq', '1')
    p = Proc([PY, REPO / 'run_pretrain.py', *args], VITFREEZE_TEST_PAUSE_IN_SAVE='30')
    p.wait_for(r'\[test hook\] pausing .* inside save of .*checkpoint-0\.pth')
    # checkpoint-0.pth is complete in its temp file only; kill now: no final name may hold a partial file
    p.send(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    names = sorted(os.listdir(out))
    assert names == ['.checkpoint-0.pth.tmp-%d' % p.p.pid, 'log.txt'], names
    # a second run, killed while writing checkpoint-last.pth (checkpoint-0.pth is then complete)
    p = Proc([PY, REPO / 'run_pretrain.py', *args], VITFREEZE_TEST_PAUSE_IN_SAVE='2')
    p.wait_for(r'\[test hook\] pausing .* inside save of .*checkpoint-last\.pth')
    p.send(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    names = sorted(n for n in os.listdir(out) if not n.startswith('.'))
    assert names == ['checkpoint-0.pth', 'log.txt'], names
    assert any(n.startswith('.checkpoint-last.pth.tmp-') for n in os.listdir(out))
    for f in out.glob('checkpoint-*.pth'):
        load(f)  # everything under a final name loads
    # log.txt: each killed run logged epoch 0 (its record precedes its checkpoint); the second one, starting
    # afresh, first dropped the first run's record, so every epoch is logged once
    assert [x['epoch'] for x in logged(out)] == [0]
    (out / 'checkpoint-9.pth').write_bytes((out / 'checkpoint-0.pth').read_bytes()[:100_000])  # truncated
    r = run('run_pretrain.py', [*args, '--keep_last', '1'])
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r'auto-resume: skipping .*checkpoint-9\.pth: .*not a readable checkpoint', r.stdout), r.stdout
    assert f'Auto resume checkpoint: {out / "checkpoint-0.pth"}' in r.stdout
    assert_same_run(reference, out)
    assert sorted(n for n in os.listdir(out) if not n.startswith('.')) == \
        ['checkpoint-2.pth', 'checkpoint-last.pth', 'log.txt']


# ---- 3. non-finite loss ----------------------------------------------------------------------------------------


def _job_nan(tmp: Path, demo: Path, ref: Path, existing_dir: Path):
    out = tmp / 'out'
    shutil.copytree(existing_dir, out)
    before = snapshot(out)
    r = run('run_pretrain.py', pretrain_args(demo, out), VITFREEZE_TEST_NAN_AT_STEP=str(ITERS + 3))
    return r, out, before


def test_nan_loss_stops_with_message_and_writes_nothing(bad_input_results) -> None:
    """NaN loss at global micro-step 11 (epoch 1, iteration 3) after resuming from epoch 0: exit 3, one line naming
    epoch, iteration and the stage losses; checkpoint-last.pth and log.txt byte-identical."""
    r, out, before = bad_input_results['_nan']
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'Traceback' not in r.stderr
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1, r.stderr
    assert re.fullmatch(r'error: loss is nan at epoch 1, iteration 3/8 \(stage0=[\d.]+, stage1=[\d.]+, '
                        r'stage2=[\d.]+, stage3=[\d.]+\); stopping without writing a checkpoint.*', err[0]), err[0]
    assert snapshot(out) == before


# ---- 4. bad input: one line, exit != 0, no traceback, nothing written over --------------------------------------


def _empty(tmp: Path) -> Path:
    (tmp / 'empty').mkdir()
    return tmp / 'empty'


def _no_images(tmp: Path) -> Path:
    for c in ('a', 'b'):
        (tmp / 'noimg' / 'train' / c).mkdir(parents=True)
        (tmp / 'noimg' / 'train' / c / 'readme.txt').write_text('not an image')
    return tmp / 'noimg'


def _corrupt(tmp: Path, demo: Path) -> Path:
    shutil.copytree(demo, tmp / 'data')
    bad = sorted((tmp / 'data' / 'train').rglob('*.jpg'))[3]
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    return tmp / 'data'


def _text(tmp: Path) -> Path:
    (tmp / 'notes.txt').write_text('this is not a checkpoint\n')
    return tmp / 'notes.txt'


def _under_file(tmp: Path) -> Path:
    (tmp / 'afile').write_text('x')
    return tmp / 'afile' / 'out'


# id -> (builder of extra/override args given tmp, demo, reference; expected regex of the one line)
# Each builder returns (args, data_path or None (= demo train data)).
BAD_INPUTS = {
    'data_path_missing': (lambda t, d, ref: ['--data_path', t / 'nope'],
                          r'error: --data_path .*nope does not exist'),
    'data_path_empty': (lambda t, d, ref: ['--data_path', _empty(t)],
                        r'error: --data_path .*empty: no image files found'),
    'data_path_no_images': (lambda t, d, ref: ['--data_path', _no_images(t)],
                            r'error: --data_path .*noimg: no image files found'),
    'corrupt_image': (lambda t, d, ref: ['--data_path', _corrupt(t, d)],
                      r'error: cannot read image .*\.jpg: .*--bad_images skip'),
    't_0_above_1': (lambda t, d, ref: ['--t_0', '1.5'], r'error: --t_0 1\.5: must be in \(0, 1\]'),
    'how_scale_unknown': (lambda t, d, ref: ['--how_scale', 'quartic'],
                          r"error: argument --how_scale: invalid choice: 'quartic'"),
    'model_unknown': (lambda t, d, ref: ['--model', 'MIM_vit_gigantic_patch16'],
                      r'error: .*MIM_vit_gigantic_patch16'),
    'input_size_not_divisible': (lambda t, d, ref: ['--input_size', '30'], r'error: .*30.*patch.*4|error: .*4.*30'),
    'hog_cell_not_integer': (lambda t, d, ref: ['--patch_size', '6', '--input_size', '36'],
                             r'error: HOG cell of patch_size/scale = 6/4 = 1\.5 px is not a whole number'),
    'batch_size_0': (lambda t, d, ref: ['--batch_size', '0'], r'error: --batch_size 0: must be >= 1'),
    'accum_iter_0': (lambda t, d, ref: ['--accum_iter', '0'], r'error: --accum_iter 0: must be >= 1'),
    'mask_ratio_1': (lambda t, d, ref: ['--mask_ratio', '1.0'], r'error: --mask_ratio 1\.0: must be in \[0, 1\)'),
    'resume_missing': (lambda t, d, ref: ['--resume', t / 'missing.pth'],
                       r'error: --resume .*missing\.pth: file not found'),
    'resume_not_checkpoint': (lambda t, d, ref: ['--resume', _text(t)],
                              r'error: --resume .*notes\.txt: not a PyTorch checkpoint \(not written by torch\.save\)'),
    'resume_other_architecture': (lambda t, d, ref: ['--resume', ref / 'checkpoint-0.pth', '--embed_dim', '32'],
                                  r'error: --resume .*checkpoint-0\.pth: checkpoint does not match'),
    'resume_frozen_without_freezeout': (lambda t, d, ref: ['--resume', ref / 'checkpoint-1.pth'],
                                        r'error: --resume .*checkpoint-1\.pth: the checkpoint has frozen FreezeOut'),
    'resume_freezeout_optimizer_without_freezeout': (lambda t, d, ref: ['--resume', ref / 'checkpoint-0.pth'],
                                                     r'error: --resume .*checkpoint-0\.pth: optimizer state does not '
                                                     r'match these flags'),
    'output_dir_not_writable': (lambda t, d, ref: ['--output_dir', _under_file(t)],
                                r'error: --output_dir .*afile/out: cannot create directory'),
}


NO_FREEZEOUT = {'resume_frozen_without_freezeout', 'resume_freezeout_optimizer_without_freezeout'}
PARALLEL = 2  # the bad-input runs are ~all interpreter start-up: two at a time on two cores


def run_bad_input(case: str, tmp: Path, demo: Path, ref: Path, existing_dir: Path):
    build, pattern = BAD_INPUTS[case]
    out = tmp / 'out'
    shutil.copytree(existing_dir, out)
    before = snapshot(out)
    extra = [str(a) for a in build(tmp, demo, ref)]
    args = pretrain_args(demo, out) + extra
    if case in NO_FREEZEOUT:
        args = [a for a in args if a not in FREEZE]
    r = run('run_pretrain.py', args, timeout=120)
    return r, pattern, out, before, extra


@pytest.fixture(scope='module')
def bad_input_results(demo_root: Path, reference: Path, existing: Path, tmp_path_factory: pytest.TempPathFactory):
    """All bad-input cases, plus the NaN, --bad_images skip and changed-flags runs (keys ``_nan``, ``_skip``,
    ``_changed_flags``), run PARALLEL at a time, each in its own tmp dir (with its own copy of ``existing``)."""
    from concurrent.futures import ThreadPoolExecutor
    jobs = {c: run_bad_input for c in BAD_INPUTS}
    jobs.update(_nan=_job_nan, _skip=_job_skip, _changed_flags=_job_changed_flags)
    with ThreadPoolExecutor(PARALLEL) as pool:
        futs = {c: pool.submit(fn, *((c,) if fn is run_bad_input else ()), tmp_path_factory.mktemp(c.strip('_')),
                               demo_root, reference, existing) for c, fn in jobs.items()}
        return {c: f.result() for c, f in futs.items()}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_one_line_and_nothing_written(case: str, bad_input_results) -> None:
    r, pattern, out, before, _ = bad_input_results[case]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert 'Traceback' not in r.stderr + r.stdout
    err = [l for l in r.stderr.splitlines() if l.startswith('error')]
    assert len(err) == 1, r.stderr
    assert re.search(pattern, err[0]), err[0]
    assert err[0] == [l for l in r.stderr.splitlines() if l.strip()][-1]  # the last word on stderr
    if out.exists():
        assert snapshot(out) == before


def _job_skip(tmp: Path, demo: Path, ref: Path, existing_dir: Path):
    data = _corrupt(tmp, demo)
    out = tmp / 'out'
    return run('run_pretrain.py', pretrain_args(data, out, '--bad_images', 'skip', '--no_auto_resume', epochs=1)), out


def test_corrupt_image_skip_warns_and_continues(bad_input_results) -> None:
    r, out = bad_input_results['_skip']
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r'skipping unreadable image .*\.jpg', r.stdout + r.stderr)
    assert (out / 'checkpoint-0.pth').exists()


# ---- 5. safe loading -------------------------------------------------------------------------------------------


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


def test_every_checkpoint_loads_weights_only_with_plain_args(reference: Path) -> None:
    files = sorted(reference.glob('checkpoint-*.pth'))
    assert [f.name for f in files] == ['checkpoint-0.pth', 'checkpoint-1.pth', 'checkpoint-2.pth',
                                       'checkpoint-last.pth']
    for f in files:
        ck = torch.load(f, map_location='cpu', weights_only=True)
        assert type(ck['args']) is dict
        _plain(ck['args'])
        for k in ('model', 'optimizer', 'epoch', 'step', 'args', 'rng', 'freezeout'):
            assert k in ck, (f, k)


# ---- 6. multi-process DDP on CPU -------------------------------------------------------------------------------


DDP_ARGS = ['--batch_size', '4', '--accum_iter', '2']  # per rank: 16 images = 4 iterations = 2 steps; T = 6 steps


def _launch(launcher: str, port: int, script_args: Sequence[str]) -> List[str]:
    mod = 'torch.distributed.run' if launcher == 'torchrun' else 'torch.distributed.launch'
    return [PY, '-m', mod, '--nproc_per_node=2', f'--master_port={port}', str(REPO / 'run_pretrain.py'),
            *map(str, script_args)]


@pytest.mark.slow
@pytest.mark.parametrize('launcher', ['torchrun', 'launch'])
def test_ddp_two_processes_freezeout(launcher: str, demo_root: Path, tmp_path: Path) -> None:
    out, dumps = tmp_path / 'out', tmp_path / 'dumps'
    args = pretrain_args(demo_root, out, *DDP_ARGS)
    r = subprocess.run(_launch(launcher, free_port(), args), cwd=REPO, capture_output=True, text=True,
                       timeout=TIMEOUT, env=env(VITFREEZE_TEST_DUMP_RANK_WEIGHTS=str(dumps)))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert 'effective batch size: 16 (4 x 2 x 2 processes)' in r.stdout
    assert 'actual lr: 6.25e-04' in r.stdout  # blr 1e-2 * 16 / 256
    assert len(re.findall(r'FreezeOut: step \d+ \(epoch \d\): frozen units', r.stdout)) >= 2
    assert r.stdout.count('| distributed init (rank') == 2
    # only rank 0 writes: one log record per epoch, one set of checkpoints, no stray temp files
    assert sorted(os.listdir(out)) == ['checkpoint-0.pth', 'checkpoint-2.pth', 'checkpoint-last.pth', 'log.txt']
    recs = logged(out)
    assert [x['epoch'] for x in recs] == [0, 1, 2] and recs[-1]['frozen_units'] >= 2
    # every rank holds the same weights and optimizer state after every epoch, and they are what rank 0 saved
    for epoch in range(EPOCHS):
        d = [json.loads((dumps / f'rank{k}-epoch{epoch}.json').read_text()) for k in (0, 1)]
        assert d[0]['world_size'] == 2
        assert d[0]['model'] == d[1]['model'] and d[0]['optimizer'] == d[1]['optimizer'], epoch
    h = hashlib.sha256()
    for k, t in sorted(load(out / 'checkpoint-last.pth')['model'].items()):
        h.update(k.encode())
        h.update(t.contiguous().numpy().tobytes())
    assert h.hexdigest() == json.loads((dumps / f'rank0-epoch{EPOCHS - 1}.json').read_text())['model']


@pytest.mark.slow
def test_ddp_sigterm_stops_all_ranks_at_the_same_step(demo_root: Path, tmp_path: Path) -> None:
    """SIGTERM to the torchrun agent (which forwards it): ranks agree on the stop, nobody hangs in a collective."""
    out = tmp_path / 'out'
    args = pretrain_args(demo_root, out, *DDP_ARGS, epochs=20)
    p = Proc(_launch('torchrun', free_port(), args))
    p.wait_for(r'Epoch: \[1\]')
    p.send(signal.SIGTERM)
    rc = p.wait(timeout=60)
    assert rc != 0
    assert re.search(r'interrupted by SIGTERM at epoch \d+ iteration \d; last checkpoint: .*checkpoint-last\.pth '
                     r'\(epoch \d+\)', p.output), p.output
    ck = load(out / 'checkpoint-last.pth')
    assert len(logged(out)) == ck['epoch'] + 1


# ---- evaluators: fine-tune / linear probe / k-NN ------------------------------------------------------------------

EVAL = ['--input_size', '32', '--batch_size', '4', '--num_workers', '0', '--device', 'cpu', '--seed', '3']
FT = ['--lr', '1e-2', '--epochs', '2', '--warmup_epochs', '1', '--save_freq', '1']  # ~50% on the demo set: a signal
LP = ['--lr', '1.0', '--epochs', '2', '--warmup_epochs', '1', '--save_freq', '1']


def _parallel(jobs: Dict[str, tuple]) -> Dict[str, subprocess.CompletedProcess]:
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(PARALLEL) as pool:
        futs = {k: pool.submit(run, *job) for k, job in jobs.items()}
        return {k: f.result() for k, f in futs.items()}


@pytest.fixture(scope='module')
def evaluated(reference: Path, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Uninterrupted fine-tune and linear-probe runs (2 epochs each) from the pre-training reference."""
    d = tmp_path_factory.mktemp('evaluated')
    pre = ['--finetune', str(reference / 'checkpoint-2.pth'), '--data_path', str(demo_root)]
    res = _parallel({'ft': ('run_finetune.py', [*EVAL, *FT, *pre, '--output_dir', d / 'ft']),
                     'lp': ('run_linprobe.py', [*EVAL, *LP, *pre, '--output_dir', d / 'lp'])})
    for k, r in res.items():
        assert r.returncode == 0, (k, r.stdout[-2000:], r.stderr[-2000:])
    return {'ft': d / 'ft', 'lp': d / 'lp', 'pre': reference / 'checkpoint-2.pth'}


@pytest.mark.slow
def test_finetune_sigterm_then_rerun_is_bit_exact(evaluated: Dict[str, Path], demo_root: Path, tmp_path: Path) -> None:
    """Fine-tuning: SIGTERM during the save of epoch 0 -> save completes, exit 143, one line; rerunning the same
    command (auto-resume wins over --finetune) ends bit-identical to the uninterrupted run, log included."""
    out = tmp_path / 'ft'
    args = [*EVAL, *FT, '--finetune', evaluated['pre'], '--data_path', demo_root, '--output_dir', out]
    p = Proc([PY, REPO / 'run_finetune.py', *args], VITFREEZE_TEST_PAUSE_IN_SAVE='2.5')
    p.wait_for(r'\[test hook\] pausing .* inside save of .*checkpoint-last\.pth')
    p.send(signal.SIGTERM)
    assert p.wait() == 128 + signal.SIGTERM, p.output
    assert (f'interrupted by SIGTERM at epoch 1 iteration 0; last checkpoint: {out / "checkpoint-last.pth"} '
            f'(epoch 0); rerun the same command to resume') in p.output, p.output
    assert 'Traceback' not in p.output
    r = run('run_finetune.py', args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Auto resume checkpoint' in r.stdout
    a, b = load(evaluated['ft'] / 'checkpoint-last.pth'), load(out / 'checkpoint-last.pth')
    for k in ('model', 'optimizer', 'epoch', 'rng', 'max_accuracy'):
        assert_same(a[k], b[k], k)
    assert logged_eval(evaluated['ft']) == logged_eval(out)


def logged_eval(out: Path) -> List[dict]:
    recs = [json.loads(l) for l in (out / 'log.txt').read_text().splitlines() if l.strip()]
    return [{k: v for k, v in r.items() if k.startswith(('train_loss', 'train_lr', 'test_', 'epoch'))} for r in recs]


def _few_val(tmp: Path, demo: Path) -> Path:
    """train/ with 4 classes, val/ with 2 images (in 2 of the class folders)."""
    shutil.copytree(demo / 'train', tmp / 'fewval' / 'train')
    for c in sorted(os.listdir(demo / 'val'))[:2]:
        (tmp / 'fewval' / 'val' / c).mkdir(parents=True)
        f = sorted((demo / 'val' / c).iterdir())[0]
        shutil.copy(f, tmp / 'fewval' / 'val' / c / f.name)
    return tmp / 'fewval'


# id -> (script, builder(tmp, demo, evaluated) -> extra args, expected regex). Run with --no_auto_resume unless
# the case is about --resume, in an output_dir holding a fine-tuning checkpoint-last.pth and log.txt.
EVAL_BAD_INPUTS = {
    'finetune_other_architecture': ('run_finetune.py', lambda t, d, e: ['--finetune', e['pre'], '--embed_dim', '32'],
                                    r'error: --finetune .*checkpoint-2\.pth: checkpoint architecture does not match '
                                    r'the model: checkpoint has embed_dim=64.* model has embed_dim=32'),
    'finetune_not_checkpoint': ('run_linprobe.py', lambda t, d, e: ['--finetune', _text(t)],
                                r'error: --finetune .*notes\.txt: not a PyTorch checkpoint'),
    'resume_pretrain_checkpoint_in_finetune': ('run_finetune.py', lambda t, d, e: ['--resume', e['pre']],
                                               r'error: --resume .*checkpoint-2\.pth: not a checkpoint of this model'),
    'nb_classes_smaller_than_folders': ('run_finetune.py', lambda t, d, e: ['--nb_classes', '2'],
                                        r'error: --nb_classes 2 is smaller than the 4 class folders'),
    'knn_fewer_val_images_than_classes': ('run_knn.py', lambda t, d, e: ['--finetune', e['pre'], '--data_path',
                                                                          _few_val(t, d)],
                                          r'error: --data_path .*fewval: val/ has 2 images but train/ has 4 classes'),
}


def run_eval_bad_input(case: str, tmp: Path, demo: Path, evaluated_dirs: Dict[str, Path]):
    script, build, pattern = EVAL_BAD_INPUTS[case]
    out = tmp / 'out'
    out.mkdir()
    shutil.copy(evaluated_dirs['ft'] / 'checkpoint-0.pth', out / 'checkpoint-last.pth')
    (out / 'log.txt').write_text((evaluated_dirs['ft'] / 'log.txt').read_text().splitlines(keepends=True)[0])
    before = snapshot(out)
    extra = [str(a) for a in build(tmp, demo, evaluated_dirs)]
    args = [*EVAL, '--data_path', str(demo), '--output_dir', str(out), *extra]
    if '--resume' not in extra:
        args.append('--no_auto_resume')
    r = run(script, args, timeout=120)
    return r, pattern, out, before, [script, *extra]


@pytest.fixture(scope='module')
def eval_bad_input_results(evaluated: Dict[str, Path], demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    from concurrent.futures import ThreadPoolExecutor
    tmps = {c: tmp_path_factory.mktemp(c) for c in EVAL_BAD_INPUTS}
    with ThreadPoolExecutor(PARALLEL) as pool:
        futs = {c: pool.submit(run_eval_bad_input, c, tmps[c], demo_root, evaluated) for c in EVAL_BAD_INPUTS}
        return {c: f.result() for c, f in futs.items()}


@pytest.mark.parametrize('case', list(EVAL_BAD_INPUTS))
def test_evaluator_bad_input_one_line_and_nothing_written(case: str, eval_bad_input_results) -> None:
    _check_bad_input(eval_bad_input_results[case])


def _check_bad_input(result) -> None:
    r, pattern, out, before, _ = result
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert 'Traceback' not in r.stderr + r.stdout
    err = [l for l in r.stderr.splitlines() if l.startswith('error')]
    assert len(err) == 1, r.stderr
    assert re.search(pattern, err[0]), err[0]
    assert err[0] == [l for l in r.stderr.splitlines() if l.strip()][-1]
    assert snapshot(out) == before


RESULT_LINES = re.compile(r'^(\* Acc@1 .*|k-NN k=\d+: .*)$', re.M)


@pytest.mark.slow
def test_dist_eval_two_processes_equal_one(evaluated: Dict[str, Path], demo_root: Path, tmp_path: Path) -> None:
    """Fine-tune / linear-probe (--eval of the trained checkpoints) and k-NN: `--dist_eval` over 2 gloo processes
    prints exactly the accuracies and loss of one process (batch 3: uneven shards and batches)."""
    common = [*EVAL, '--batch_size', '3', '--data_path', str(demo_root), '--dist_eval', '--no_auto_resume']
    jobs = {'finetune': ('run_finetune.py', ['--eval', '--resume', evaluated['ft'] / 'checkpoint-last.pth']),
            'linprobe': ('run_linprobe.py', ['--eval', '--resume', evaluated['lp'] / 'checkpoint-last.pth']),
            'knn': ('run_knn.py', ['--finetune', evaluated['pre']])}
    single = _parallel({k: (s, [*common, *a, '--output_dir', tmp_path / f'{k}1']) for k, (s, a) in jobs.items()})
    for k, (script, a) in jobs.items():
        cmd = [PY, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
               str(REPO / script), *map(str, common), *map(str, a), '--output_dir', str(tmp_path / f'{k}2')]
        r2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, env=env())
        r1 = single[k]
        assert r1.returncode == 0 and r2.returncode == 0, (k, r1.stderr[-2000:], r2.stdout[-2000:], r2.stderr[-2000:])
        assert r2.stdout.count('| distributed init (rank') == 2
        lines1, lines2 = RESULT_LINES.findall(r1.stdout), RESULT_LINES.findall(r2.stdout)
        assert lines1 and lines1 == lines2, (k, lines1, lines2)


def test_evaluator_checkpoints_load_weights_only(evaluated: Dict[str, Path]) -> None:
    for d in (evaluated['ft'], evaluated['lp']):
        files = sorted(d.glob('checkpoint-*.pth'))
        assert len(files) == 3, files
        for f in files:
            ck = torch.load(f, map_location='cpu', weights_only=True)
            assert type(ck['args']) is dict
            _plain(ck['args'])


if __name__ == '__main__' and '--table' in sys.argv:
    import tempfile
    sys.path.insert(0, str(REPO))
    from util.demo_data import make_demo_dataset
    from tests.conftest import DEMO_KW
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo = make_demo_dataset(tmp / 'demo', **DEMO_KW)
        ref = tmp / 'ref'
        r = run('run_pretrain.py', pretrain_args(demo, ref, '--save_freq', '1'))
        assert r.returncode == 0, r.stderr
        ex = tmp / 'existing'
        ex.mkdir()
        shutil.copy(ref / 'checkpoint-0.pth', ex / 'checkpoint-last.pth')
        (ex / 'log.txt').write_text((ref / 'log.txt').read_text().splitlines(keepends=True)[0])
        r = run('run_finetune.py', [*EVAL, *FT, '--finetune', ref / 'checkpoint-2.pth', '--data_path', demo,
                                    '--output_dir', tmp / 'ft'])
        assert r.returncode == 0, r.stderr
        ev = {'ft': tmp / 'ft', 'pre': ref / 'checkpoint-2.pth'}
        print('| bad input | script and flags | exit | message (output_dir files) |\n|---|---|---|---|')
        cases = [(c, run_bad_input, (demo, ref, ex)) for c in BAD_INPUTS] + \
                [(c, run_eval_bad_input, (demo, ev)) for c in EVAL_BAD_INPUTS]
        for case, fn, extra_args in cases:
            t = tmp / case
            t.mkdir()
            r, _, out, before, extra = fn(case, t, *extra_args)
            msg = [l for l in r.stderr.splitlines() if l.strip()][-1]
            flags = ' '.join(extra)
            if fn is run_bad_input:
                flags = 'run_pretrain.py ' + flags
            for path, name in ((t, '<tmp>'), (ref, '<pretrain>'), (tmp / 'ft', '<finetune>')):
                msg, flags = msg.replace(str(path), name), flags.replace(str(path), name)
            same = 'unchanged' if not out.exists() or snapshot(out) == before else 'CHANGED'
            print(f'| {case} | `{flags}` | {r.returncode} | `{msg}` ({same}) |', flush=True)
