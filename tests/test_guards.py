"""Issue 14 through the real CLI: one run per folder, the folder lock, checksums, non-finite weights, write errors,
SIGHUP and stale temp files, SIGTERM to run_knn, safe data scans, 16-bit PNGs, the shared k-NN class check, and
``record.sh --output_dir=``.

Tiny configuration (``conftest.TINY_PRETRAIN_FLAGS``: 32 px, patch 4, dim 64, depth 4, batch 8 = 4 iterations per
epoch on the 32-image demo set), ``--num_workers 0``, one thread. Faults: ``VITFREEZE_TEST_PAUSE_IN_SAVE`` (pause
inside a checkpoint save, read by util/checkpoint.py), and through ``tests/hooks/sitecustomize.py``
``VITFREEZE_TEST_NAN_AT_STEP`` (NaN loss) and ``VITFREEZE_TEST_NAN_WEIGHTS_AT_EPOCH`` (NaN weights before a save).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, TINY_PRETRAIN_FLAGS, _pretrain_env

PY = sys.executable
HOOKS = REPO_ROOT / 'tests' / 'hooks'  # sitecustomize.py: the fault-injection hooks (VITFREEZE_TEST_*)


def hooked(**env: str) -> Dict[str, str]:
    """Environment additions that load the test hooks in the started script."""
    return dict(env, PYTHONPATH=os.pathsep.join([str(HOOKS)] + ([os.environ['PYTHONPATH']]
                                                                if os.environ.get('PYTHONPATH') else [])))


def pre_args(data: Path, out: Path, *more: str, epochs: int = 1) -> List[str]:
    return [*TINY_PRETRAIN_FLAGS, '--epochs', str(epochs), '--save_freq', '1', '--data_path', str(data),
            '--output_dir', str(out), *map(str, more)]


def snapshot(d: Path) -> Dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob('*'))
            if p.is_file()}


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert 'Traceback' not in r.stdout + r.stderr, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    errs = [l for l in lines if l.startswith('error')]
    assert len(errs) == 1 and errs[0] == lines[-1], r.stderr[-3000:]
    return errs[0]


def records(out: Path) -> List[dict]:
    recs = []
    for line in (out / 'log.txt').read_bytes().splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass
    return recs


class Proc:
    """A background run whose merged output is collected by a thread (to wait for a line)."""

    def __init__(self, args: List[str], script: str = 'run_pretrain.py', **env: str):
        self.p = subprocess.Popen([PY, str(REPO_ROOT / script), *map(str, args)], cwd=REPO_ROOT,
                                  env=_pretrain_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: List[str] = []
        self._t = threading.Thread(target=lambda: self.lines.extend(iter(self.p.stdout.readline, '')), daemon=True)
        self._t.start()

    def wait_for(self, pattern: str, timeout: float = 240) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if any(re.search(pattern, l) for l in list(self.lines)):
                return
            if self.p.poll() is not None and not self._t.is_alive():
                break
            time.sleep(0.05)
        self.p.kill()
        raise AssertionError(f'{pattern!r} not seen:\n{self.output}')

    def wait(self, timeout: float = 240) -> int:
        rc = self.p.wait(timeout=timeout)
        self._t.join(timeout=30)
        return rc

    @property
    def output(self) -> str:
        return ''.join(self.lines)


@pytest.fixture(scope='module')
def trained(demo_root: Path, run_pretrain, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch run (read-only: copy it): checkpoint-0.pth, checkpoint-last.pth, log.txt, run.json."""
    out = tmp_path_factory.mktemp('trained') / 'out'
    r = run_pretrain(pre_args(demo_root, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def copy_of(trained: Path, tmp: Path) -> Path:
    out = tmp / 'out'
    shutil.copytree(trained, out)
    return out


# ---- one run per folder: run id, refusal, --overwrite, same-run auto-resume, log trimming ------------------------


@pytest.mark.slow
def test_run_id_refuse_overwrite_checksum_and_resume_only_the_same_run(trained: Path, demo_root: Path,
                                                                        run_pretrain, tmp_path: Path) -> None:
    from util.checkpoint import load_checkpoint, state_digest
    out = copy_of(trained, tmp_path)
    rid = json.loads((out / 'run.json').read_text())['run_id']
    for name in ('checkpoint-0.pth', 'checkpoint-last.pth'):
        ck = load_checkpoint(str(out / name))
        assert ck['run_id'] == rid and ck['checksum'] == state_digest(ck)
    assert [r['run_id'] for r in records(out)] == [rid]

    before = snapshot(out)
    r = run_pretrain(pre_args(demo_root, out, '--no_auto_resume'))
    assert r.returncode == 2
    assert re.fullmatch(rf'error: --output_dir {re.escape(str(out))} holds the checkpoints of another run '
                        r'\(checkpoint-0\.pth, checkpoint-last\.pth\) and --no_auto_resume starts from scratch; '
                        r'nothing was changed\. .*--overwrite.*', one_error_line(r))
    assert snapshot(out) == before

    r = run_pretrain(pre_args(demo_root, out, '--no_auto_resume', '--overwrite'))
    assert r.returncode == 0, r.stderr[-3000:]
    prev = [p for p in out.iterdir() if p.name.startswith('previous-')]
    assert len(prev) == 1 and snapshot(prev[0]) == before  # the old run, moved aside intact
    assert f'--overwrite: the files of the previous run in {out} are moved aside before the first write' in r.stdout
    assert f'--overwrite: moved the files of the previous run into {prev[0]}' in r.stdout
    rid2 = json.loads((out / 'run.json').read_text())['run_id']
    assert rid2 != rid and [x['run_id'] for x in records(out)] == [rid2]

    # another run's newer-named checkpoint, 4 KB of damaged tensor bytes in our checkpoint-last.pth, a note,
    # non-UTF-8 bytes, another run's record, a stale record of ours
    shutil.copy(prev[0] / 'checkpoint-0.pth', out / 'checkpoint-5.pth')
    last = out / 'checkpoint-last.pth'
    b = bytearray(last.read_bytes())
    b[len(b) // 2:len(b) // 2 + 4096] = bytes(4096)  # the zip still opens: only the checksum can tell
    last.write_bytes(bytes(b))
    with open(out / 'log.txt', 'ab') as f:
        f.write(b'# note: lr looked high here\n\xff\xfe latin-1 \xe9\n')
        f.write((json.dumps({'epoch': 3, 'run_id': rid}) + '\n').encode())
        f.write((json.dumps({'epoch': 3, 'run_id': rid2}) + '\n').encode())
    r, r2 = run_pretrain.many([pre_args(demo_root, out), pre_args(demo_root, tmp_path / 'o2', '--resume', last)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'auto-resume: skipping {last}: --auto_resume {last}: checksum mismatch: the file was damaged' in r.stdout
    assert f'auto-resume: skipping {out / "checkpoint-5.pth"}: it belongs to run {rid}, not to run {rid2}' in r.stdout
    assert f'Auto resume checkpoint: {out / "checkpoint-0.pth"}' in r.stdout
    raw = (out / 'log.txt').read_bytes()
    assert b'# note: lr looked high here\n\xff\xfe latin-1 \xe9\n' in raw  # lines it does not understand: kept
    assert [(x['epoch'], x['run_id']) for x in records(out)] == [(0, rid2), (3, rid)]  # our stale epoch 3: dropped
    assert r2.returncode == 2
    assert one_error_line(r2).startswith(f'error: --resume {last}: checksum mismatch: the file was damaged')
    assert not (tmp_path / 'o2').exists() or not any((tmp_path / 'o2').iterdir())


# ---- the lock, a stale lock, stale temp files, SIGHUP --------------------------------------------------------


@pytest.mark.slow
def test_lock_stale_lock_stale_temp_and_sighup(demo_root: Path, run_pretrain, tmp_path: Path) -> None:
    out = tmp_path / 'out'
    args = pre_args(demo_root, out)
    first = Proc(args, VITFREEZE_TEST_PAUSE_IN_SAVE='120')
    first.wait_for(r'\[test hook\] pausing .* inside save of .*checkpoint-0\.pth')
    before = snapshot(out)
    r = run_pretrain(args)  # a second run on the same folder while the first one is saving
    assert r.returncode == 2
    assert re.fullmatch(rf'error: --output_dir {re.escape(str(out))} is in use by another run \(pid {first.p.pid} '
                        r'on .*, started .* UTC\); wait for it to finish or choose another --output_dir',
                        one_error_line(r))
    assert snapshot(out) == before
    first.p.kill()  # SIGKILL mid-save: a stale lock file and a 45 MB temp file stay behind
    first.wait()
    tmp_file = out / f'.checkpoint-0.pth.tmp-{first.p.pid}'
    assert tmp_file.exists() and (out / '.vitfreeze.lock').exists()

    third = Proc(pre_args(demo_root, out, epochs=2), VITFREEZE_TEST_PAUSE_IN_SAVE='3')
    third.wait_for(r'\[test hook\] pausing .* inside save of .*checkpoint-0\.pth')
    third.p.send_signal(signal.SIGHUP)  # like SIGTERM: the save completes, then the run stops
    assert third.wait() == 128 + signal.SIGHUP, third.output
    o = third.output
    assert re.search(rf'note: --output_dir {re.escape(str(out))}: stale lock of a run that ended without releasing '
                     rf'it \(pid {first.p.pid} on .*\); taking it over', o), o
    assert f'note: removed {tmp_file} (' in o and f'a temp file left by process {first.p.pid}' in o
    assert (f'interrupted by SIGHUP at epoch 1 iteration 0; last checkpoint: {out / "checkpoint-last.pth"} (epoch 0); '
            f'rerun the same command to resume') in o, o
    assert 'Traceback' not in o
    assert sorted(os.listdir(out)) == ['checkpoint-0.pth', 'checkpoint-last.pth', 'log.txt', 'run.json']


# ---- non-finite weights, NaN message, write errors ----------------------------------------------------------


@pytest.mark.slow
def test_nan_weights_not_saved_nan_message_names_checkpoint_and_write_error_is_one_line(
        trained: Path, demo_root: Path, run_pretrain, tmp_path: Path) -> None:
    outs = {k: copy_of(trained, tmp_path / k) for k in ('weights', 'loss', 'write')}
    befores = {k: snapshot(v) for k, v in outs.items()}
    a = {k: pre_args(demo_root, v, epochs=2) for k, v in outs.items()}
    limit = 1 << 20  # bytes: the 45 MB checkpoint cannot be written, log.txt can
    script = str(REPO_ROOT / 'run_pretrain.py')
    set_limit = (f'import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); '
                 f'sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")')
    cmds = [[PY, script, *a['weights']], [PY, script, *a['loss']], [PY, '-c', set_limit, script, *a['write']]]
    envs = [hooked(VITFREEZE_TEST_NAN_WEIGHTS_AT_EPOCH='1'), hooked(VITFREEZE_TEST_NAN_AT_STEP='5'), {}]
    procs = [subprocess.Popen(c, cwd=REPO_ROOT, env=_pretrain_env(e), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c, e in zip(cmds, envs)]
    res = []
    for p in procs:
        so, se = p.communicate(timeout=300)
        res.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    last = {k: v / 'checkpoint-last.pth' for k, v in outs.items()}
    r = res[0]
    assert r.returncode == 3, r.stderr[-3000:]
    assert re.fullmatch(r'error: weights are not finite after epoch 1 \(NaN/inf in [\w.]+\); not saving them\. '
                        rf'Resume from {re.escape(str(last["weights"]))} \(epoch 0\): --resume '
                        rf'{re.escape(str(last["weights"]))} --blr 0\.0005 \(half of now\)', one_error_line(r))
    r = res[1]
    assert r.returncode == 3, r.stderr[-3000:]
    assert re.fullmatch(r'error: loss is nan at epoch 1, iteration 1/4 .*; stopping without writing a checkpoint.*'
                        rf'Resume from {re.escape(str(last["loss"]))} \(epoch 0\): --resume '
                        rf'{re.escape(str(last["loss"]))} --blr 0\.0005 \(half of now\).*', one_error_line(r))
    r = res[2]
    assert r.returncode == 1, r.stderr[-3000:]
    assert one_error_line(r) == (f'error: cannot write {outs["write"]}/checkpoint-1.pth: File too large; epoch 1 was '
                                 f'neither saved nor logged, {last["write"]} (epoch 0) is kept; free space or raise '
                                 f'the limit, then rerun the same command to resume')
    for k, out in outs.items():  # no checkpoint replaced, no record of the epoch that was not saved, no temp file
        assert snapshot(out) == befores[k], k


# ---- data ---------------------------------------------------------------------------------------------------


def test_data_scan_survives_symlink_loops_and_fifos(demo_root: Path, run_pretrain, tmp_path: Path) -> None:
    data = tmp_path / 'data'
    shutil.copytree(demo_root / 'train', data / 'train')
    cls = sorted((data / 'train').iterdir())
    os.symlink('.', cls[0] / 'self')                 # self-loop
    os.symlink(os.path.join('..', '..', 'train'), cls[1] / 'up')  # a loop through the root
    os.mkfifo(cls[2] / 'x.png')                      # a FIFO with an image name
    r = run_pretrain([*pre_args(data, tmp_path / 'out'), '--plan_only'], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    # class 1 reaches the other classes' folders once through `up` (its own folder and loops are not rescanned)
    n_up = sum(1 for c in cls if c != cls[1] for f in c.iterdir() if f.is_file() and not f.is_symlink())
    assert f'{data / "train"}: {32 + n_up} images' in r.stdout, r.stdout
    err = r.stdout + r.stderr
    assert f'data scan: {cls[2] / "x.png"}: skipped, a FIFO is not an image file' in err
    assert f'data scan: {cls[0] / "self"}: a directory already scanned (symlink loop?)' in err


def test_reads_never_block_and_16_bit_png_is_scaled(tmp_path: Path) -> None:
    from PIL import Image

    from util.datasets import _load_rgb, _read_bytes, read_deadline
    fifo = tmp_path / 'f.png'
    os.mkfifo(fifo)
    t = time.time()
    with pytest.raises(OSError, match='not a regular file \\(a FIFO\\)'):
        _read_bytes(str(fifo))
    rd, wr = os.pipe()  # a read that blocks (no data, writer open) times out
    try:
        with pytest.raises(TimeoutError, match='blocked for more than 0.5 s'):
            with read_deadline(0.5, 'the pipe'):
                os.read(rd, 1)
    finally:
        os.close(rd), os.close(wr)
    assert time.time() - t < 30
    a = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(a).save(tmp_path / 'g16.png')
    assert Image.open(tmp_path / 'g16.png').mode == 'I;16'
    rgb = np.asarray(_load_rgb(str(tmp_path / 'g16.png')))
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[..., 0], np.rint(a * (255 / 65535)).astype(np.uint8))
    assert (rgb == 255).mean() < 0.01  # Pillow's convert('RGB') alone clips 99.6% to 255


def test_online_knn_rejects_val_classes_that_differ(demo_root: Path, run_pretrain, tmp_path: Path) -> None:
    knn = tmp_path / 'knn'
    shutil.copytree(demo_root, knn)
    victim = sorted((knn / 'val').iterdir())[0]
    victim.rename(victim.with_name('zz_other'))
    out = tmp_path / 'out'
    r = run_pretrain(pre_args(demo_root, out, '--knn_eval_freq', '1', '--knn_data_path', knn))
    assert r.returncode == 2
    assert one_error_line(r) == (f'error: --knn_data_path {knn}: val/ class folders differ from train/; labels are '
                                 f'folder indices')
    assert not out.exists() or list(out.iterdir()) == []


# ---- run_knn SIGTERM, record.sh -------------------------------------------------------------------------------


def test_sigterm_to_run_knn_is_one_line(demo_root: Path, tmp_path: Path) -> None:
    p = Proc(['--model', 'vit_base_patch16', '--input_size', '224', '--batch_size', '4', '--num_workers', '0',
              '--device', 'cpu', '--data_path', demo_root, '--output_dir', tmp_path / 'out'], script='run_knn.py')
    p.wait_for(r'^job dir: ')
    p.p.send_signal(signal.SIGTERM)
    assert p.wait() == 128 + signal.SIGTERM, p.output
    last = [l for l in p.output.splitlines() if l.strip()][-1]
    assert last == ('interrupted by SIGTERM; no checkpoint was written by this run; rerun the same command to start '
                    'again')
    assert 'Traceback' not in p.output
    assert not (tmp_path / 'out' / 'log.txt').exists()


def test_record_sh_with_empty_output_dir_runs_and_records_in_cwd(tmp_path: Path) -> None:
    r = subprocess.run(['bash', str(REPO_ROOT / 'record.sh'), PY, '-c', 'print("ran")', '--output_dir='],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == 'ran\n'
    assert 'record.sh: --output_dir is empty (the run saves nothing); recording into ./cli_logs.txt' in r.stderr
    log = (tmp_path / 'cli_logs.txt').read_text()
    assert 'ran' in log and 'exit_status=0' in log
