"""Throughput of the pre-training input pipeline per worker process, and cheap wins checked for equivalence.

    python -m bench.data_pipeline --images 256 --workers 1,2,4,8 --batches 8 --json data.json

Writes its own ImageNet-like JPEGs once (``--images`` photo-like 500×375 pictures at quality 90: smooth colour
fields, edges, texture and noise, ~60-110 KB each like ImageNet's) into ``--dir``, then times, for each variant and
each worker count, a ``DataLoader`` (batch ``--batch_size``, shuffled, ``--batches`` batches after one warm-up
batch) and reports img/s and img/s per worker.

Variants (all end in the same float [3, S, S] normalised tensor unless noted):

    baseline  what run_pretrain.py does: PIL decode -> RandomResizedCrop(0.2-1, bicubic) -> flip -> ToTensor ->
              Normalize (util.datasets.pretrain_transform)
    draft     PIL ``draft()``: the JPEG decoder downscales by 1/2, 1/4 or 1/8 in the DCT domain, chosen so the
              crop still has >= S pixels per side; the crop box (drawn on the full size, same RNG use) is scaled
    tvjpeg    torchvision.io.decode_jpeg on the file bytes, then torchvision v2 crop/resize (bicubic, antialias)
              on the uint8 tensor
    uint8     baseline up to the flip, then uint8 [3, S, S] out of the worker (4x smaller to pin and copy); the
              division and normalisation happen after the batch arrives (as they would on the GPU)

Equivalence (``--check N``): the same N images through every variant with the same crop/flip draws, compared with
baseline: max and mean abs difference in normalised units and PSNR over the [0, 1] image. ``uint8`` must be
bit-equal (same PIL ops, the same float maths later); draft and tvjpeg resample differently (DCT-domain scaling;
another bicubic kernel), so they are faster *different* augmentations — none of them is a default.
"""
import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Tuple

if __name__ == '__main__' and not __package__:  # run as a file (python bench/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'bench.data_pipeline', *sys.argv[1:]])

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from PIL import Image  # noqa: E402

from util.datasets import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from util.log import write_json  # noqa: E402

VARIANTS = ['baseline', 'draft', 'tvjpeg', 'uint8']
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def write_images(root: str, n: int, width: int, height: int, quality: int, seed: int = 0) -> List[str]:
    """Photo-like JPEGs (kept between runs; regenerated when the count or size differs)."""
    os.makedirs(root, exist_ok=True)
    paths = [os.path.join(root, f'img{i:05d}.JPEG') for i in range(n)]
    stamp = os.path.join(root, 'spec.json')
    spec = {'n': n, 'width': width, 'height': height, 'quality': quality, 'seed': seed}
    if os.path.isfile(stamp) and json.load(open(stamp)) == spec and all(os.path.isfile(p) for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for p in paths:
        img = np.zeros((height, width, 3), np.float32)
        for c in range(3):  # smooth colour field: a few random low-frequency waves
            for _ in range(4):
                fx, fy, ph = rng.uniform(0.002, 0.02, 2).tolist() + [rng.uniform(0, 6.3)]
                img[..., c] += np.sin(xx * fx * 6.3 + yy * fy * 6.3 + ph)
        img = (img - img.min()) / (np.ptp(img) + 1e-6) * 180 + 30
        for _ in range(6):  # objects with hard edges
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
            inside = (xx - cx) ** 2 + ((yy - cy) * rng.uniform(0.5, 2)) ** 2 < r * r
            img[inside] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 8, img.shape)  # sensor noise / texture: JPEG sizes like real photos
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=quality)
    json.dump(spec, open(stamp, 'w'))
    return paths


