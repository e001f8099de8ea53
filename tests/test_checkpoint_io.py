"""util/checkpoint.py: per-rank RNG states (capture, gather, restore per rank, world-size changes), the tree checksum
(formula, damage, version-2 files), the load verdict shared by rank 0, refusal of non-finite weights, loader worker
seeds, and the checkpoint save/load bench (smoke, tiny)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from util import checkpoint as ck
from util import distributed as du
from util.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def _draws() -> tuple:
    """One draw of each global RNG (torch, numpy, python)."""
    return torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random()


def _state_after(seed: int) -> dict:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    _draws()
    return ck.capture_rng_state()


# ---- per-rank RNG on resume --------------------------------------------------------------------------------------


def _fake_world(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(du, 'get_rank', lambda: rank)
    monkeypatch.setattr(du, 'get_world_size', lambda: world)
    monkeypatch.setattr(du, 'is_main_process', lambda: rank == 0)


@pytest.mark.parametrize('rank', [0, 1, 2])
def test_each_rank_restores_its_own_state(monkeypatch, rank: int) -> None:
    states = [_state_after(100 + r) for r in range(3)]
    expected = []
    for r in range(3):
        ck.restore_rng_state(states[r])
        expected.append(_draws())
    _fake_world(monkeypatch, rank, 3)
    torch.manual_seed(7)  # whatever ran before the restore
    assert ck.restore_rank_rng({'rng': states[0], 'rng_ranks': states}, seed=3) is True
    assert _draws() == expected[rank]
    assert expected[0] != expected[1]


def test_single_process_restores_rng_of_version_2_checkpoints(capsys) -> None:
    state = _state_after(5)
    want = (ck.restore_rng_state(state), _draws())[1]
    torch.manual_seed(0)
    assert ck.restore_rank_rng({'rng': state, 'args': {'world_size': 1}}, seed=3) is True
    assert _draws() == want
    assert 'warning' not in capsys.readouterr().out


@pytest.mark.parametrize('saved_world,world,rank', [(2, 1, 0), (2, 3, 2), (1, 2, 1)])
def test_other_world_size_warns_once_and_reseeds_from_seed_plus_rank(monkeypatch, capsys, saved_world: int,
                                                                    world: int, rank: int) -> None:
    states = [_state_after(50 + r) for r in range(saved_world)]
    ckpt = {'rng': states[0], 'args': {'world_size': saved_world}}
    if saved_world > 1:
        ckpt['rng_ranks'] = states
    _fake_world(monkeypatch, 0, world)  # rank 0 prints the warning ...
    assert ck.restore_rank_rng(ckpt, seed=11, where='--resume X') is False
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f'warning: --resume X was written by {saved_world} processes, this run has {world}: no saved '
                     f'random state fits every rank, so each rank is re-seeded from --seed 11 + rank (masks and '
                     f'other random draws continue differently from an uninterrupted run)']
    _fake_world(monkeypatch, rank, world)  # ... and every rank takes seed + rank
    ck.restore_rank_rng(ckpt, seed=11)
    got = _draws()
    torch.manual_seed(11 + rank)
    np.random.seed(11 + rank)
    random.seed(11 + rank)
    assert got == _draws()


def test_multi_process_checkpoint_without_per_rank_states_is_not_restored_on_every_rank(monkeypatch, capsys) -> None:
    """A version-2 checkpoint of 2 processes holds rank 0's state only: giving it to rank 1 too would make both
    ranks draw the same masks, so both re-seed (one warning)."""
    _fake_world(monkeypatch, 0, 2)
    assert ck.restore_rank_rng({'rng': _state_after(1), 'args': {'world_size': 2}}, seed=4) is False
    assert "before each rank's random state was saved (only rank 0's)" in capsys.readouterr().out


def test_no_rng_in_checkpoint_leaves_the_streams() -> None:
    torch.manual_seed(9)
    before = torch.get_rng_state()
    assert ck.restore_rank_rng({'model': {}}, seed=1) is False
    assert torch.equal(torch.get_rng_state(), before)


def test_save_checkpoint_single_process_writes_rank0_state_only(tmp_path: Path) -> None:
    import argparse
    args = argparse.Namespace(output_dir=str(tmp_path), run_id='r', keep_last=0, seed=0)
    want = _state_after(21)
    (path,) = ck.save_checkpoint(str(tmp_path), 0, {'model': {'w': torch.ones(2)}}, args, numbered=False)
    got = ck.load_checkpoint(path)
    assert 'rng_ranks' not in got and got['version'] == 3
    assert torch.equal(got['rng']['torch'], want['torch'])
    assert got['checksum'].startswith('sha256-tree:') and got['checksum'] == ck.state_digest(got)


# ---- checksum -------------------------------------------------------------------------------------------------


def test_tree_digest_formula_pieces_and_thread_count(monkeypatch) -> None:
    """The tree digest is sha256(structure and metadata in walk order, 'P<n>;', the pieces' sha256 in order); the
    pieces are 16 MiB (here 8 bytes), and the thread pool does not change the result."""
    monkeypatch.setattr(ck, '_PIECE', 8)
    a = torch.arange(6, dtype=torch.float32)   # 24 bytes: 3 pieces
    b = torch.tensor([1, 2], dtype=torch.int64)  # 16 bytes: 2 pieces
    obj = {'x': a, 'y': [b, 3], 'checksum': 'ignored'}
    h = hashlib.sha256()
    for part in ("{'x';T" + f'{a.dtype}{tuple(a.shape)};', "'y';[T" + f'{b.dtype}{tuple(b.shape)};', '3;]}'):
        h.update(part.encode())
    raw = a.numpy().tobytes() + b.numpy().tobytes()
    pieces = [raw[0:8], raw[8:16], raw[16:24], raw[24:32], raw[32:40]]
    h.update(b'P5;' + b''.join(hashlib.sha256(p).digest() for p in pieces))
    want = 'sha256-tree:' + h.hexdigest()
    assert ck.state_digest(obj) == want
    monkeypatch.setattr(os, 'cpu_count', lambda: 1)
    assert ck.state_digest(obj) == want
    for t, i in ((a, 5), (b, 1)):  # one changed value in any piece changes the digest
        c = {'x': a.clone(), 'y': [b.clone(), 3]}
        (c['x'] if t is a else c['y'][0])[i] += 1
        assert ck.state_digest(c) != want
    legacy = hashlib.sha256(b"{'x';T" + f'{a.dtype}{tuple(a.shape)};'.encode() + a.numpy().tobytes()
                            + b"'y';[T" + f'{b.dtype}{tuple(b.shape)};'.encode() + b.numpy().tobytes() + b'3;]}')
    assert ck.state_digest(obj, 'sha256') == 'sha256:' + legacy.hexdigest()  # version 2, unchanged


def test_version_2_checksums_still_verify_and_damage_is_refused(tmp_path: Path) -> None:
    obj = {'model': {'w': torch.randn(4, 4)}, 'epoch': 0}
    obj['checksum'] = ck.state_digest(obj, 'sha256')
    torch.save(obj, tmp_path / 'v2.pth')
    assert ck.load_checkpoint(str(tmp_path / 'v2.pth'))['epoch'] == 0
    obj['model']['w'][0, 0] += 1
    torch.save(obj, tmp_path / 'bad.pth')
    with pytest.raises(UserError, match=r'^--resume .*bad\.pth: checksum mismatch: the file was damaged'):
        ck.load_checkpoint(str(tmp_path / 'bad.pth'))
    obj['checksum'] = 'md5:00'
    torch.save(obj, tmp_path / 'unknown.pth')
    with pytest.raises(UserError, match='checksum mismatch'):
        ck.load_checkpoint(str(tmp_path / 'unknown.pth'))


# ---- non-finite weights -----------------------------------------------------------------------------------------


@pytest.mark.parametrize('key', ['model', 'state_dict', None])
def test_load_refuses_non_finite_weights_naming_the_tensor(tmp_path: Path, key) -> None:
    sd = {'a.weight': torch.zeros(3), 'b.weight': torch.tensor([1.0, float('nan'), float('inf')]),
          'c.bias': torch.tensor([float('-inf')]), 'steps': torch.tensor([2**40])}
    obj = {key: sd, 'epoch': 3} if key else sd
    torch.save(obj, tmp_path / 'nan.pth')
    with pytest.raises(UserError) as e:
        ck.load_checkpoint(str(tmp_path / 'nan.pth'), flag='--finetune')
    assert str(e.value) == (f'--finetune {tmp_path / "nan.pth"}: tensor b.weight holds NaN/inf (2 of 3 values; also '
                            f'c.bias): the weights diverged before this file was written; use an earlier checkpoint')
    sd['b.weight'], sd['c.bias'] = torch.ones(3), torch.ones(1)
    torch.save(obj, tmp_path / 'ok.pth')
    ck.load_checkpoint(str(tmp_path / 'ok.pth'))


# ---- the verdict of rank 0, shared (2 gloo processes) -------------------------------------------------------------


def _verdict_worker(rank: int, init: str, out: str, paths: dict) -> None:
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=2)
    calls = []
    original = ck.verify_checksum

    def counting(c):
        calls.append(rank)
        return original(c)
    ck.verify_checksum = counting
    if rank == 1:  # this rank cannot read the 'local' file (e.g. another node's file system)
        real = ck._read_checkpoint

        def read(path, flag):
            if path == paths['local']:
                raise UserError(f'{flag} {path}: file not found')
            return real(path, flag)
        ck._read_checkpoint = read
    res = {}
    for name, path in paths.items():
        try:
            ck.load_checkpoint(path)
            res[name] = 'ok'
        except UserError as e:
            res[name] = str(e)
    res['verified_here'] = len(calls)
    with open(os.path.join(out, f'rank{rank}.json'), 'w') as f:
        json.dump(res, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_rank0_verifies_and_every_rank_gets_the_same_verdict(tmp_path: Path) -> None:
    import torch.multiprocessing as mp
    good = {'model': {'w': torch.randn(8)}, 'epoch': 0}
    good['checksum'] = ck.state_digest(good)
    bad = {'model': {'w': good['model']['w'] + 1}, 'epoch': 0, 'checksum': good['checksum']}
    paths = {}
    for name, obj in (('good', good), ('bad', bad), ('local', good)):
        paths[name] = str(tmp_path / f'{name}.pth')
        torch.save(obj, paths[name])
    mp.start_processes(_verdict_worker, args=(f'file://{tmp_path / "store"}', str(tmp_path), paths), nprocs=2,
                       start_method='fork')
    r0, r1 = (json.loads((tmp_path / f'rank{k}.json').read_text()) for k in (0, 1))
    assert r0['good'] == r1['good'] == 'ok'
    assert r0['bad'] == r1['bad'] and 'checksum mismatch' in r0['bad']
    assert r0['local'] == r1['local'] == f"--resume {paths['local']}: file not found (on rank 1)"
    assert (r0['verified_here'], r1['verified_here']) == (3, 0)  # rank 0 hashes each file it read once; rank 1 never


# ---- loader worker seeds follow (seed, epoch, rank), not the global RNG -------------------------------------------


class _WorkerSeed(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        return torch.initial_seed()


def test_loader_worker_seeds_are_a_function_of_seed_epoch_rank() -> None:
    from util.datasets import build_loader, seed_loader_epoch

    def seeds(rank: int, epoch: int, global_seed: int) -> list:
        loader = build_loader(_WorkerSeed(), 2, shuffle=True, drop_last=False, num_workers=1, pin_mem=False, seed=3,
                              distributed=True, world_size=2, rank=rank)
        torch.manual_seed(global_seed)  # what a resume restores (or not) must not matter
        seed_loader_epoch(loader, 3, epoch, rank)
        return [int(x) for b in loader for x in b]
    assert seeds(1, 2, 0) == seeds(1, 2, 12345)
    assert seeds(0, 2, 0) != seeds(1, 2, 0) and seeds(1, 1, 0) != seeds(1, 2, 0)


# ---- bench ----------------------------------------------------------------------------------------------------


def test_checkpoint_io_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / 'io.json'
    p = subprocess.run([sys.executable, '-m', 'bench.checkpoint_io', '--model', 'MIM_vit_tiny_patch16', '--input_size',
                        '32', '--patch_size', '4', '--embed_dim', '32', '--depth', '4', '--num_heads', '2',
                        '--decoder_embed_dim', '16', '--repeat', '1', '--dir', str(tmp_path / 'd'), '--json',
                        str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ('save_s', 'read_s', 'load_s', 'digest_s', 'digest_legacy_s', 'digest_gb_per_s', 'file_mb',
                'params_m'):
        assert key in r, key
    assert r['roundtrip_ok'] is True and len(r['all']['save_s']) == 1
    ckpt = torch.load(tmp_path / 'd' / 'checkpoint-last.pth', weights_only=True)
    assert r['tensor_mb'] > r['params_m'] * 4 * 2.5  # weights + AdamW's two moments (fp32) of the trainable ones
    assert ckpt['checksum'] == ck.state_digest(ckpt) and 'checkpoint-last.pth' in os.listdir(tmp_path / 'd')
    assert 'MIM_vit_tiny_patch16' in p.stdout and 'bit-exact' in p.stdout
