"""``--data_backend dali``: NVIDIA DALI loaders with the engines' DataLoader interface (imported only when chosen).

A :class:`DaliLoader` iterates ``(images [B, 3, S, S] float32 normalised, labels [B] int64)`` like the PIL
DataLoader, has ``len()``, ``dataset``, ``batch_size`` and the ``sampler.set_epoch`` / ``persistent_workers`` that
:func:`util.datasets.seed_loader_epoch` drives, so the engines take it unchanged.

Pipeline (one per epoch, built when the epoch's iteration starts):

* ``fn.readers.file`` over the ImageFolder's own file list (``SafeImageFolder.samples``: the same classes, labels and
  files as the PIL path; ``with_index`` datasets get the sample index as the label, as k-NN wants). Training: the
  list is permuted per epoch exactly as ``DistributedSampler(seed=seed)`` does (``randperm`` of a generator seeded
  ``seed + epoch``), padded with its first entries to a multiple of the world size, and sharded by the reader
  (``shard_id=rank``, ``num_shards=world``, ``stick_to_shard``): equal, disjoint shards, the same number of batches
  on every rank (DDP would hang otherwise). Evaluation: the contiguous non-padded shard of ``ShardSampler``.
* decode: ``fn.decoders.image_random_crop`` (decode and random-resized-crop fused: only the crop window is decoded,
  nvJPEG ROI decode) with ``device='mixed'`` on CUDA, ``'cpu'`` otherwise; then ``fn.resize`` (bicubic) to S x S,
  ``fn.crop_mirror_normalize`` (flip by ``fn.random.coin_flip``, ImageNet mean/std, CHW float). Evaluation:
  ``fn.decoders.image`` → resize shorter side (bicubic) → centre crop S, the same sizes as the PIL eval transforms.
* the last batch (solo-learn#177: epochs skipped or short because a DALI iterator's reader position and
  ``LastBatchPolicy`` disagree): no DALI iterator is used. Each epoch is a fresh pipeline that is run exactly
  ``len(loader)`` times: ``floor(shard / B)`` batches with ``drop_last`` (training), else ``ceil(shard / B)`` with the
  reader's ``pad_last_batch`` padding cut off the last batch. An epoch can neither run into the next nor be skipped.
* determinism: the pipeline seed is ``mix_seed(seed, epoch, rank)``, so epoch ``e`` of a run is a function of
  ``(seed, e, rank)`` only: a run resumed from ``checkpoint-N.pth`` (an epoch boundary) sees exactly the order and
  augmentation draws of the uninterrupted run. Mid-epoch restore (DALI reader checkpointing) is not used: the
  engines checkpoint at epoch ends.

Augmentation differences from the PIL path (DALI's own resampling, so values are close, not bit-equal):
random-resized-crop draws use DALI's RNG (same area 0.2..1 / 0.08..1 and ratio 3/4..4/3 ranges, 10 attempts, then the
whole image instead of torchvision's centre-crop fallback); fine-tuning's timm RandAugment, colour jitter and random
erasing are **not applied** (crop + flip only; mixup/cutmix run on the batch and are unchanged); the linear probe's
TF-style crop is DALI's RRC with the same ranges; ``--bad_images skip`` does not apply (a corrupt file stops the run
naming DALI's error).
"""
import math
from typing import Any, Iterator, List, Optional, Tuple

import torch

from util.errors import UserError

INSTALL_HINT = '--data_backend dali needs NVIDIA DALI: pip install -r requirements-dali.txt'
KINDS = ('pretrain', 'finetune', 'linprobe', 'eval', 'knn')
_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]   # IMAGENET_DEFAULT_MEAN/STD on 0..255 input
_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def require_dali():
    """Import DALI or raise the one-line install hint."""
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return fn, pipeline_def, types


def resize_shorter(kind: str, size: int) -> int:
    """Shorter side before the centre crop: the PIL eval transforms' sizes (eval: crop_pct 224/256 up to 224 px;
    k-NN: DINO's round(size·256/224))."""
    if kind == 'knn':
        return round(size * 256 / 224)
    return int(size / (224 / 256 if size <= 224 else 1.0))


