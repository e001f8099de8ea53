"""--data_backend dali (util/dali_loader.py) on CPU: batch counts per epoch (solo-learn#177), disjoint rank shards
(in one process and in two gloo processes under torchrun), determinism for a seed, the DistributedSampler order, an
in-process pre-training demo run and its resume, a 2-process pre-training resumed exactly on every rank,
fine-tuning / linear probing / k-NN through DaliLoader; the one-line install hint without DALI and the resume warning
when the backend changes (run in any venv). The DALI tests skip where nvidia-dali is not installed
(pip install -r requirements-dali.txt)."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cli_inproc import cli


def _dali():
    return pytest.importorskip('nvidia.dali')


def _folder(root, n=10, size=(40, 30)):
    for i in range(n):
        d = root / f'c{i % 2}'
        d.mkdir(parents=True, exist_ok=True)
        arr = np.random.default_rng(i).integers(0, 255, (size[1] + i, size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f'{i:03d}.jpg', quality=90)
    return root


def _loader(root, kind='pretrain', batch=3, world=1, rank=0, seed=0, with_index=True, drop_last=True, shard=True):
    from util.dali_loader import DaliLoader
    from util.datasets import build_dataset
    ds = build_dataset(root, 'train', None, allow_root=True, with_index=with_index)
    return DaliLoader(ds, kind, batch, 16, seed, world_size=world, rank=rank, shard=shard, drop_last=drop_last)


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch) if hasattr(loader.sampler, 'set_epoch') else None
    return list(loader)


def test_default_backend_is_pil():
    import run_pretrain
    assert run_pretrain.get_args_parser().parse_args([]).data_backend == 'pil'


@pytest.mark.parametrize('script', ['run_pretrain.py', 'run_knn.py'])
def test_missing_dali_is_one_line(script, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == 'nvidia.dali' or m.startswith('nvidia.dali.')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'nvidia.dali', None)  # import nvidia.dali -> ImportError
    rc, out, err = cli(script, ['--demo', '--data_backend', 'dali', '--output_dir', tmp_path / 'o', '--device', 'cpu'])
    assert rc == 2
    assert err.strip() == 'error: --data_backend dali needs NVIDIA DALI: pip install -r requirements-dali.txt'


def test_batches_per_epoch_exact_over_epochs(tmp_path):
    _dali()
    root = _folder(tmp_path / 'd', n=10)
    train = _loader(root, batch=3)
    assert len(train) == 3
    for epoch in range(3):  # no epoch short or skipped, each a permutation (the pad never leaks in)
        batches = _epoch(train, epoch)
        assert [b[0].shape for b in batches] == [torch.Size([3, 3, 16, 16])] * 3
        seen = torch.cat([b[1] for b in batches]).tolist()
        assert len(set(seen)) == 9 and set(seen) <= set(range(10))
    ev = _loader(root, kind='eval', batch=4, drop_last=False)
    batches = _epoch(ev, 0)
    assert len(ev) == 3 and [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(10))  # every image once, in order


def test_two_shards_disjoint_equal_and_padded(tmp_path):
    _dali()
    root = _folder(tmp_path / 'd', n=11)
    shards = [torch.cat([b[1] for b in _epoch(_loader(root, batch=2, world=2, rank=r), 1)]).tolist() for r in (0, 1)]
    assert [len(s) for s in shards] == [6, 6]  # ceil(11/2) each, 3 batches: the same count on both ranks (DDP)
    from util.dali_loader import train_order
    order = train_order(11, 0, 1, 2)
    assert shards[0] + shards[1] == order[:12] and set(shards[0]) | set(shards[1]) == set(range(11))
    assert len(set(shards[0]) & set(shards[1])) == 1  # only the one padding repeat (the order's head)
    root10 = _folder(tmp_path / 'e', n=10)
    a, b = (set(torch.cat([x[1] for x in _epoch(_loader(root10, batch=5, world=2, rank=r), 0)]).tolist())
            for r in (0, 1))
    assert not a & b and a | b == set(range(10))
    ev = [torch.cat([x[1] for x in _epoch(_loader(root, kind='eval', batch=4, world=2, rank=r, drop_last=False),
                                          0)]).tolist() for r in (0, 1)]
    assert ev == [list(range(0, 5)), list(range(5, 11))]  # ShardSampler's contiguous shards


def test_train_order_is_distributed_samplers(tmp_path):
    from torch.utils.data import DistributedSampler
    from util.dali_loader import train_order
    s = DistributedSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=7)
    s.set_epoch(3)
    assert train_order(10, 7, 3, 1) == list(s)


def test_deterministic_for_a_seed(tmp_path):
    _dali()
    root = _folder(tmp_path / 'd', n=8)
    a = _epoch(_loader(root, batch=4, seed=5), 2)
    b = _epoch(_loader(root, batch=4, seed=5), 2)  # a fresh loader at epoch 2: what a resumed run sees
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = _epoch(_loader(root, batch=4, seed=6), 2)
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a, c))
    # normalised like the PIL path: ImageNet mean/std of 0..255 pixels
    x = torch.cat([t for t, _ in a])
    assert x.dtype == torch.float32 and -2.2 < x.min() and x.max() < 2.7


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_pretrain_demo_with_dali_and_exact_resume(tmp_path):
    _dali()
    base = ['--demo', '--data_backend', 'dali', '--device', 'cpu', '--epochs', '2', '--warmup_epochs', '1',
            '--knn_eval_freq', '0', '--vis_freq', '0', '--log_dir', '', '--save_freq', '1']
    rc, out, err = cli('run_pretrain.py', [*base, '--output_dir', tmp_path / 'full'])
    assert rc == 0, err[-2000:]
    full = _log(tmp_path / 'full' / 'log.txt')
    assert [r['epoch'] for r in full] == [0, 1]
    rc, _, err = cli('run_pretrain.py', [*base, '--output_dir', tmp_path / 'cut'])
    assert rc == 0, err[-2000:]
    cut = _log(tmp_path / 'cut' / 'log.txt')
    assert [r['train_loss'] for r in cut] == [r['train_loss'] for r in full]  # same seed: the same run
    rc, _, err = cli('run_pretrain.py', [*base, '--output_dir', tmp_path / 'res',
                                         '--resume', tmp_path / 'full' / 'checkpoint-0.pth'])
    assert rc == 0, err[-2000:]
    res = _log(tmp_path / 'res' / 'log.txt')
    assert [r['epoch'] for r in res] == [1] and res[0]['train_loss'] == full[1]['train_loss']  # exact


@pytest.mark.parametrize('script', ['run_pretrain', 'run_finetune', 'run_linprobe'])
def test_changing_the_backend_on_resume_is_warned_in_one_line(script, capsys):
    """--data_backend is run-defining: another decoder and augmentation draws, so a resume that switches it cannot
    continue the run exactly. It is warned about like --seed (switching a data-bound run to DALI mid-way is a
    legitimate use), in one line naming both values."""
    import importlib
    from util.args import run_defining
    from util.checkpoint import args_to_dict, warn_changed_flags
    parser = importlib.import_module(script).get_args_parser()
    assert 'data_backend' in run_defining(parser)
    saved = args_to_dict(parser.parse_args([]))
    now = parser.parse_args(['--data_backend', 'dali'])
    now.run_defining = run_defining(parser)
    capsys.readouterr()
    assert warn_changed_flags(saved, now) == ['data_backend']
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert lines == ["warning: resuming with --data_backend 'dali' but the checkpoint was trained with 'pil'; the "
                     "continued run will differ from an uninterrupted one"]
    assert warn_changed_flags(saved, parser.parse_args([])) == []


# ---- two real processes (gloo under torchrun) ---------------------------------------------------------------------

_RANK_WORKER = '''
import json, sys
import torch.distributed as dist
from types import SimpleNamespace
dist.init_process_group('gloo')
rank, world = dist.get_rank(), dist.get_world_size()
from util.dali_loader import build_dali_loader
from util.datasets import build_dataset
root, out = sys.argv[1], sys.argv[2]
ds = build_dataset(root, 'train', None, allow_root=True, with_index=True)
args = SimpleNamespace(batch_size=3, input_size=16, seed=4, num_workers=1, device='cpu')
train = build_dali_loader(ds, 'pretrain', args, world_size=world, rank=rank)   # as run_pretrain.py builds it
rec = {'len': len(train), 'epochs': [], 'shapes': []}
for epoch in range(4):
    train.sampler.set_epoch(epoch)
    batches = list(train)
    rec['epochs'].append([b[1].tolist() for b in batches])
    rec['shapes'].append([list(b[0].shape) for b in batches])
ev = build_dali_loader(ds, 'eval', args, world_size=world, rank=rank, drop_last=False)
rec['eval'] = [b[1].tolist() for b in ev]
json.dump(rec, open(f'{out}/rank{rank}.json', 'w'))
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_processes_disjoint_shards_and_exact_batch_counts(tmp_path):
    """Two gloo ranks under torchrun, each with its own DALI pipeline, 13 images, batch 3 (13 is not a multiple of
    batch x world = 6): on every one of 4 epochs each rank yields exactly floor(ceil(13/2)/3) = 2 full batches
    (solo-learn#177: an epoch short, skipped or running into the next would show here), the two ranks' images are
    disjoint and are DistributedSampler's order for that epoch; evaluation covers all 13 once (contiguous shards)."""
    _dali()
    import subprocess
    from reliability_common import PY, REPO, env, free_port
    from util.dali_loader import train_order
    root = _folder(tmp_path / 'd', n=13)
    (tmp_path / 'worker.py').write_text(_RANK_WORKER)
    r = subprocess.run([PY, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
                        str(tmp_path / 'worker.py'), str(root), str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=180, env=env(PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f'rank{k}.json').read_text()) for k in (0, 1)]
    assert [x['len'] for x in ranks] == [2, 2]
    for epoch in range(4):
        seen = [sum(x['epochs'][epoch], []) for x in ranks]
        assert all(s == [[3, 3, 16, 16]] * 2 for s in (x['shapes'][epoch] for x in ranks)), epoch
        order = train_order(13, 4, epoch, 2)  # padded to 14; rank 0 reads [0, 7), rank 1 [7, 14), 6 of each
        assert seen == [order[0:6], order[7:13]], epoch
        assert not set(seen[0]) & set(seen[1])
    assert ranks[0]['epochs'][0] != ranks[0]['epochs'][1]  # reshuffled per epoch
    assert [sum(x['eval'], []) for x in ranks] == [list(range(0, 6)), list(range(6, 13))]
    assert [len(b) for b in ranks[1]['eval']] == [3, 3, 1]


@pytest.mark.slow
def test_two_process_dali_pretraining_resumes_every_rank_exactly(demo_root, tmp_path):
    """run_pretrain.py --data_backend dali, 2 gloo processes, 2 epochs; resumed from checkpoint-0.pth with 2
    processes: epoch 1 on every rank trains on the same image batches (its shard, in order, same augmentation
    draws), draws the same masks and ends with the same weights and optimizer state as the uninterrupted run; the
    two ranks' batches differ."""
    _dali()
    import subprocess
    from reliability_common import PY, REPO, env, free_port, logged, pretrain_args
    ddp = ['--batch_size', '4', '--data_backend', 'dali', '--save_freq', '1']

    def launch(out, dumps, *more):
        cmd = [PY, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
               str(REPO / 'run_pretrain.py'), *map(str, pretrain_args(demo_root, out, *ddp, *more, epochs=2))]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                           env=env(VITFREEZE_TEST_DUMP_RANK_WEIGHTS=str(dumps)))
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        return r

    ref, res = tmp_path / 'ref', tmp_path / 'res'
    launch(ref, tmp_path / 'dref')
    r = launch(res, tmp_path / 'dres', '--resume', ref / 'checkpoint-0.pth')
    assert 'warning' not in r.stdout, r.stdout[-3000:]
    for rank in (0, 1):
        a, b = (json.loads((d / f'rank{rank}-epoch1.json').read_text()) for d in (tmp_path / 'dref', tmp_path / 'dres'))
        assert a['data'] is not None and a['world_size'] == 2
        for key in ('data', 'masks', 'rng', 'model', 'optimizer'):
            assert a[key] == b[key], (rank, key)
    d0, d1 = (json.loads((tmp_path / 'dref' / f'rank{k}-epoch1.json').read_text()) for k in (0, 1))
    assert d0['data'] != d1['data']
    assert logged(res) == logged(ref)[1:]


