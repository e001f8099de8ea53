"""A cache of the frozen prefix (``--prefix_cache DIR``, needs ``--fixed_views K``): see docs/PREFIX_CACHE.md.

Once FreezeOut has frozen the embedding and the first d blocks, the prefix's output for (image i, view v) is a fixed
tensor. Stored is exactly what the uncached run computes there: the prefix run on the VISIBLE tokens of view v's
mask (cls + keep tokens, [1 + keep, D]) -- never the prefix on all tokens masked afterwards, which would leak the
masked patches into the visible tokens through attention -- and, with ``--prefix_target``, the prefix's LayerNorm'ed
full-image features of view v ([L, D], the target). Epochs after a freeze read rows where present and write them
where absent; a batch is served from the cache only when every row is present at the current depth, otherwise it
runs the prefix on the whole batch (the same batch shape as the uncached run) and writes the missing rows.

Layout under DIR (fp32, the dtype the prefix computes in, so a hit is bit-identical):
    cache.json                    run fingerprint: data list hash, images, K, seed, mask ratio, shapes
    depth{d}.json                 sha256 of the frozen prefix's weights at depth d (embedding + d blocks)
    depth{d}_view{v}.vis|.full    memory-mapped [N, 1 + keep, D] / [N, L, D] rows, indexed by dataset index
    depth{d}_view{v}.visflags|.fullflags   [N] uint8: row written (set after the row's data is flushed)
Files are created whole (a sparse, zero file under a temporary name, then hard-linked into place: never replaced
under a reader); a crash leaves rows whose flag is 0, which are simply computed again. A deeper freeze rebuilds
for the new depth (its files are created, those of shallower depths deleted: a run's depth only grows).

Data-loader side (:meth:`PrefixCache.read`, in the workers): the rows of the depth current at the epoch's start;
model side (:func:`lookup` / :func:`store`, main process): used only at the depth the model is at for that batch.
"""
import hashlib
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from util.errors import UserError

VERSION = 1


def data_list_hash(samples: Sequence) -> str:
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f'{path}\t{label}\n'.encode())
    return h.hexdigest()


