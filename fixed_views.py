"""Fixed views (``--fixed_views K``): every image gets K fixed (augmentation, mask) pairs drawn from the run's seed;
epoch e uses pair ``e mod K``.

A training-recipe change in its own right (the model sees K views of each image instead of a fresh one per epoch),
and the precondition of caching what a frozen prefix computes (``prefix_cache.py``): a cache entry is only reusable
when the same image arrives with the same crop, flip and mask.

View v of image i is a pure function of (seed, i, v), independent of the batch it lands in, the rank, the world
size, the worker count and the resume point:

* augmentation: the wrapped dataset's per-sample seeding, with its epoch set to ``e mod K``, so view v is exactly
  the augmentation that epoch v of the default (unfixed) run draws for that image;
* mask: ``ids_shuffle`` [L] = a permutation from a private CPU generator seeded by ``mix_seed(seed, MASK_TAG, v, i)``
  drawn in the loader (workers), not in the training step: no device RNG, no host sync, nothing per step. The model
  turns it into (kept tokens, mask, ids_restore) exactly as its random masking does (``masking.shuffle_to_mask``).

The loader then yields ``(images, {'ids_shuffle': [B, L], 'index': [B], 'view': [B]})``; the engine passes the dict
to the model as keyword arguments. Without the flag nothing here runs: the dataset and model are the default ones.
"""
from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils.data import Dataset

from util.errors import UserError
from util.datasets import mix_seed

MASK_TAG = 0x4D41534B  # 'MASK': keeps the mask stream apart from the augmentation stream mix_seed(seed, v, i)


def view_of(epoch: int, k: int) -> int:
    return int(epoch) % int(k)


def view_ids_shuffle(seed: int, index: int, view: int, num_patches: int) -> torch.Tensor:
    """[L] int64 token order of (image ``index``, view ``view``): the first ``int(L (1 - ratio))`` stay visible."""
    g = torch.Generator().manual_seed(mix_seed(seed, MASK_TAG, view, index))
    return torch.randperm(num_patches, generator=g)


class FixedViews(Dataset):
    """Wraps a seeded dataset (``SafeImageFolder(seed=...)``) so that epoch e draws view ``e mod K`` of every image.

    ``__getitem__(i)`` -> ``(image, {'ids_shuffle': [L], 'index': i, 'view': v})``. ``set_epoch`` (driven by
    ``util.datasets.seed_loader_epoch``) sets the wrapped dataset's augmentation epoch to ``e mod K``; the sampler
    still shuffles by the real epoch, so batches differ from epoch to epoch while each image's views repeat.
    """

    def __init__(self, dataset: Any, k: int, seed: int, num_patches: int):
        if getattr(dataset, 'seed', None) is None:
            raise ValueError('FixedViews needs a dataset with per-sample seeded augmentation (seed=...)')
        self.dataset, self.k, self.seed, self.num_patches = dataset, int(k), int(seed), int(num_patches)
        self.epoch = 0
        self.cache = None  # a prefix_cache.PrefixCache (--prefix_cache), read in the workers
        self.dataset.set_epoch(0)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # root, samples, classes, ... of the wrapped folder
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(view_of(epoch, self.k))

    @property
    def view(self) -> int:
        return view_of(self.epoch, self.k)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        img, _ = self.dataset[index]
        v = self.view
        meta = {'ids_shuffle': view_ids_shuffle(self.seed, index, v, self.num_patches), 'index': int(index),
                'view': v}
        if self.cache is not None:  # --prefix_cache: this view's rows of the frozen prefix, if present
            meta['cached'] = self.cache.read(int(index), v)
        return img, meta


def check_fixed_views(args) -> None:
    """Flag combinations --fixed_views cannot honour, refused in one line before any work."""
    k = getattr(args, 'fixed_views', 0)
    if not k:
        return
    if getattr(args, 'mask_curriculum', None):
        raise UserError(f'--fixed_views {k} with --mask_curriculum: the curriculum changes the masks over training, '
                        f'fixed views keep them; drop one of the two')
    if getattr(args, 'data_backend', 'pil') != 'pil':
        raise UserError(f'--fixed_views {k} with --data_backend {args.data_backend}: fixed views are implemented '
                        f'for the pil loader only (per-sample seeded crops); use --data_backend pil')


def wrap_dataset(dataset: Any, args, num_patches: int) -> Any:
    """The pre-training dataset as the run uses it: ``FixedViews`` with --fixed_views K, else unchanged."""
    k: Optional[int] = getattr(args, 'fixed_views', 0)
    return FixedViews(dataset, k, args.seed, num_patches) if k else dataset


def model_inputs(meta: Any, device: torch.device) -> Dict[str, Any]:
    """Keyword arguments of the model from the loader's second element: the fixed views' dict (the mask order on
    the device, copied without a host sync; index and view as host lists, which DDP does not move to the device
    and reading them syncs nothing), {} for the default (labels)."""
    if not isinstance(meta, dict):
        return {}
    index, view = meta['index'].tolist(), meta['view'].tolist()
    out = {'ids_shuffle': meta['ids_shuffle'].to(device, non_blocking=True), 'index': index, 'view': view}
    if 'cached' in meta:
        c = meta['cached']
        out['cached'] = {'vis': c['vis'].to(device, non_blocking=True), 'full': c['full'].to(device, non_blocking=True),
                         'depth': c['depth'].tolist(), 'depth_t': c['depth'].to(device, non_blocking=True),
                         'index': index, 'view': view}
    return out