def test_finetune_linprobe_knn_train_and_evaluate_with_dali(demo_root, tmp_path, monkeypatch):
    """Every evaluation script runs --data_backend dali on CPU: its train and val batches come from DaliLoader
    (counted: floor(32/4) training batches, ceil(16/4) evaluation batches per epoch over the demo's 32/16 images),
    and the usual results are printed."""
    _dali()
    import re
    import models_mim
    from util import dali_loader
    torch.manual_seed(0)
    mim = models_mim.create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4,
                                  num_heads=4)
    ckpt = tmp_path / 'pre.pth'
    torch.save({'model': mim.state_dict(), 'epoch': 0, 'args': dict(
        model='MIM_vit_tiny_patch16', input_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
        all_stages=False)}, ckpt)
    seen = []
    original = dali_loader.DaliLoader.__iter__

    def counted(self):
        for b in original(self):
            seen.append((self.kind, len(b[1])))
            yield b
    monkeypatch.setattr(dali_loader.DaliLoader, '__iter__', counted)
    common = ['--data_backend', 'dali', '--data_path', demo_root, '--batch_size', '4', '--input_size', '32',
              '--model', 'vit_tiny_patch16', '--num_workers', '0', '--device', 'cpu', '--finetune', ckpt]
    for script, kind, extra in (('run_finetune.py', 'finetune', ['--lr', '1e-3']),
                                ('run_linprobe.py', 'linprobe', ['--blr', '0.1'])):
        seen.clear()
        rc, out, err = cli(script, [*common, *extra, '--epochs', '1', '--warmup_epochs', '0',
                                    '--output_dir', tmp_path / kind])
        assert rc == 0, err[-2000:]
        assert re.search(r'^\* Acc@1 [\d.]+ Acc@5 [\d.]+ loss [\d.]+$', out, re.M), out[-2000:]
        assert [k for k, _ in seen].count(kind) == 8 and all(n == 4 for k, n in seen if k == kind)
        assert sum(n for k, n in seen if k == 'eval') == 16
    seen.clear()
    rc, out, err = cli('run_knn.py', [*common, '--nb_knn', '5', '--output_dir', tmp_path / 'knn'])
    assert rc == 0, err[-2000:]
    assert re.search(r'^k-NN k=5: top-1 [\d.]+ top-5 [\d.]+$', out, re.M) and 'k-NN on 32 train / 16 val' in out
    assert sorted({k for k, _ in seen}) == ['knn'] and sum(n for _, n in seen) == 48  # train + val features
