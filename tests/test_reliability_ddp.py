"""Reliability, several processes: DDP pre-training with FreezeOut under torchrun and the legacy launcher (ranks stay
identical, only rank 0 writes), a resumed 2-process run continues every rank's own random stream, SIGTERM stops
every rank at the same step, and ``--dist_eval`` over 2 processes prints exactly the single-process results.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch

from reliability_common import (EPOCHS, EVAL, PY, REPO, TIMEOUT, Proc, _parallel, assert_same, env, free_port, load,
                                logged, pretrain_args)


# ---- 6. multi-process DDP on CPU -------------------------------------------------------------------------------


DDP_ARGS = ['--batch_size', '4', '--accum_iter', '2']  # per rank: 16 images = 4 iterations = 2 steps; T = 6 steps


def _launch(launcher: str, port: int, script_args: Sequence[str]) -> List[str]:
    mod = 'torch.distributed.run' if launcher == 'torchrun' else 'torch.distributed.launch'
    return [PY, '-m', mod, '--nproc_per_node=2', f'--master_port={port}', str(REPO / 'run_pretrain.py'),
            *map(str, script_args)]


@pytest.mark.slow
@pytest.mark.parametrize('launcher,schedule', [('torchrun', 'freezeout'), ('launch', 'freezeout'),
                                               ('torchrun', 'vitfreeze')])
def test_ddp_two_processes_freezeout(launcher: str, schedule: str, demo_root: Path, tmp_path: Path) -> None:
    from freezeout import FreezeOutSchedule
    out, dumps = tmp_path / 'out', tmp_path / 'dumps'
    args = pretrain_args(demo_root, out, *DDP_ARGS, '--freeze_schedule', schedule)
    r = subprocess.run(_launch(launcher, free_port(), args), cwd=REPO, capture_output=True, text=True,
                       timeout=TIMEOUT, env=env(VITFREEZE_TEST_DUMP_RANK_WEIGHTS=str(dumps)))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert 'effective batch size: 16 (4 x 2 x 2 processes)' in r.stdout
    assert 'actual lr: 6.25e-04' in r.stdout  # blr 1e-2 * 16 / 256
    # T and W from 2 processes x accum 2 (2 steps/epoch): the freezes happen where the formulas put them
    assert 'T=6 optimizer steps (2/epoch), warm-up W=2' in r.stdout and f'schedule: {schedule} (' in r.stdout
    sched = FreezeOutSchedule(['embed', 'block1', 'block2', 'block3', 'block4'], 6, 2, 6.25e-4, 1e-6, 0.3, 'linear',
                              freeze_schedule=schedule, unit_min_lr=0.0 if schedule == 'vitfreeze' else None)
    events = [int(x) for x in re.findall(r'FreezeOut: step (\d+) \(epoch \d\): frozen units', r.stdout)]
    assert events == sorted({u.freeze_step for u in sched.units if u.freeze_step is not None and u.freeze_step < 6})
    assert events == ([4, 5] if schedule == 'vitfreeze' else [2, 3, 4, 5])  # 2 + 4 t_i, resp. 6 t_i, rounded up
    assert r.stdout.count('| distributed init (rank') == 2
    # only rank 0 writes: one log record per epoch, one set of checkpoints, no stray temp files
    assert sorted(os.listdir(out)) == ['checkpoint-0.pth', 'checkpoint-2.pth', 'checkpoint-last.pth', 'log.txt',
                                       'run.json']
    recs = logged(out)
    assert [x['epoch'] for x in recs] == [0, 1, 2] and recs[-1]['frozen_units'] >= 2
    for rec in recs:  # each epoch's per-unit LR is the schedule's at the next step (vitfreeze epoch 0: the jump)
        for i, u in enumerate(sched.units):
            if u.name in rec['unit_lr']:
                assert rec['unit_lr'][u.name] == pytest.approx(sched.lr_at(i, 2 * (rec['epoch'] + 1)), rel=1e-12)
    if schedule == 'vitfreeze':
        assert recs[0]['unit_lr']['embed'] == pytest.approx(6.25e-4 / 0.3, rel=1e-12)
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
def test_ddp_resume_continues_every_ranks_random_stream(demo_root: Path, tmp_path: Path) -> None:
    """2 processes (gloo), interrupted after epoch 0 and resumed with 2 processes: on every rank the masks drawn, the
    RNG state, the weights and the optimizer state of epochs 1-2 equal the uninterrupted run's (freezes happen in the
    resumed epochs), and the two ranks draw different masks. Before per-rank RNG states, rank 1 resumed from rank 0's
    state and drew rank 0's masks."""
    ref, out, dumps_ref, dumps = tmp_path / 'ref', tmp_path / 'out', tmp_path / 'dumps_ref', tmp_path / 'dumps'
    r = subprocess.run(_launch('torchrun', free_port(), pretrain_args(demo_root, ref, *DDP_ARGS, '--save_freq', '1')),
                       cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
                       env=env(VITFREEZE_TEST_DUMP_RANK_WEIGHTS=str(dumps_ref)))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    ck0 = load(ref / 'checkpoint-0.pth')
    assert len(ck0['rng_ranks']) == 2 and not torch.equal(ck0['rng_ranks'][0]['torch'], ck0['rng_ranks'][1]['torch'])
    out.mkdir()  # the folder a kill right after epoch 0's save leaves: its checkpoint and log record
    shutil.copy(ref / 'checkpoint-0.pth', out / 'checkpoint-last.pth')
    (out / 'log.txt').write_text((ref / 'log.txt').read_text().splitlines(keepends=True)[0])
    r = subprocess.run(_launch('torchrun', free_port(), pretrain_args(demo_root, out, *DDP_ARGS, '--save_freq', '1')),
                       cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
                       env=env(VITFREEZE_TEST_DUMP_RANK_WEIGHTS=str(dumps)))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert 'epoch 0 done, optimizer step 2' in r.stdout and 'warning' not in r.stdout, r.stdout[-3000:]
    for epoch in (1, 2):
        for rank in (0, 1):
            a, b = (json.loads((d / f'rank{rank}-epoch{epoch}.json').read_text()) for d in (dumps_ref, dumps))
            for key in ('masks', 'rng', 'model', 'optimizer', 'freezeout'):
                assert a[key] == b[key], (epoch, rank, key)
            assert a['masks'] is not None
        ranks = [json.loads((dumps / f'rank{k}-epoch{epoch}.json').read_text()) for k in (0, 1)]
        assert ranks[0]['masks'] != ranks[1]['masks'] and ranks[0]['rng'] != ranks[1]['rng'], epoch
    a, b = load(ref / 'checkpoint-last.pth'), load(out / 'checkpoint-last.pth')
    assert b['freezeout']['num_frozen'] >= 2
    for key in ('model', 'optimizer', 'epoch', 'step', 'freezeout', 'rng', 'rng_ranks'):
        assert_same(a[key], b[key], key)
    assert logged(ref) == logged(out)


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



RESULT_LINES = re.compile(r'^(\* Acc@1 .*|k-NN k=\d+: .*)$', re.M)


@pytest.mark.slow
def test_dist_eval_two_processes_equal_one(evaluated: Dict[str, Path], demo_root: Path, tmp_path: Path) -> None:
    """Fine-tune / linear-probe (--eval of the trained checkpoints) and k-NN: `--dist_eval` over 2 gloo processes
    prints exactly the accuracies and loss of one process (batch 3: uneven shards and batches)."""
    common = [*EVAL, '--batch_size', '3', '--data_path', str(demo_root), '--dist_eval']
    jobs = {'finetune': ('run_finetune.py', ['--eval', '--no_auto_resume', '--resume',
                                             evaluated['ft'] / 'checkpoint-last.pth']),
            'linprobe': ('run_linprobe.py', ['--eval', '--no_auto_resume', '--resume',
                                             evaluated['lp'] / 'checkpoint-last.pth']),
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


