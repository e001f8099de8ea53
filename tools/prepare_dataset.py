"""Write a copy of an ImageFolder with every image's longer side at most ``--max_side`` px (one-time preparation).

    python -m tools.prepare_dataset /data/imagenet/train /data/imagenet-320/train --max_side 320 [--quality 90]
        [--workers N]

JPEG decoding cost scales with the pixel count (FFCV's ``max_resolution``): ImageNet's mean image is ~400x350, so a
prepared copy at ``--max_side 320`` halves the work of every epoch's decode before the 224 px crop.

* Same class folders and file names (the relative path of every image is kept), so ``--data_path`` can point at
  the copy unchanged. Images are the files ImageFolder reads (torchvision's ``IMG_EXTENSIONS``); other files are
  not copied (listed in the manifest's ``other_files`` count).
* Never upscales: an image whose longer side is already <= N is copied byte for byte (no re-encoding loss).
* Larger images are resized with aspect ratio kept (``PIL.Image.thumbnail``: JPEG DCT-domain draft reduction to at
  least 2x the target, then bicubic) and saved in their **own format**: JPEGs re-encoded at ``--quality`` (default
  90), PNG/BMP/TIFF/WebP/... written in that format (lossless formats stay lossless; WebP gets ``--quality`` too).
  Pixel data is kept as stored (EXIF orientation is not applied, like the training loader); metadata is dropped.
* Resumable and idempotent: an output file that exists is done (files are written to a hidden temp name in the same
  folder and ``os.replace``-d into place, so a file exists only when complete); a rerun skips done files and
  removes temp files an interrupted run left behind. A source changed after its copy was written is not redone:
  delete the copy (or DST) to redo it.
* Parallel over ``--workers`` processes (default: all cores) with a progress count on stderr.
* ``DST/prepare_manifest.json``: counts (images, written, copied, skipped as done, failed), bytes in and out,
  ``max_side``, ``quality``, the source; unreadable images are listed there and make the exit status 1.
* Refused in one line (exit 2): a missing SRC, N <= 0, a quality outside 1..100, DST inside SRC (or SRC inside DST).
"""
import argparse
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Tuple

if __name__ == '__main__' and not __package__:  # run as a file (python tools/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'tools.prepare_dataset', *sys.argv[1:]])

from util.args import ArgumentParser, domain_errors, integer  # noqa: E402
from util.errors import UserError, exit_main  # noqa: E402

MANIFEST = 'prepare_manifest.json'
TMP_TAG = '.prepare-tmp-'   # hidden temp files: '.' + name + TMP_TAG + pid (no image extension: ImageFolder skips them)


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('src', metavar='SRC', help='ImageFolder root to read (class folders of images)')
    p.add_argument('dst', metavar='DST', help='root of the copy to write (created; must not be inside SRC)')
    p.add_argument('--max_side', required=True, type=int, domain=integer(1),
                   help='longest side of every output image in px (required; smaller images are not upscaled)')
    p.add_argument('--quality', default=90, type=int, domain=integer(1, 100),
                   help='JPEG/WebP quality of re-encoded images, 1..100 (default: 90)')
    p.add_argument('--workers', default=os.cpu_count() or 1, type=int, domain=integer(1),
                   help='parallel processes (default: os.cpu_count(), here %(default)s); 1 runs in this process')
    return p


def _is_image(name: str) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return name.lower().endswith(IMG_EXTENSIONS)


def list_images(src: str) -> Tuple[List[str], int]:
    """(sorted relative paths of the images under ``src``, number of other files)."""
    images, other = [], 0
    for root, dirs, files in os.walk(src, followlinks=True):
        dirs.sort()
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), src)
            if _is_image(f):
                images.append(rel)
            else:
                other += 1
    return sorted(images), other


def _tmp_name(dst_file: str) -> str:
    d, f = os.path.split(dst_file)
    return os.path.join(d, f'.{f}{TMP_TAG}{os.getpid()}')


def clean_temps(dst: str) -> int:
    """Remove temp files left by an interrupted run; returns how many."""
    n = 0
    for root, _, files in os.walk(dst):
        for f in files:
            if f.startswith('.') and TMP_TAG in f:
                os.remove(os.path.join(root, f))
                n += 1
    return n


