"""Weighted k-NN evaluation of frozen features (DINO ``eval_knn`` convention, LOCALMIM.md §5).

Features are L2-normalised; each val image votes with its k most cosine-similar train images, neighbour j adding
``exp(sim_j / T)`` to its class; top-1/top-5 are read off the class scores. Differences from DINO, on purpose:
k is clipped to the train-set size (DINO fails below k), test images are processed in chunks sized by memory (DINO's
``N // 100`` chunk is 0 below 100 images), top-5 uses ``min(5, k, classes)`` ranks, ties between class scores go to
the lower class index, and under ``--dist_eval`` val images are classified on the rank that extracted them (counts
are summed), so nothing is padded or counted twice and the result equals a single-process run.

Online use during pre-training (call on every rank; returns the same dict everywhere)::

    from checkpoint_formats import encoder_from_mim_state
    from models_vit import encoder_features
    from util.knn import build_knn_loaders, knn_evaluate
    train_l, val_l = build_knn_loaders(args.knn_data_path, args.input_size, batch_size=128, num_workers=4,
                                       shard=args.distributed)
    enc = encoder_from_mim_state(model_without_ddp.state_dict(), vars(args)).to(device).eval()
    stats = knn_evaluate(lambda x: encoder_features(enc, x), train_l, val_l, device, ks=(20,))
    # stats == {'knn_k20_top1': 41.5, 'knn_k20_top5': 80.0}
"""
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from util import distributed as du
from util.errors import check
from util.log import MetricLogger

DEFAULT_KS = (10, 20, 100, 200)
# Elements of one [chunk, N_train] similarity block: 2^26 floats = 256 MiB (ImageNet: ~52 val images per chunk).
_CHUNK_ELEMS = 1 << 26


class ShardSampler(Sampler):
    """Contiguous, non-padded split of ``range(n)`` over ranks: rank r gets ``[n·r/w, n·(r+1)/w)``.

    Unlike ``DistributedSampler`` no index is repeated, so sums over ranks equal a single-process pass (a rank may
    get nothing when n < w). Used by ``--dist_eval`` evaluation and k-NN feature extraction.
    """

    def __init__(self, n: int, num_replicas: Optional[int] = None, rank: Optional[int] = None):
        self.n = int(n)
        self.num_replicas = du.get_world_size() if num_replicas is None else int(num_replicas)
        self.rank = du.get_rank() if rank is None else int(rank)
        self.start = self.n * self.rank // self.num_replicas
        self.end = self.n * (self.rank + 1) // self.num_replicas

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start


def is_sharded(loader: DataLoader) -> bool:
    """True if ``loader`` reads only this rank's part of its dataset (a :class:`ShardSampler` over > 1 ranks)."""
    s = getattr(loader, 'sampler', None)
    return isinstance(s, ShardSampler) and s.num_replicas > 1


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """Integer labels [N] of an ImageFolder-like dataset (``targets`` or ``samples``)."""
    if hasattr(dataset, 'targets'):
        return torch.as_tensor(list(dataset.targets), dtype=torch.long)
    return torch.as_tensor([s[1] for s in dataset.samples], dtype=torch.long)