def prefix_weights_hash(model: torch.nn.Module, depth: int) -> str:
    """sha256 over the frozen prefix's tensors (embedding, cls, pos, blocks[:depth]) in state-dict order."""
    h = hashlib.sha256()
    keep = ('patch_embed.', 'cls_token', 'pos_embed') + tuple(f'blocks.{b}.' for b in range(depth))
    for name, t in model.state_dict().items():
        if name.startswith(keep):
            h.update(name.encode())
            h.update(t.detach().to('cpu', torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _create_once(path: str, write) -> bool:
    """Create ``path`` atomically if absent (tmp file + hard link, so an existing file is never replaced);
    False when it already existed."""
    if os.path.exists(path):
        return False
    tmp = f'{path}.tmp{os.getpid()}'
    write(tmp)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _write_json(obj: dict):
    def w(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, sort_keys=True)
    return w


class PrefixCache:
    """Rows of the frozen prefix per (depth, view, image); see the module doc."""

    def __init__(self, root: str, num_images: int, views: int, keep: int, num_patches: int, dim: int,
                 full: bool, fingerprint: Dict[str, Any]):
        self.root, self.n, self.views, self.keep, self.L, self.dim = root, int(num_images), int(views), int(keep), \
            int(num_patches), int(dim)
        self.full = bool(full)
        self.fingerprint = dict(fingerprint, version=VERSION, images=self.n, views=self.views, keep=self.keep,
                                num_patches=self.L, dim=self.dim, full=self.full, dtype='float32')
        self.depth: Optional[int] = None  # the depth rows are served and written for
        self._maps: Dict[tuple, np.memmap] = {}
        self._checked: Dict[int, str] = {}
        self.hits = self.batches = 0

    # ---- sizes ------------------------------------------------------------------------------------------------

    def bytes_per_view(self) -> int:
        row = (1 + self.keep) * self.dim + (self.L * self.dim if self.full else 0)
        return self.n * (4 * row + (2 if self.full else 1))

    def bytes_on_disk(self) -> int:
        """Largest size of the cache: K views at one depth (shallower depths are deleted)."""
        return self.views * self.bytes_per_view()

    # ---- start of run -----------------------------------------------------------------------------------------

    def open(self) -> None:
        """Create DIR and its fingerprint, or check that DIR holds this run's cache; refuse a cache that would not fit
        on the disk's free space."""
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, 'cache.json')
        _create_once(path, _write_json(self.fingerprint))
        with open(path) as f:
            have = json.load(f)
        diff = sorted(k for k in set(have) | set(self.fingerprint) if have.get(k) != self.fingerprint.get(k))
        if diff:
            raise UserError(f"--prefix_cache {self.root}: holds the cache of another run ({', '.join(diff)} differ); "
                            f'give an empty folder or delete this one')
        used = sum(os.path.getsize(os.path.join(self.root, f)) for f in os.listdir(self.root)
                   if f.startswith('depth') and not f.endswith('.json'))
        free = shutil.disk_usage(self.root).free
        need = self.bytes_on_disk()
        if need > free + used:
            raise UserError(f'--prefix_cache {self.root}: the cache needs {need / 2**30:.2f} GiB ({self.views} views x '
                            f'{self.n} images), the disk has {free / 2**30:.2f} GiB free; free space, lower '
                            f'--fixed_views or use another folder')

    # ---- files ------------------------------------------------------------------------------------------------

    def _file(self, depth: int, view: int, kind: str) -> str:
        return os.path.join(self.root, f'depth{depth}_view{view}.{kind}')

    def _shape(self, kind: str) -> tuple:
        if kind.endswith('flags'):
            return (self.n,)
        return {'vis': (self.n, 1 + self.keep, self.dim), 'full': (self.n, self.L, self.dim)}[kind]

    def _map(self, depth: int, view: int, kind: str, create: bool) -> Optional[np.memmap]:
        key = (depth, view, kind)
        if key not in self._maps:
            path = self._file(depth, view, kind)
            shape = self._shape(kind)
            dtype = np.uint8 if kind.endswith('flags') else np.float32
            if create:
                size = int(np.prod(shape)) * np.dtype(dtype).itemsize
                _create_once(path, lambda tmp: open(tmp, 'wb').truncate(size))  # sparse zeros
            elif not os.path.exists(path):
                return None
            self._maps[key] = np.memmap(path, dtype=dtype, mode='r+' if create else 'r', shape=shape)
        return self._maps[key]

    def __getstate__(self):  # loader workers (spawn) open their own read-only maps
        s = dict(self.__dict__)
        s['_maps'] = {}
        return s

    # ---- depth (main process, at a freeze) ----------------------------------------------------------------------

    def set_depth(self, model: torch.nn.Module, depth: int) -> None:
        """The model's frozen prefix is now ``depth`` blocks deep: check (or record) its weights' hash, delete the
        files of shallower depths. Once per freeze (it reads the weights to the host)."""
        if depth == self.depth:
            return
        digest = prefix_weights_hash(model, depth)
        path = os.path.join(self.root, f'depth{depth}.json')
        _create_once(path, _write_json({'depth': depth, 'prefix_sha256': digest}))
        with open(path) as f:
            have = json.load(f).get('prefix_sha256')
        if have != digest:
            raise UserError(f'--prefix_cache {self.root}: its depth-{depth} rows were computed by other frozen weights '
                            f'(another run or a changed checkpoint); give an empty folder or delete this one')
        for f in os.listdir(self.root):
            if f.startswith('depth') and not f.startswith((f'depth{depth}_', f'depth{depth}.')):
                d = int(f[5:].split('_')[0].split('.')[0])
                if d < depth:
                    os.unlink(os.path.join(self.root, f))
        self._maps = {k: v for k, v in self._maps.items() if k[0] == depth}
        self.depth = depth

    # ---- loader side --------------------------------------------------------------------------------------------

    def read(self, index: int, view: int) -> Dict[str, Any]:
        """The rows of (index, view) at the current depth, or zeros with depth -1 (a miss)."""
        d = self.depth
        kinds = ('vis', 'full') if self.full else ('vis',)
        hit = d is not None
        for kind in kinds:
            flags = self._map(d, view, f'{kind}flags', False) if hit else None
            hit = flags is not None and bool(flags[index])
        out = {'depth': d if hit else -1}
        for kind in kinds:
            shape = self._shape(kind)[1:]
            out[kind] = (torch.from_numpy(np.array(self._map(d, view, kind, False)[index])) if hit
                         else torch.zeros(shape))
        if not self.full:
            out['full'] = torch.zeros(0)
        return out

    # ---- model side (main process) -------------------------------------------------------------------------------

    def write(self, depth: int, view: Sequence[int], index: Sequence[int], kind_rows: Dict[str, torch.Tensor]) -> None:
        """Write the rows of the batch whose flag is not set: data first (flushed), then the flags."""
        if depth != self.depth:
            raise RuntimeError('PrefixCache.write at a depth that set_depth did not open')
        for kind, t in kind_rows.items():
            todo: Dict[int, List[int]] = {}
            for b, (i, v) in enumerate(zip(index, view)):
                if not self._map(depth, v, f'{kind}flags', True)[i]:
                    todo.setdefault(v, []).append(b)
            if not todo:
                continue
            arr = t.detach().to('cpu', torch.float32).numpy()  # a fill batch only: hit batches never come here
            for v, rows in todo.items():
                idx = [index[b] for b in rows]
                mm = self._map(depth, v, kind, True)
                mm[idx] = arr[rows]
                mm.flush()  # the data is on disk before its flag says so
                fl = self._map(depth, v, f'{kind}flags', True)
                fl[idx] = 1
                fl.flush()


def lookup(model: torch.nn.Module, cached: Optional[Dict[str, Any]], kind: str) -> Optional[torch.Tensor]:
    """The batch's rows of ``kind`` from the loader when every row is present at the model's current depth."""
    cache = getattr(model, 'prefix_cache', None)
    if cache is None or cached is None or not model.embed_frozen:
        return None
    depth = model.num_frozen_blocks
    cache.set_depth(model, depth)
    if kind == 'vis':
        cache.batches += 1
    if any(d != depth for d in cached['depth']):
        return None
    if kind == 'vis':
        cache.hits += 1
    return cached[kind]


def store(model: torch.nn.Module, cached: Optional[Dict[str, Any]], kind: str, rows: torch.Tensor) -> None:
    cache = getattr(model, 'prefix_cache', None)
    if cache is None or cached is None or not model.embed_frozen:
        return
    cache.write(model.num_frozen_blocks, cached['view'], cached['index'], {kind: rows})


def check_prefix_cache(args) -> None:
    """Combinations --prefix_cache cannot honour, refused in one line before any work."""
    root = getattr(args, 'prefix_cache', None)
    if not root:
        return
    if not getattr(args, 'fixed_views', 0):
        raise UserError(f'--prefix_cache {root}: needs --fixed_views K (a cached row is reusable only when the image '
                        f'comes back with the same crop, flip and mask)')
    if not getattr(args, 'freezeout', False):
        raise UserError(f'--prefix_cache {root}: needs FreezeOut (--t_0/--how_scale or a --freeze_policy): only a '
                        f'frozen prefix can be cached')
    if getattr(args, 'dont_freeze_pe', False):
        raise UserError(f'--prefix_cache {root} with --dont_freeze_pe: the embedding keeps training, so no prefix is '
                        f'ever frozen; drop --dont_freeze_pe')


def build_cache(args, model: torch.nn.Module, dataset: Any) -> Optional[PrefixCache]:
    if not getattr(args, 'prefix_cache', None):
        return None
    keep = int(model.num_patches * (1 - args.mask_ratio))
    fp = {'data': data_list_hash(dataset.samples), 'seed': int(args.seed), 'mask_ratio': float(args.mask_ratio),
          'input_size': int(args.input_size), 'patch_size': int(model.patch_size), 'model': args.model}
    return PrefixCache(args.prefix_cache, len(dataset), args.fixed_views, keep, model.num_patches, model.embed_dim,
                       model.prefix is not None, fp)


def cache_plan(cache: PrefixCache, freezer: Any, flops: Dict[str, Any], steps_per_epoch: int, epochs: int,
               views: int) -> str:
    """--plan_only line: size on disk, and the FLOP-model compute the cache saves. An epoch is counted as served
    from the cache when an earlier epoch of the same view ran entirely at the same depth as it (fill epochs and
    epochs with a freeze inside compute, as do partial ones: conservative)."""
    from freezeout import decided_saving, step_cost
    T = steps_per_epoch * epochs
    pe = freezer.dont_freeze_pe
    enc = flops.get('unit_enc_fwd', flops['unit_fwd'])

    def state(e):
        lo, hi = freezer.num_frozen_at(e * steps_per_epoch), freezer.num_frozen_at((e + 1) * steps_per_epoch - 1)
        return lo if lo == hi else None

    saved = 0.0
    for e in range(epochs):
        n = state(e)
        if not n or not any(state(f) == n for f in range(e % views, e, views)):
            continue
        cut = sum(enc[:n])  # the embedding and the n - 1 frozen blocks on the visible tokens
        if 'prefix_pass' in flops:  # and the full-image prefix pass of --prefix_target (its heads still run)
            cut += flops['prefix_pass'][n]
        saved += steps_per_epoch * cut
    base = step_cost(flops, 0, pe) * T
    fo = decided_saving(freezer, flops, T)
    return (f'prefix cache {cache.root}: {cache.bytes_on_disk() / 2**30:.3f} GiB on disk at most ({views} views x '
            f'{cache.n} images x {cache.bytes_per_view() / cache.n / 1024:.1f} KiB, fp32); saves '
            f'{100 * saved / base:.1f}% of the no-freeze training FLOPs (FLOP model) on top of the '
            f'{100 * fo:.1f}% planned without it')