def train_order(n: int, seed: int, epoch: int, world_size: int) -> List[int]:
    """``DistributedSampler``'s permutation of ``range(n)`` for ``epoch``, padded with its head to a multiple of
    ``world_size`` (the reader shards it contiguously)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / world_size) * world_size
    return (order * math.ceil(total / n))[:total]


class _EpochSampler:
    def __init__(self, loader: 'DaliLoader'):
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.epoch = int(epoch)


class DaliLoader:
    """One split of an ImageFolder through DALI; see the module docstring.

    Args:
        dataset: A :class:`util.datasets.SafeImageFolder` (its ``samples`` are the file list; kept as ``dataset``).
        kind: One of :data:`KINDS`: ``pretrain`` (RRC 0.2..1 + flip), ``finetune``/``linprobe`` (RRC 0.08..1 +
            flip), ``eval``/``knn`` (resize + centre crop).
        batch_size: Per-process batch size.
        input_size: Output side S in pixels.
        seed: Run seed (order and augmentation).
        world_size, rank: Sharding.
        shard: Shard over ranks (training always is when ``world_size > 1``; evaluation as ``ShardSampler``).
        drop_last: Drop the last incomplete batch (training).
        device: ``torch.device``: CUDA decodes on the GPU (``mixed``), anything else on the CPU.
        num_threads: DALI CPU threads (``--num_workers``, at least 1).
    """

    persistent_workers = False
    generator = None   # seed_loader_epoch reseeds a DataLoader's worker generator; DALI seeds per epoch itself

    def __init__(self, dataset: Any, kind: str, batch_size: int, input_size: int, seed: int, world_size: int = 1,
                 rank: int = 0, shard: bool = True, drop_last: bool = True, device: Optional[torch.device] = None,
                 num_threads: int = 1):
        require_dali()
        if kind not in KINDS:
            raise ValueError(f'kind {kind!r}: one of {KINDS}')
        self.dataset, self.kind, self.batch_size, self.input_size = dataset, kind, int(batch_size), int(input_size)
        self.seed, self.world_size, self.rank = int(seed), int(world_size) if shard else 1, int(rank) if shard else 0
        self.drop_last, self.num_threads = drop_last, max(1, int(num_threads))
        self.device = torch.device(device) if device is not None else torch.device('cpu')
        self.gpu = self.device.type == 'cuda'
        self.train = kind in ('pretrain', 'finetune', 'linprobe')
        self.with_index = bool(getattr(dataset, 'with_index', False))
        self.epoch = 0
        if self.train:
            self.sampler = _EpochSampler(self)
        else:  # the contiguous shard it reads, so util.knn.is_sharded sees a sharded evaluation loader
            from util.knn import ShardSampler
            self.sampler = ShardSampler(len(dataset.samples), self.world_size, self.rank)
        self.num_workers = self.num_threads

    # ---- the epoch's shard ----------------------------------------------------------------------------------
    def shard_len(self) -> int:
        n, w, r = len(self.dataset.samples), self.world_size, self.rank
        if self.train:
            return math.ceil(n / w)
        return n * (r + 1) // w - n * r // w

    def __len__(self) -> int:
        s = self.shard_len()
        return s // self.batch_size if self.drop_last else math.ceil(s / self.batch_size)

    def _files(self) -> Tuple[List[str], List[int], int, int]:
        """(files, labels, shard_id, num_shards) given to the reader this epoch."""
        samples = self.dataset.samples
        label = (lambda i: i) if self.with_index else (lambda i: int(samples[i][1]))
        if self.train:
            idx = train_order(len(samples), self.seed, self.epoch, self.world_size)
            return [samples[i][0] for i in idx], [label(i) for i in idx], self.rank, self.world_size
        n, w, r = len(samples), self.world_size, self.rank
        idx = range(n * r // w, n * (r + 1) // w)   # ShardSampler's contiguous, non-padded shard
        return [samples[i][0] for i in idx], [label(i) for i in idx], 0, 1

    def build_pipeline(self):
        fn, pipeline_def, types = require_dali()
        from util.datasets import mix_seed
        files, labels, shard_id, num_shards = self._files()
        size, kind, gpu = self.input_size, self.kind, self.gpu
        decode_dev = 'mixed' if gpu else 'cpu'
        op_dev = 'gpu' if gpu else 'cpu'

        @pipeline_def
        def pipe():
            jpegs, lab = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                         random_shuffle=False, stick_to_shard=True, pad_last_batch=True,
                                         name='Reader')
            if kind in ('pretrain', 'finetune', 'linprobe'):
                area = [0.2, 1.0] if kind == 'pretrain' else [0.08, 1.0]
                img = fn.decoders.image_random_crop(jpegs, device=decode_dev, output_type=types.RGB,
                                                    random_area=area, random_aspect_ratio=[3 / 4, 4 / 3],
                                                    num_attempts=10)
                img = fn.resize(img, device=op_dev, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC)
                mirror = fn.random.coin_flip(probability=0.5)
                img = fn.crop_mirror_normalize(img, device=op_dev, dtype=types.FLOAT, output_layout='CHW',
                                               mean=_MEAN, std=_STD, mirror=mirror)
            else:
                img = fn.decoders.image(jpegs, device=decode_dev, output_type=types.RGB)
                img = fn.resize(img, device=op_dev, resize_shorter=resize_shorter(kind, size),
                                interp_type=types.INTERP_CUBIC)
                img = fn.crop_mirror_normalize(img, device=op_dev, dtype=types.FLOAT, output_layout='CHW',
                                               crop=(size, size), mean=_MEAN, std=_STD)
            return img, lab

        p = pipe(batch_size=self.batch_size, num_threads=self.num_threads,
                 device_id=(self.device.index or 0) if gpu else None,
                 seed=mix_seed(self.seed, self.epoch, self.rank) & 0x7FFFFFFF)
        p.build()
        return p

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        if n == 0:
            return
        p = self.build_pipeline()
        left = self.shard_len()
        try:
            for _ in range(n):
                imgs, labs = p.run()
                # DALI reuses its output buffers on the next run(): copy out
                x = torch.from_dlpack(imgs.as_tensor()).clone()
                y = torch.from_dlpack(labs.as_tensor()).reshape(-1).to(torch.int64)
                k = min(self.batch_size, left)
                left -= k
                if k < self.batch_size:   # the reader's pad_last_batch repeats: cut off (evaluation only)
                    x, y = x[:k], y[:k]
                yield x, y.to(x.device)
        finally:
            del p


def build_dali_loader(dataset: Any, kind: str, args: Any, *, shuffle_shard: bool = True, drop_last: bool = True,
                      world_size: int = 1, rank: int = 0, batch_size: Optional[int] = None,
                      device: Any = None) -> DaliLoader:
    """:class:`DaliLoader` from a script's flags (``input_size``, ``batch_size``, ``seed``, ``num_workers``,
    ``device``)."""
    dev = torch.device(device if device is not None else getattr(args, 'device', 'cpu'))
    if dev.type == 'cuda' and not torch.cuda.is_available():
        dev = torch.device('cpu')
    return DaliLoader(dataset, kind, batch_size or args.batch_size, args.input_size, args.seed,
                      world_size=world_size, rank=rank, shard=shuffle_shard, drop_last=drop_last, device=dev,
                      num_threads=getattr(args, 'num_workers', 1) or 1)