@torch.no_grad()
def extract_features(feature_fn: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device: torch.device,
                     header: str = 'features', print_freq: int = 50,
                     gather: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``feature_fn`` over a loader of ``(images, index)`` batches.

    Returns ``(features [M, D] float32, indices [M])`` on ``device``. With ``gather`` (default: the loader is
    sharded) the shards of all ranks are gathered and scattered by index, so every rank returns the full set in
    dataset order (M = N) with exactly the features a single process would compute; otherwise the rows are this
    process's, in loader order.
    """
    feats: List[torch.Tensor] = []
    idxs: List[torch.Tensor] = []
    logger = MetricLogger()
    for images, index in logger.log_every(loader, print_freq, header):
        f = feature_fn(images.to(device, non_blocking=True))
        feats.append(f.float())
        idxs.append(index.to(device))
    dim = feats[0].shape[1] if feats else _probe_dim(feature_fn, loader, device)
    f = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    i = torch.cat(idxs) if idxs else torch.zeros(0, dtype=torch.long, device=device)
    if not (is_sharded(loader) if gather is None else gather):
        return f, i
    f, i = du.all_gather_cat(f), du.all_gather_cat(i)
    n = len(loader.dataset)
    bank = torch.zeros(n, f.shape[1], device=device)
    filled = torch.zeros(n, dtype=torch.bool, device=device)
    bank.index_copy_(0, i, f)
    filled[i] = True
    check(bool(filled.all()), f'{header}: {int((~filled).sum())} images were not extracted by any rank')
    return bank, torch.arange(n, device=device)


def _probe_dim(feature_fn: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader,
               device: torch.device) -> int:
    """Feature width for a rank whose shard is empty (it must still take part in the all-gather)."""
    img, _ = loader.dataset[0]
    return int(feature_fn(img.unsqueeze(0).to(device)).shape[1])


@torch.no_grad()
def knn_counts(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
               ks: Sequence[int], T: float, num_classes: int) -> Dict[int, Tuple[int, int]]:
    """Weighted k-NN on L2-normalised features: ``{k: (top-1 correct, top-5 correct)}`` (counts, not percent).

    Args:
        train_f: [N, D] unit-norm train features; train_y: [N] labels.
        test_f: [M, D] unit-norm test features; test_y: [M] labels.
        ks: neighbour counts; each is clipped to N.
        T: temperature of the exp(sim / T) vote weights.
        num_classes: C; top-5 counts a hit within the first min(5, k, C) ranked classes.
    """
    n_train = train_f.shape[0]
    check(n_train > 0, 'k-NN: the train set has no features')
    keff = {k: min(int(k), n_train) for k in ks}
    kmax = max(keff.values())
    rows = max(1, _CHUNK_ELEMS // n_train)
    correct = {k: [0, 0] for k in ks}
    train_y = train_y.to(train_f.device)
    for s in range(0, test_f.shape[0], rows):
        sim = test_f[s:s + rows] @ train_f.T                      # [b, N]
        top_sim, top_idx = sim.topk(kmax, dim=1, largest=True, sorted=True)
        top_lab, weight = train_y[top_idx], (top_sim / T).exp()   # [b, kmax]
        y = test_y[s:s + rows].to(train_f.device)
        for k in ks:
            kk = keff[k]
            scores = torch.zeros(y.shape[0], num_classes, device=train_f.device)
            scores.scatter_add_(1, top_lab[:, :kk], weight[:, :kk])
            ranked = scores.argsort(dim=1, descending=True, stable=True)
            hit = ranked == y[:, None]
            correct[k][0] += int(hit[:, 0].sum())
            correct[k][1] += int(hit[:, :min(5, kk, num_classes)].any(dim=1).sum())
    return {k: (c[0], c[1]) for k, c in correct.items()}


def knn_from_features(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                      ks: Sequence[int] = DEFAULT_KS, T: float = 0.07,
                      num_classes: Optional[int] = None) -> Dict[str, float]:
    """Normalise features and return ``{'knn_k{K}_top1': %, 'knn_k{K}_top5': %}`` for every k (one process)."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    c = knn_counts(F.normalize(train_f, dim=1), train_y, F.normalize(test_f, dim=1), test_y, ks, T, num_classes)
    n = max(1, test_f.shape[0])
    return _percent(c, n)


def _percent(counts: Dict[int, Tuple[float, float]], n: int) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for k, (c1, c5) in counts.items():
        out[f'knn_k{k}_top1'] = 100.0 * c1 / n
        out[f'knn_k{k}_top5'] = 100.0 * c5 / n
    return out


def knn_evaluate(feature_fn: Callable[[torch.Tensor], torch.Tensor], train_loader: DataLoader,
                 val_loader: DataLoader, device: torch.device, ks: Sequence[int] = DEFAULT_KS, T: float = 0.07,
                 num_classes: Optional[int] = None,
                 features_out: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, float]:
    """Extract features of both splits with ``feature_fn`` and run the weighted k-NN; call on every rank.

    Args:
        feature_fn: images [B,3,H,W] on ``device`` → features [B, D] (eval mode, no grad needed).
        train_loader, val_loader: loaders of ``(image, index)`` (datasets built with ``with_index=True``), e.g.
            from :func:`build_knn_loaders`. With a :class:`ShardSampler` each rank extracts its share.
        device: where features and the k-NN run.
        ks: neighbour counts (clipped to the train size); T: vote temperature.
        num_classes: number of classes (default: ``len(train dataset.classes)``).
        features_out: if a dict is given, it receives the normalised ``train_f``, ``train_y``, ``val_f``, ``val_y``
            (full val set, gathered) for ``--dump_features``.

    Returns:
        ``{'knn_k{K}_top1': %, 'knn_k{K}_top5': %}``, identical on all ranks.
    """
    train_ds, val_ds = train_loader.dataset, val_loader.dataset
    num_classes = num_classes or len(getattr(train_ds, 'classes', [])) or int(dataset_targets(train_ds).max()) + 1
    train_f, train_i = extract_features(feature_fn, train_loader, device, 'k-NN features (train):')
    # val stays sharded: each rank classifies its own images and the hit counts are summed
    val_f, val_i = extract_features(feature_fn, val_loader, device, 'k-NN features (val):', gather=False)
    train_f, val_f = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
    train_y = dataset_targets(train_ds).to(device)[train_i]
    val_y = dataset_targets(val_ds).to(device)[val_i]
    counts = knn_counts(train_f, train_y, val_f, val_y, ks, T, num_classes)
    if is_sharded(val_loader):
        t = torch.tensor([[c1, c5] for c1, c5 in counts.values()], dtype=torch.float64,
                         device=du.collective_device())
        du.all_reduce_tensor(t)
        counts = {k: (float(t[j, 0]), float(t[j, 1])) for j, k in enumerate(counts)}
    if features_out is not None:
        if is_sharded(val_loader):
            val_f, val_i = du.all_gather_cat(val_f), du.all_gather_cat(val_i)
            order = torch.argsort(val_i)
            val_f, val_i = val_f[order], val_i[order]
        features_out.update(train_f=train_f.cpu(), train_y=train_y.cpu(), val_f=val_f.cpu(),
                            val_y=dataset_targets(val_ds)[val_i.cpu()])
    return _percent(counts, max(1, len(val_ds)))


def format_knn(results: Dict[str, float], ks: Iterable[int]) -> List[str]:
    """One line per k: ``k-NN k=20: top-1 71.25 top-5 93.10``."""
    return [f"k-NN k={k}: top-1 {results[f'knn_k{k}_top1']:.2f} top-5 {results[f'knn_k{k}_top5']:.2f}" for k in ks]


def build_knn_loaders(data_path: str, input_size: int, batch_size: int, num_workers: int, shard: bool,
                      pin_mem: bool = True, bad_images: str = 'fail',
                      flag: str = '--data_path', backend: str = 'pil', seed: int = 0,
                      device: Optional[torch.device] = None) -> Tuple[DataLoader, DataLoader]:
    """``(train, val)`` loaders of ``(image, index)`` with DINO's eval transform (resize round(input·256/224),
    centre crop ``input_size``) over ``<data_path>/train`` and ``<data_path>/val``; sharded over ranks if
    ``shard``. Raises UserError (naming ``flag``) if val/ has other class folders than train/ (labels are folder
    indices, so the accuracy would be meaningless) or fewer images than there are classes. Shared by run_knn.py and
    the online k-NN of run_pretrain.py."""
    from util.datasets import build_dataset, knn_transform
    tf = knn_transform(input_size)
    train = build_dataset(data_path, 'train', tf, bad_images=bad_images, with_index=True)
    val = build_dataset(data_path, 'val', tf, bad_images=bad_images, with_index=True)
    check(len(val) >= len(train.classes),
          f'{flag} {data_path}: val/ has {len(val)} images but train/ has {len(train.classes)} classes; '
          f'k-NN accuracy needs at least one val image per class')
    check(train.classes == val.classes,
          f'{flag} {data_path}: val/ class folders differ from train/; labels are folder indices')

    def make(ds: Dataset) -> DataLoader:
        if backend == 'dali':  # same sizes (resize round(input*256/224), centre crop), same shards, index labels
            from util.dali_loader import DaliLoader
            dev = torch.device(device) if device is not None else torch.device('cpu')
            return DaliLoader(ds, 'knn', batch_size, input_size, seed, world_size=du.get_world_size(),
                              rank=du.get_rank(), shard=shard, drop_last=False,
                              device=dev if dev.type != 'cuda' or torch.cuda.is_available() else 'cpu',
                              num_threads=num_workers)
        sampler = ShardSampler(len(ds)) if shard else SequentialSampler(ds)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                          pin_memory=bool(pin_mem and torch.cuda.is_available()), drop_last=False)
    return make(train), make(val)


def clipped_ks(ks: Sequence[int], n_train: int) -> List[str]:
    """Messages for every k larger than the train set (it is clipped to ``n_train``)."""
    return [f'note: k={k} exceeds the {n_train} train images; using all {n_train} neighbours for k={k}'
            for k in ks if k > n_train]
