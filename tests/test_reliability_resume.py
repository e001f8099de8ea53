"""Reliability, resuming: a stopped run (epoch boundary, SIGTERM in a save, SIGKILL/SIGINT mid-epoch, SIGKILL
during a save) continues bit-exactly; no final checkpoint name ever holds a truncated file; every checkpoint loads
weights-only. Helpers and the reference runs: ``tests/reliability_common.py``.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path
from typing import Dict

import pytest
import torch

from reliability_common import (EVAL, FT, PY, REPO, Proc, _plain, assert_same, assert_same_run, load, logged,
                                logged_eval, pretrain_args, run, snapshot)


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
    assert sorted(os.listdir(out)) == ['checkpoint-0.pth', 'checkpoint-last.pth', 'log.txt', 'run.json']  # no temp
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
    names = sorted(os.listdir(out))  # the lock file stays too (stale: its process is gone)
    assert names == ['.checkpoint-0.pth.tmp-%d' % p.p.pid, '.vitfreeze.lock', 'log.txt', 'run.json'], names
    # a second run, killed while writing checkpoint-last.pth (checkpoint-0.pth is then complete)
    p = Proc([PY, REPO / 'run_pretrain.py', *args], VITFREEZE_TEST_PAUSE_IN_SAVE='2')
    p.wait_for(r'\[test hook\] pausing .* inside save of .*checkpoint-last\.pth')
    p.send(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    names = sorted(n for n in os.listdir(out) if not n.startswith('.'))
    assert names == ['checkpoint-0.pth', 'log.txt', 'run.json'], names
    assert any(n.startswith('.checkpoint-last.pth.tmp-') for n in os.listdir(out))
    for f in out.glob('checkpoint-*.pth'):
        load(f)  # everything under a final name loads
    # log.txt: each killed run logged epoch 0 (its record precedes its checkpoint); the second one, starting
    # afresh under the same run id (the first never finished a checkpoint), first dropped the first run's record,
    # so every epoch is logged once
    assert [x['epoch'] for x in logged(out)] == [0]
    (out / 'checkpoint-9.pth').write_bytes((out / 'checkpoint-0.pth').read_bytes()[:100_000])  # truncated
    r = run('run_pretrain.py', [*args, '--keep_last', '1'])
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r'auto-resume: skipping .*checkpoint-9\.pth: .*not a readable checkpoint', r.stdout), r.stdout
    assert f'Auto resume checkpoint: {out / "checkpoint-0.pth"}' in r.stdout
    assert_same_run(reference, out)
    assert sorted(n for n in os.listdir(out) if not n.startswith('.')) == \
        ['checkpoint-2.pth', 'checkpoint-last.pth', 'log.txt', 'run.json']



# ---- 5. safe loading -------------------------------------------------------------------------------------------


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



# ---- evaluators ------------------------------------------------------------------------------------------------


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



def test_evaluator_checkpoints_load_weights_only(evaluated: Dict[str, Path]) -> None:
    for d in (evaluated['ft'], evaluated['lp']):
        files = sorted(d.glob('checkpoint-*.pth'))
        assert len(files) == 3, files
        for f in files:
            ck = torch.load(f, map_location='cpu', weights_only=True)
            assert type(ck['args']) is dict
            _plain(ck['args'])