class Pipeline(torch.utils.data.Dataset):
    """One variant of the pre-training pipeline; sample i of a run draws its crop/flip from seed (seed, i)."""

    def __init__(self, paths: List[str], variant: str, size: int, seed: int = 0):
        self.paths, self.variant, self.size, self.seed = paths, variant, size, seed

    def __len__(self) -> int:
        return len(self.paths)

    def _params(self, index: int, w: int, h: int):
        g = torch.Generator().manual_seed(self.seed * 1000003 + index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=g)))
            i, j, ch, cw = T.RandomResizedCrop.get_params(torch.empty(3, h, w, device='meta'), scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
            flip = bool(torch.rand(1) < 0.5)
        return i, j, ch, cw, flip

    def __getitem__(self, index: int):
        path, s = self.paths[index], self.size
        if self.variant == 'tvjpeg':
            from torchvision.io import decode_jpeg, read_file
            from torchvision.transforms import v2
            x = decode_jpeg(read_file(path))  # uint8 [3, H, W]
            i, j, ch, cw, flip = self._params(index, x.shape[2], x.shape[1])
            x = v2.functional.resized_crop(x, i, j, ch, cw, [s, s], interpolation=T.InterpolationMode.BICUBIC,
                                           antialias=True)
            if flip:
                x = x.flip(-1)
            return (x.float() / 255 - MEAN) / STD, 0
        img = Image.open(path)
        w, h = img.size  # from the header: no decode yet
        i, j, ch, cw, flip = self._params(index, w, h)
        if self.variant == 'draft':
            # the largest DCT downscale that keeps the crop at >= s pixels per side
            reduce = max(1, min(8, 2 ** int(math.floor(math.log2(max(1.0, min(ch, cw) / s))))))
            if reduce > 1:
                img.draft('RGB', (math.ceil(w / reduce), math.ceil(h / reduce)))
            fx, fy = img.size[0] / w, img.size[1] / h
            img = img.convert('RGB')
            i, j, ch, cw = i * fy, j * fx, ch * fy, cw * fx
            img = img.resize((s, s), Image.BICUBIC, box=(j, i, j + cw, i + ch))
        else:
            img = TF.resized_crop(img.convert('RGB'), i, j, ch, cw, [s, s], interpolation=T.InterpolationMode.BICUBIC)
        if flip:
            img = TF.hflip(img)
        if self.variant == 'uint8':
            return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1), 0
        return TF.normalize(TF.to_tensor(img), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), 0


def finish(batch: torch.Tensor) -> torch.Tensor:
    """The uint8 variant's last op (on the GPU in a real run): exactly ToTensor's /255 then Normalize."""
    return (batch.float().div(255) - MEAN) / STD if batch.dtype == torch.uint8 else batch


def time_batches(loader, batches: int, finish=finish, sync=lambda: None) -> Tuple[int, float]:
    """(images, seconds) of ``batches`` batches from any iterable of ``(images, labels)`` (a DataLoader, a
    util.dali_loader.DaliLoader), after one untimed batch; ``finish`` is applied to each batch and ``sync`` (a CUDA
    synchronize for a device loader) runs before the clock is read."""
    it, n, t0 = iter(loader), 0, None
    for k in range(batches + 1):
        try:
            x, _ = next(it)
        except StopIteration:  # fewer images than needed: start another pass (workers restart, counted)
            it = iter(loader)
            x, _ = next(it)
        finish(x)
        if k == 0:
            sync()
            t0 = time.perf_counter()  # after the first batch: worker start-up is not throughput
        else:
            n += x.shape[0]
    sync()
    return n, time.perf_counter() - t0


def time_loader(paths, variant, size, workers, batch_size, batches, seed) -> Dict[str, float]:
    ds = Pipeline(paths, variant, size, seed)
    g = torch.Generator().manual_seed(seed)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, generator=g,
                                     drop_last=True, persistent_workers=False,
                                     prefetch_factor=2 if workers else None)
    n, dt = time_batches(dl, batches)
    ips = n / dt if dt > 0 else float('nan')
    return {'variant': variant, 'workers': workers, 'images': n, 'seconds': dt, 'img_per_s': ips,
            'img_per_s_per_worker': ips / max(1, workers)}


