"""--fixed_views K (fixed_views.py): view v of image i is a pure function of (seed, i, v) -- the same crop, flip and
mask whatever the batch size, rank/world size or epoch it is drawn in; epoch e uses view e mod K; view v's crop is
the default run's epoch-v crop; the model masks by the given order exactly as its random masking does; the default
(no flag) is untouched; through the CLI a run trains, logs and resumes exactly; one-line refusals."""
import json
import shutil

import pytest
import torch

from cli_inproc import cli
from conftest import TINY_PRETRAIN_FLAGS
from fixed_views import FixedViews, model_inputs, view_ids_shuffle
from masking import shuffle_to_mask
from models_mim import create_model
from util.datasets import build_dataset, build_loader, pretrain_transform, seed_loader_epoch

pytestmark = pytest.mark.usefixtures('single_thread')
L = 64  # 32 px / patch 4


def tiny_model(**kw):
    torch.manual_seed(0)
    return create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                        decoder_embed_dim=16, **kw)


def _ds(root, seed=3):
    return build_dataset(root, 'train', pretrain_transform(32), allow_root=True, seed=seed)


def test_view_is_a_function_of_seed_image_view(demo_root):
    fv = FixedViews(_ds(demo_root), 3, seed=3, num_patches=L)
    plain = _ds(demo_root)
    got = {}
    for e in range(7):
        fv.set_epoch(e)
        for i in (0, 5):
            img, meta = fv[i]
            assert meta['view'] == e % 3 and meta['index'] == i
            assert torch.equal(meta['ids_shuffle'].sort().values, torch.arange(L))  # a permutation
            if (i, e % 3) in got:  # epoch e repeats epoch e - 3 exactly
                assert torch.equal(img, got[i, e % 3][0]) and torch.equal(meta['ids_shuffle'], got[i, e % 3][1])
            got[i, e % 3] = (img, meta['ids_shuffle'])
            plain.set_epoch(e % 3)  # view v's augmentation = the default run's epoch v
            assert torch.equal(img, plain[i][0])
    assert not torch.equal(got[0, 0][0], got[0, 1][0]) and not torch.equal(got[0, 0][1], got[0, 1][1])
    assert not torch.equal(got[0, 0][1], got[5, 0][1])
    assert torch.equal(view_ids_shuffle(3, 5, 1, L), got[5, 1][1])
    assert not torch.equal(view_ids_shuffle(4, 5, 1, L), got[5, 1][1])  # another seed, another mask


def _views_seen(root, batch, world, epoch):
    out = {}
    for rank in range(world):
        loader = build_loader(FixedViews(_ds(root), 2, 3, L), batch, shuffle=True, drop_last=False, num_workers=0,
                              pin_mem=False, seed=3, distributed=world > 1, world_size=world, rank=rank)
        seed_loader_epoch(loader, 3, epoch, rank)
        for imgs, meta in loader:
            for b, i in enumerate(meta['index'].tolist()):
                out[i] = (imgs[b], meta['ids_shuffle'][b], int(meta['view'][b]))
    return out


def test_independent_of_batch_composition_rank_and_world_size(demo_root):
    a = _views_seen(demo_root, 4, 1, epoch=3)
    b = _views_seen(demo_root, 8, 2, epoch=3)  # other batches, two ranks' shards
    assert sorted(a) == sorted(b) == list(range(32))
    for i in a:
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]) and a[i][2] == b[i][2] == 1


def test_model_masks_by_the_given_order_as_random_masking_does():
    m = tiny_model()
    x = torch.randn(3, L, 8)
    torch.manual_seed(5)
    ref = m.random_masking(x, 0.75)
    torch.manual_seed(5)
    ids = torch.argsort(torch.rand(3, L), dim=1)
    assert all(torch.equal(p, q) for p, q in zip(ref, shuffle_to_mask(x, ids, 0.75)))
    imgs = torch.randn(3, 3, 32, 32)
    m.eval()
    torch.manual_seed(5)
    a = m(imgs, mask_ratio=0.75)['loss']
    state = torch.get_rng_state()
    b = m(imgs, mask_ratio=0.75, ids_shuffle=ids, index=[0, 1, 2], view=[0, 0, 0])['loss']
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())  # no global draw with a given order


def test_default_is_untouched():
    assert model_inputs(torch.tensor([1, 2]), torch.device('cpu')) == {}  # labels: nothing reaches the model
    from fixed_views import wrap_dataset
    import argparse
    ds = object()
    assert wrap_dataset(ds, argparse.Namespace(fixed_views=0, seed=0), L) is ds


def _args(demo_root, out, *extra):
    return [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--output_dir', out, '--epochs', '3', '--save_freq', '1',
            '--vis_freq', '0', *extra]


def test_cli_trains_and_resumes_exactly(demo_root, tmp_path):
    flags = ['--fixed_views', '2']
    ref, res = tmp_path / 'ref', tmp_path / 'res'
    rc, out, err = cli('run_pretrain.py', _args(demo_root, ref, *flags))
    assert rc == 0, err[-3000:]
    recs = [json.loads(l) for l in (ref / 'log.txt').read_text().splitlines()]
    rc, out, err = cli('run_pretrain.py', _args(demo_root, tmp_path / 'plain'))
    assert rc == 0, err[-3000:]
    plain = [json.loads(l) for l in (tmp_path / 'plain' / 'log.txt').read_text().splitlines()]
    assert recs[0]['train_loss'] != plain[0]['train_loss']  # same crops in epoch 0, other masks
    res.mkdir()
    shutil.copy(ref / 'checkpoint-1.pth', res / 'checkpoint-last.pth')
    (res / 'log.txt').write_text(''.join((ref / 'log.txt').read_text().splitlines(keepends=True)[:2]))
    rc, out, err = cli('run_pretrain.py', _args(demo_root, res, *flags))
    assert rc == 0 and 'Resumed from' in out, err[-3000:]
    a = torch.load(ref / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    b = torch.load(res / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


@pytest.mark.parametrize('extra,msg', [
    (['--fixed_views', '-1'], 'error: --fixed_views -1: must be'),
    (['--fixed_views', '2', '--mask_curriculum', 'min:max'], 'error: --fixed_views 2 with --mask_curriculum'),
    # before the DALI import check: the same line with or without DALI installed
    (['--fixed_views', '2', '--data_backend', 'dali'], 'error: --fixed_views 2 with --data_backend dali'),
])
def test_cli_errors_are_one_line(demo_root, tmp_path, extra, msg):
    rc, out, err = cli('run_pretrain.py', _args(demo_root, tmp_path / 'o', *extra))
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc != 0 and len(lines) == 1 and lines[0].startswith(msg), err
    assert not (tmp_path / 'o').exists()
