"""--prefix_cache DIR (prefix_cache.py): no leak (a visible token's cached prefix output does not change when a masked
patch's pixels do; the prefix on all tokens would), a hit batch gives the uncached loss bit for bit, rows only count
once their flag is set, a foreign cache (run fingerprint or prefix weights) is refused in one line, the fit check,
the --plan_only size line; through the CLI (slow): bit-identical loss and weights with and without the cache across
freezes and across a resume with a warm cache."""
import json
import shutil

import numpy as np
import pytest
import torch

from cli_inproc import cli
from conftest import TINY_PRETRAIN_FLAGS
from fixed_views import FixedViews, model_inputs
from models_mim import create_model
from prefix_cache import PrefixCache
from util.datasets import build_dataset, pretrain_transform
from util.errors import UserError

pytestmark = pytest.mark.usefixtures('single_thread')
L, D, KEEP = 64, 64, 16


def tiny(**kw):
    torch.manual_seed(0)
    return create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=D, depth=4, num_heads=4,
                        decoder_embed_dim=16, **kw).train()


def _cache(root, n=32, full=False, **fp):
    return PrefixCache(str(root), n, 2, KEEP, L, D, full, dict({'data': 'x', 'seed': 0, 'mask_ratio': 0.75}, **fp))


def _batch(ds, idx, epoch):
    ds.set_epoch(epoch)
    items = [ds[i] for i in idx]
    return torch.stack([x for x, _ in items]), torch.utils.data.default_collate([m for _, m in items])