def check_equivalence(paths, size, n, seed) -> Dict[str, Dict[str, float]]:
    base = Pipeline(paths, 'baseline', size, seed)
    ref = torch.stack([base[i][0] for i in range(n)])
    out = {}
    for v in VARIANTS[1:]:
        got = finish(torch.stack([Pipeline(paths, v, size, seed)[i][0] for i in range(n)]))
        d = (got - ref).abs()
        mse01 = float(((got - ref) * STD).pow(2).mean())  # back to [0, 1] pixel units
        out[v] = {'max_abs_diff': float(d.max()), 'mean_abs_diff': float(d.mean()), 'bit_equal': bool(d.max() == 0),
                  'psnr_db': float('inf') if mse01 == 0 else 10 * math.log10(1.0 / mse01)}
    return out


def main(argv=None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dir', default='/tmp/vitfreeze_bench_jpegs', help='where the JPEGs are written (default: %(default)s)')
    p.add_argument('--images', default=256, type=int, help='number of JPEGs (default: 256)')
    p.add_argument('--width', default=500, type=int, help='JPEG width in pixels (default: 500, ImageNet-like)')
    p.add_argument('--height', default=375, type=int, help='JPEG height in pixels (default: 375)')
    p.add_argument('--quality', default=90, type=int, help='JPEG quality (default: 90)')
    p.add_argument('--input_size', default=224, type=int, help='output side in pixels (default: 224)')
    p.add_argument('--batch_size', default=64, type=int, help='images per batch (default: 64)')
    p.add_argument('--batches', default=8, type=int, help='timed batches per measurement (default: 8)')
    p.add_argument('--workers', default=None,
                   help='comma list of worker counts, 0 = main process (default: 1,2,4,..,cpu count)')
    p.add_argument('--variants', default=','.join(VARIANTS), help=f'comma list of {VARIANTS} (default: all)')
    p.add_argument('--check', default=16, type=int, help='images compared for equivalence (default: 16; 0 = off)')
    p.add_argument('--seed', default=0, type=int)
    p.add_argument('--json', default=None, help='write the results here')
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    if args.workers:
        workers = [int(w) for w in args.workers.split(',')]
    else:
        cpus = os.cpu_count() or 1
        workers = sorted({min(cpus, 2 ** k) for k in range(int(math.log2(cpus)) + 1)} | {cpus})
    variants = [v.strip() for v in args.variants.split(',') if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f'error: --variants {",".join(bad)}: choose from {",".join(VARIANTS)}', file=sys.stderr)
        sys.exit(2)
    paths = write_images(args.dir, args.images, args.width, args.height, args.quality, args.seed)
    kb = sum(os.path.getsize(x) for x in paths) / len(paths) / 1024
    res: Dict[str, object] = {'images': len(paths), 'mean_jpeg_kb': kb, 'size': [args.width, args.height],
                              'input_size': args.input_size, 'batch_size': args.batch_size, 'cpu_count': os.cpu_count(),
                              'loadavg_at_start': list(os.getloadavg()), 'runs': []}
    print(f'{len(paths)} JPEGs {args.width}x{args.height} q{args.quality}, mean {kb:.0f} KB; output '
          f'{args.input_size}px, batch {args.batch_size}, {args.batches} timed batches')
    print(f"{'variant':<9} {'workers':>7} {'img/s':>9} {'img/s/worker':>13}")
    for v in variants:
        for w in workers:
            r = time_loader(paths, v, args.input_size, w, args.batch_size, args.batches, args.seed)
            res['runs'].append(r)
            print(f"{v:<9} {w:>7} {r['img_per_s']:>9.1f} {r['img_per_s_per_worker']:>13.1f}")
    if args.check:
        res['equivalence'] = check_equivalence(paths, args.input_size, min(args.check, len(paths)), args.seed)
        for v, e in res['equivalence'].items():
            print(f"{v:<9} vs baseline: max |diff| {e['max_abs_diff']:.3g}, mean {e['mean_abs_diff']:.3g} "
                  f"(normalised units), PSNR {e['psnr_db']:.1f} dB, bit-equal {e['bit_equal']}")
    res['loadavg_at_end'] = list(os.getloadavg())
    write_json(args.json, res)
    return res


if __name__ == '__main__':
    main()