def _write_atomic(dst_file: str, write) -> None:
    """``write(tmp_path)``, then rename into place: ``dst_file`` exists only when complete."""
    tmp = _tmp_name(dst_file)
    try:
        write(tmp)
        os.replace(tmp, dst_file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def prepare_one(job: Tuple[str, str, str, int, int]) -> Dict[str, object]:
    """Prepare one image. ``job`` = (src root, dst root, relative path, max_side, quality). Returns
    ``{'rel', 'status': 'skipped'|'copied'|'written'|'failed', 'bytes_in', 'bytes_out'[, 'error']}``."""
    from PIL import Image
    src_root, dst_root, rel, max_side, quality = job
    src_file, dst_file = os.path.join(src_root, rel), os.path.join(dst_root, rel)
    out = {'rel': rel, 'bytes_in': os.path.getsize(src_file)}
    if os.path.exists(dst_file):
        return {**out, 'status': 'skipped', 'bytes_out': os.path.getsize(dst_file)}
    os.makedirs(os.path.dirname(dst_file), exist_ok=True)
    try:
        with Image.open(src_file) as im:
            fmt = im.format
            if max(im.size) <= max_side:   # never upscale; no re-encoding loss either
                _write_atomic(dst_file, lambda tmp: shutil.copyfile(src_file, tmp))
                status = 'copied'
            else:
                im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)   # aspect kept, longer side = N
                if fmt == 'JPEG' and im.mode not in ('L', 'RGB', 'CMYK'):
                    im = im.convert('RGB')
                kw = {'quality': quality} if fmt in ('JPEG', 'WEBP') else {}
                _write_atomic(dst_file, lambda tmp: im.save(tmp, format=fmt, **kw))
                status = 'written'
    except (OSError, ValueError, SyntaxError) as e:   # unreadable/corrupt image: reported, the rest goes on
        return {**out, 'status': 'failed', 'bytes_out': 0, 'error': f'{type(e).__name__}: {e}'}
    return {**out, 'status': status, 'bytes_out': os.path.getsize(dst_file)}


def check_paths(src: str, dst: str) -> None:
    if not os.path.isdir(src):
        raise UserError(f'SRC {src}: no such directory')
    s, d = os.path.realpath(src), os.path.realpath(dst)
    if os.path.commonpath([s, d]) == s:
        raise UserError(f'DST {dst} is inside SRC {src} (or the same): the copy would be read as input; '
                        'choose a DST outside SRC')
    if os.path.commonpath([s, d]) == d:
        raise UserError(f'SRC {src} is inside DST {dst}: choose a DST that does not contain SRC')


class _Progress:
    """``done/total`` on stderr: tqdm when installed, else a count line at most every 2 s."""

    def __init__(self, total: int):
        self.total, self.n, self.t0, self.last = total, 0, time.time(), 0.0
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit='img', desc='prepare_dataset', file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
        elif time.time() - self.last > 2 or self.n == self.total:
            self.last = time.time()
            print(f'prepare_dataset: {self.n}/{self.total} ({self.n / (self.last - self.t0 + 1e-9):.0f} img/s)',
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def prepare(src: str, dst: str, max_side: int, quality: int = 90, workers: int = 1) -> Dict[str, object]:
    """Prepare ``src`` into ``dst`` (see the module docstring); returns the manifest (also written to
    ``dst/prepare_manifest.json``)."""
    check_paths(src, dst)
    os.makedirs(dst, exist_ok=True)
    removed = clean_temps(dst)
    images, other = list_images(src)
    jobs = [(src, dst, rel, max_side, quality) for rel in images]
    counts = {'written': 0, 'copied': 0, 'skipped': 0, 'failed': 0}
    bytes_in = bytes_out = 0
    failed = []
    progress = _Progress(len(jobs))
    t0 = time.time()

    def take(r):
        nonlocal bytes_in, bytes_out
        counts[r['status']] += 1
        bytes_in += r['bytes_in']
        bytes_out += r['bytes_out']
        if r['status'] == 'failed':
            failed.append({'file': r['rel'], 'error': r['error']})
        progress.update()

    try:
        if workers <= 1 or len(jobs) <= 1:
            for j in jobs:
                take(prepare_one(j))
        else:
            import multiprocessing as mp
            with mp.get_context('spawn' if sys.platform == 'darwin' else 'fork').Pool(workers) as pool:
                for r in pool.imap_unordered(prepare_one, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers)))):
                    take(r)
    finally:
        progress.close()
    manifest = {'src': os.path.abspath(src), 'max_side': max_side, 'quality': quality, 'images': len(jobs),
                **counts, 'other_files': other, 'temp_files_removed': removed, 'bytes_in': bytes_in,
                'bytes_out': bytes_out, 'seconds': round(time.time() - t0, 3), 'failed_files': failed}
    path = os.path.join(dst, MANIFEST)
    _write_atomic(path, lambda tmp: open(tmp, 'w').write(json.dumps(manifest, indent=1) + '\n'))
    return manifest


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    errors = domain_errors(args, parser)
    if errors:
        raise UserError(errors[0])
    m = prepare(args.src, args.dst, args.max_side, args.quality, args.workers)
    ratio = m['bytes_out'] / m['bytes_in'] if m['bytes_in'] else 1.0
    print(f"prepare_dataset: {m['images']} images -> {args.dst} (written {m['written']}, copied {m['copied']}, "
          f"skipped as done {m['skipped']}, failed {m['failed']}); {m['bytes_in'] / 1e6:.1f} MB -> "
          f"{m['bytes_out'] / 1e6:.1f} MB ({ratio:.0%}); manifest {os.path.join(args.dst, MANIFEST)}")
    if m['failed']:
        print(f"error: {m['failed']} unreadable image(s), e.g. {m['failed_files'][0]['file']}: "
              f"{m['failed_files'][0]['error']} (listed in the manifest)", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    exit_main(main, sys.argv[1:])