def test_no_leak_visible_rows_ignore_masked_pixels(tmp_path):
    m = tiny()
    m.set_frozen(2, embed_frozen=True)
    ids = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    imgs = torch.randn(2, 3, 32, 32)
    masked = int(ids[0, KEEP])  # a masked patch of image 0
    r, c = divmod(masked, 8)
    other = imgs.clone()
    other[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 3.0
    rows = []
    for k, x in enumerate((imgs, other)):
        cache = _cache(tmp_path / str(k))
        cache.open()
        m.prefix_cache = cache
        cached = {'vis': torch.zeros(0), 'full': torch.zeros(0), 'depth': [-1, -1], 'index': [3, 7], 'view': [1, 1]}
        m(x, mask_ratio=0.75, ids_shuffle=ids, cached=cached)
        rows.append(torch.from_numpy(np.array(cache._map(2, 1, 'vis', False)[3])))
    assert torch.equal(rows[0], rows[1])  # what is cached saw the visible tokens only
    with torch.no_grad():  # the trap the cache avoids: the prefix on all tokens, masked afterwards, leaks
        leaky = [m.unit_features(x)[2][0, 1:][ids[0, :KEEP]] for x in (imgs, other)]
    assert not torch.allclose(leaky[0], leaky[1])


def test_hit_batch_is_bit_identical_and_flags_gate_rows(demo_root, tmp_path):
    ds = FixedViews(build_dataset(demo_root, 'train', pretrain_transform(32), allow_root=True, seed=3), 2, 3, L)
    ref, cached_model = tiny(prefix_target='add'), tiny(prefix_target='add')
    for m in (ref, cached_model):
        m.set_frozen(2, embed_frozen=True)
    cache = _cache(tmp_path / 'c', full=True)
    cache.open()
    cached_model.prefix_cache = ds.cache = cache
    cache.set_depth(cached_model, 2)
    idx = [5, 1, 30, 12]
    losses = []
    for epoch in (1, 3):  # view 1 twice: fill, then hit
        imgs, meta = _batch(ds, idx, epoch)
        extra = model_inputs(meta, torch.device('cpu'))
        hits = cache.hits
        torch.manual_seed(0)
        a = cached_model(imgs, mask_ratio=0.75, **extra)['loss']
        torch.manual_seed(0)
        b = ref(imgs, mask_ratio=0.75, ids_shuffle=extra['ids_shuffle'])['loss']
        assert torch.equal(a, b)
        losses.append(a)
        assert cache.hits - hits == (epoch == 3)
    assert extra['cached']['depth'] == [2] * 4  # the second time every row came from the loader
    fl = cache._map(2, 1, 'visflags', True)
    fl[5] = 0  # a row whose flag is unset (a crash between data and flag) is a miss, recomputed
    assert cache.read(5, 1)['depth'] == -1 and cache.read(1, 1)['depth'] == 2


def test_deeper_freeze_extends_shallower_rows_bit_identically(demo_root, tmp_path):
    ds = FixedViews(build_dataset(demo_root, 'train', pretrain_transform(32), allow_root=True, seed=3), 2, 3, L)
    ref, cm = tiny(prefix_target='replace'), tiny(prefix_target='replace')
    cache = _cache(tmp_path / 'c', full=True)
    cache.open()
    cm.prefix_cache = ds.cache = cache
    idx = list(range(32))
    for epoch, depth in ((0, 1), (2, 3)):  # view 0 at depth 1 (fill), then at depth 3 (extend by blocks 2, 3)
        for m in (ref, cm):
            m.set_frozen(depth, embed_frozen=True)
        cache.set_depth(cm, depth)
        imgs, meta = _batch(ds, idx, epoch)
        extra = model_inputs(meta, torch.device('cpu'))
        assert extra['cached']['depth'] == [-1 if epoch == 0 else 1] * 32
        torch.manual_seed(0)
        a = cm(imgs, mask_ratio=0.75, **extra)['loss']
        torch.manual_seed(0)
        b = ref(imgs, mask_ratio=0.75, ids_shuffle=extra['ids_shuffle'])['loss']
        assert torch.equal(a, b)
    assert cache.extended == 1 and cache.hits == 0
    names = sorted(f.name for f in (tmp_path / 'c').iterdir())
    assert not any(n.startswith('depth1_') for n in names)  # view 0 complete at depth 3: depth-1 rows deleted
    assert 'depth3_view0.vis' in names and cache.read(4, 0)['depth'] == 3


def test_foreign_cache_and_prefix_weights_refused(tmp_path):
    _cache(tmp_path).open()
    _cache(tmp_path).open()  # the same run: accepted
    with pytest.raises(UserError, match=r'holds the cache of another run \(seed differ\)'):
        _cache(tmp_path, seed=1).open()
    a, b = tiny(), tiny()
    with torch.no_grad():
        b.blocks[0].attn.qkv.weight.add_(1e-3)
    _cache(tmp_path).set_depth(a, 1)
    _cache(tmp_path).set_depth(a, 1)
    with pytest.raises(UserError, match='depth-1 rows were computed by other frozen weights'):
        _cache(tmp_path).set_depth(b, 1)
    _cache(tmp_path).set_depth(b, 0)  # the embedding alone is the same: fine


def test_fit_check(tmp_path, monkeypatch):
    c = _cache(tmp_path, n=1000)
    assert c.bytes_on_disk() == 2 * 1000 * (4 * (1 + KEEP) * D + 1)
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(UserError, match='the cache needs 0.01 GiB .* the disk has 0.00 GiB free'):
        c.open()


def _args(demo_root, out, *extra):
    return [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--output_dir', out, '--epochs', '8', '--save_freq', '1',
            '--vis_freq', '0', '--fixed_views', '2', '--t_0', '0.1', '--how_scale', 'cubic', *extra]


def test_plan_only_prints_the_size_and_creates_nothing(demo_root, tmp_path):
    rc, out, err = cli('run_pretrain.py', _args(demo_root, '', '--plan_only', '--prefix_cache', tmp_path / 'c'))
    assert rc == 0, err[-3000:]
    line = next(l for l in out.splitlines() if l.startswith('prefix cache'))
    kib = (4 * (1 + KEEP) * D + 1) / 1024
    assert f'(2 views x 32 images x {kib:.1f} KiB, float32); ' in line and 'on top of the' in line
    assert not (tmp_path / 'c').exists()


@pytest.mark.parametrize('extra,msg', [
    (['--fixed_views', '0'], 'needs --fixed_views K'),
    (['--dont_freeze_pe'], 'with --dont_freeze_pe'),
])
def test_cli_refusals_are_one_line(demo_root, tmp_path, extra, msg):
    rc, out, err = cli('run_pretrain.py', _args(demo_root, tmp_path / 'o', '--prefix_cache', tmp_path / 'c', *extra))
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc != 0 and len(lines) == 1 and msg in lines[0], err
    assert not (tmp_path / 'o').exists() and not (tmp_path / 'c').exists()


def test_cli_storage_dtype_without_a_cache_refused(demo_root, tmp_path):
    rc, out, err = cli('run_pretrain.py', _args(demo_root, tmp_path / 'o', '--prefix_cache_dtype', 'float16'))
    assert rc != 0 and err.strip().splitlines() == ['error: --prefix_cache_dtype float16: needs --prefix_cache DIR']


@pytest.mark.slow
def test_cli_half_precision_cache_trains_close_to_the_uncached_run(demo_root, tmp_path):
    """fp16 rows: the losses of the epochs that read the cache differ from the uncached run's (rounded inputs),
    but by far less than the loss itself; the epochs before any cached read are identical."""
    ref, half = tmp_path / 'ref', tmp_path / 'half'
    rc, out, err = cli('run_pretrain.py', _args(demo_root, ref))
    assert rc == 0, err[-3000:]
    rc, out, err = cli('run_pretrain.py', _args(demo_root, half, '--prefix_cache', tmp_path / 'c',
                                                '--prefix_cache_dtype', 'float16'))
    assert rc == 0, err[-3000:]
    a = [json.loads(l)['train_loss'] for l in (ref / 'log.txt').read_text().splitlines()]
    b = [json.loads(l) for l in (half / 'log.txt').read_text().splitlines()]
    read = [i for i, r in enumerate(b) if r.get('prefix_cache_hit_share', 0) + r.get('prefix_cache_extend_share', 0)]
    assert read and a[:read[0]] == [r['train_loss'] for r in b][:read[0]]
    assert [r['train_loss'] for r in b] != a
    assert all(abs(r['train_loss'] - x) < 1e-2 * x for r, x in zip(b, a))


def test_cli_foreign_cache_refused(demo_root, tmp_path):
    _cache(tmp_path / 'c').open()  # another run's fingerprint
    rc, out, err = cli('run_pretrain.py', _args(demo_root, tmp_path / 'o', '--prefix_cache', tmp_path / 'c'))
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc != 0 and len(lines) == 1 and 'holds the cache of another run' in lines[0], err


@pytest.mark.slow
def test_cli_bit_identical_across_freezes_and_a_warm_resume(demo_root, tmp_path):
    """8 epochs of 4 steps, K = 2: units freeze in epochs 1, 1, 2 and 4 (the prefix 3 blocks deep from epoch 4 on);
    rows written at depths 1-3 are read and extended by the blocks frozen since; epoch 7 reads view 1 at depth 3."""
    ref, cached, res = tmp_path / 'ref', tmp_path / 'cached', tmp_path / 'res'
    flags = ['--prefix_target', 'add']
    rc, out, err = cli('run_pretrain.py', _args(demo_root, ref, *flags))
    assert rc == 0, err[-3000:]
    rc, out, err = cli('run_pretrain.py', _args(demo_root, cached, *flags, '--prefix_cache', tmp_path / 'c'))
    assert rc == 0, err[-3000:]
    a = [json.loads(l) for l in (ref / 'log.txt').read_text().splitlines()]
    b = [json.loads(l) for l in (cached / 'log.txt').read_text().splitlines()]
    assert [r['train_loss'] for r in a] == [r['train_loss'] for r in b]
    # epoch 1 wrote no rows before the embedding froze, 2 on: every epoch from 4 reads (extends) all its rows
    assert [r.get('prefix_cache_hit_share', 0) + r.get('prefix_cache_extend_share', 0) for r in b][4:] == [1.0] * 4
    assert [r.get('prefix_cache_extend_share') for r in b][4:] == [1.0, 1.0, 1.0, 0.0]  # the last freeze: epoch 4
    res.mkdir()  # resume after epoch 6 with the warm cache: epoch 7 still reads it, same result
    shutil.copy(cached / 'checkpoint-6.pth', res / 'checkpoint-last.pth')
    (res / 'log.txt').write_text(''.join((cached / 'log.txt').read_text().splitlines(keepends=True)[:7]))
    rc, out, err = cli('run_pretrain.py', _args(demo_root, res, *flags, '--prefix_cache', tmp_path / 'c'))
    assert rc == 0 and 'Resumed from' in out, err[-3000:]
    c = [json.loads(l) for l in (res / 'log.txt').read_text().splitlines()]
    assert [r['train_loss'] for r in c] == [r['train_loss'] for r in a]
    assert c[-1]['prefix_cache_hit_share'] == 1.0
    wa = torch.load(ref / 'checkpoint-last.pth', map_location='cpu', weights_only=True)['model']
    for d in (cached, res):
        wb = torch.load(d / 'checkpoint-last.pth', map_location='cpu', weights_only=True)['model']
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_write_after_a_read_only_open_in_the_same_process(tmp_path):
    # --num_workers 0: read() runs in the main process and opens existing files read-only (a resume, or a file
    # another rank created); a later write of a missing row of that file must reopen it writable
    m = tiny()
    m.set_frozen(2, embed_frozen=True)
    first = _cache(tmp_path, n=8)
    first.open()
    first.set_depth(m, 2)
    first.write(2, [0, 0], [0, 1], {'vis': torch.randn(2, 1 + KEEP, D)})
    c = _cache(tmp_path, n=8)  # a new process on the same folder
    c.open()
    c.set_depth(m, 2)
    assert c.read(0, 0)['depth'] == 2 and c.read(5, 0)['depth'] == -1
    rows = torch.randn(2, 1 + KEEP, D)
    c.write(2, [0, 0], [5, 6], {'vis': rows})
    got = c.read(5, 0)
    assert got['depth'] == 2 and torch.equal(got['vis'], rows[0])


def test_read_falls_back_when_the_data_file_is_gone(tmp_path):
    # a view's shallower files are unlinked by the process that completes it deeper (another rank, or the main
    # process under a worker): a reader that has the flags but not yet the data file treats the row as missing
    m = tiny()
    m.set_frozen(1, embed_frozen=True)
    w = _cache(tmp_path, n=8)
    w.open()
    w.set_depth(m, 1)
    w.write(1, [0], [3], {'vis': torch.randn(1, 1 + KEEP, D)})
    r = _cache(tmp_path, n=8)
    r.open()
    r.set_depth(m, 2)
    assert r._map(1, 0, 'visflags', False)[3] == 1  # its flags mapped (as by an earlier read)
    (tmp_path / 'depth1_view0.vis').unlink()
    got = r.read(3, 0)
    assert got['depth'] == -1 and not got['vis'].any()


def test_nothing_frozen_reads_empty_rows(tmp_path):
    # before the first freeze every row is a miss: the loader must not build and ship zero rows of
    # [1 + keep, D] (and [1 + L, D] with --prefix_target) per image and step
    c = _cache(tmp_path, n=8, full=True)
    c.open()
    got = c.read(3, 0)
    assert got['depth'] == -1 and got['vis'].numel() == 0 and got['full'].numel() == 0
    m = tiny()
    m.set_frozen(1, embed_frozen=True)
    c.set_depth(m, 1)  # frozen: a missing row keeps its shape (a batch may mix present and missing rows)
    got = c.read(3, 0)
    assert got['depth'] == -1 and got['vis'].shape == (1 + KEEP, D) and got['full'].shape == (1 + L, D)


@pytest.mark.parametrize('dtype,rel', [('float16', 2.0 ** -11), ('bfloat16', 2.0 ** -8)])
def test_half_precision_storage_rounds_within_its_bound_and_halves_the_files(tmp_path, dtype, rel):
    """--prefix_cache_dtype: rows come back as fp32 within the dtype's rounding (relative error <= 2^-11 fp16, 2^-8
    bf16, for normal values), the files are half the fp32 size, and the dtype is part of the fingerprint."""
    from prefix_cache import PrefixCache, from_storage, to_storage
    from util.errors import UserError
    torch.manual_seed(0)
    rows = torch.randn(3, 5, 8) * 4
    back = from_storage(to_storage(rows, dtype), dtype)
    assert back.dtype == torch.float32 and back.shape == rows.shape
    assert ((back - rows).abs() <= rel * rows.abs()).all()
    assert not torch.equal(back, rows)  # it does round
    assert torch.equal(from_storage(to_storage(rows, 'float32'), 'float32'), rows)
    args = dict(num_images=4, views=2, keep=4, num_patches=16, dim=8, full=True, fingerprint={'seed': 0})
    assert PrefixCache(str(tmp_path / 'h'), dtype=dtype, **args).bytes_per_view() == \
        4 * (2 * (5 * 8 + 17 * 8) + 2)
    assert PrefixCache(str(tmp_path / 'f'), **args).bytes_per_view() == 4 * (4 * (5 * 8 + 17 * 8) + 2)
    PrefixCache(str(tmp_path / 'c'), dtype=dtype, **args).open()
    with pytest.raises(UserError, match=r'holds the cache of another run \(dtype differ\)'):
        PrefixCache(str(tmp_path / 'c'), **args).open()
