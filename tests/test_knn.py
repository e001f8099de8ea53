"""Weighted k-NN: literal reference, batch-size independence, exact distributed evaluation (tiny, CPU)."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import models_vit
import util.knn as knn
from engine_finetune import evaluate
from util.amp import make_amp
from util.datasets import build_dataset, eval_transform

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)


pytestmark = pytest.mark.usefixtures('single_thread')  # tiny tensors on 2 shared cores (tests/conftest.py)


def reference_knn(train_f, train_y, test_f, test_y, k, T, num_classes):
    """DINO's classifier written out literally: O(n_test · n_train) Python loops, float64."""
    train_f = F.normalize(train_f.double(), dim=1).tolist()
    test_f = F.normalize(test_f.double(), dim=1).tolist()
    top1 = top5 = 0
    for f, y in zip(test_f, test_y.tolist()):
        sims = sorted(((sum(a * b for a, b in zip(f, g)), j) for j, g in enumerate(train_f)), key=lambda t: -t[0])
        scores = [0.0] * num_classes
        for s, j in sims[:min(k, len(train_f))]:
            scores[int(train_y[j])] += math.exp(s / T)
        ranked = sorted(range(num_classes), key=lambda c: (-scores[c], c))
        top1 += ranked[0] == y
        top5 += y in ranked[:min(5, k, num_classes)]
    return 100.0 * top1 / len(test_f), 100.0 * top5 / len(test_f)


def _clustered(n, num_classes, dim, gen):
    y = torch.randint(0, num_classes, (n,), generator=gen)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1))
    return centres[y] + 1.2 * torch.randn(n, dim, generator=gen), y


@pytest.mark.parametrize('T', [0.07, 0.5])
def test_knn_matches_literal_reference(T, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    train_f, train_y = _clustered(40, 6, 8, gen)
    test_f, test_y = _clustered(23, 6, 8, gen)
    ks = [1, 3, 7, 20, 100]  # 100 > 40 train images: clipped
    got = knn.knn_from_features(train_f, train_y, test_f, test_y, ks, T, num_classes=6)
    for k in ks:
        ref1, ref5 = reference_knn(train_f, train_y, test_f, test_y, k, T, 6)
        assert got[f'knn_k{k}_top1'] == pytest.approx(ref1) and got[f'knn_k{k}_top5'] == pytest.approx(ref5), k
    assert 0 < got['knn_k3_top1'] < 100  # a non-trivial case
    monkeypatch.setattr(knn, '_CHUNK_ELEMS', 1)  # one test image per chunk: same answer
    assert knn.knn_from_features(train_f, train_y, test_f, test_y, ks, T, num_classes=6) == got
    assert knn.clipped_ks(ks, 40) == ['note: k=100 exceeds the 40 train images; using all 40 neighbours for k=100']


@pytest.mark.parametrize('n,world', [(10, 3), (1, 2), (16, 2)])
def test_shard_sampler_splits_without_padding(n, world):
    parts = [list(knn.ShardSampler(n, world, r)) for r in range(world)]
    assert sum(parts, []) == list(range(n))


def _encoder():
    torch.manual_seed(0)
    return models_vit.create_model('vit_tiny_patch16', **TINY, num_classes=0, global_pool='token').eval()


def test_result_independent_of_batch_size(demo_root):
    model = _encoder()
    out = {}
    for bs in (3, 16):
        train_l, val_l = knn.build_knn_loaders(str(demo_root), 32, bs, num_workers=0, shard=False)
        feats = {}
        with torch.no_grad():
            res = knn.knn_evaluate(lambda x: models_vit.encoder_features(model, x), train_l, val_l,
                                   torch.device('cpu'), ks=(1, 5, 20), features_out=feats)
        out[bs] = (res, feats)
    (r3, f3), (r16, f16) = out[3], out[16]
    torch.testing.assert_close(f3['train_f'], f16['train_f'], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f3['val_f'], f16['val_f'], rtol=1e-5, atol=1e-6)
    assert torch.equal(f3['val_y'], f16['val_y']) and r3 == r16
    assert all(0.0 <= v <= 100.0 for v in r3.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, root, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world)
    try:
        torch.save(_evaluate_all(root, shard=True), os.path.join(out_dir, f'rank{rank}.pth'))
    finally:
        torch.distributed.destroy_process_group()


def _evaluate_all(root, shard):
    """evaluate() of a fixed classifier and knn_evaluate() of a fixed encoder on the demo val set."""
    torch.manual_seed(0)
    clf = models_vit.create_model('vit_tiny_patch16', **TINY, num_classes=4).eval()
    val = build_dataset(root, 'val', eval_transform(32))
    sampler = knn.ShardSampler(len(val)) if shard else None
    loader = torch.utils.data.DataLoader(val, batch_size=3, sampler=sampler)
    stats = evaluate(clf, loader, torch.device('cpu'), make_amp(torch.device('cpu'), 'none'))
    enc = _encoder()
    train_l, val_l = knn.build_knn_loaders(root, 32, 5, num_workers=0, shard=shard)
    with torch.no_grad():
        res = knn.knn_evaluate(lambda x: models_vit.encoder_features(enc, x), train_l, val_l, torch.device('cpu'),
                               ks=(1, 5, 20))
    return dict(stats=stats, knn=res)


@pytest.mark.slow
def test_dist_eval_equals_single_process(demo_root, tmp_path):
    # fork, not spawn: the children need no fresh interpreter and torch/timm imports (seconds each on 2 cores)
    mp.start_processes(_dist_worker, args=(2, _free_port(), str(demo_root), str(tmp_path)), nprocs=2, join=True,
                       start_method='fork')
    single = _evaluate_all(str(demo_root), shard=False)
    for rank in range(2):
        got = torch.load(tmp_path / f'rank{rank}.pth', weights_only=True)
        assert got['knn'] == single['knn']
        assert got['stats']['acc1'] == single['stats']['acc1'] and got['stats']['acc5'] == single['stats']['acc5']
        assert got['stats']['loss'] == pytest.approx(single['stats']['loss'], rel=1e-6)  # fp32 batch sums


def test_val_smaller_than_class_count_is_a_user_error(tmp_path):
    import shutil

    from util.demo_data import make_demo_dataset
    from util.errors import UserError
    root = make_demo_dataset(tmp_path / 'd', num_classes=4, train_per_class=2, val_per_class=1, size=16)
    shutil.rmtree(root / 'val' / '00_hstripes')
    shutil.rmtree(root / 'val' / '01_vstripes')
    with pytest.raises(UserError, match='val/ has 2 images but train/ has 4 classes'):
        knn.build_knn_loaders(str(root), 16, 4, num_workers=0, shard=False)
