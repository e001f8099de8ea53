"""A cache of the frozen prefix (``--prefix_cache DIR``, needs ``--fixed_views K``): see docs/PREFIX_CACHE.md.

Once FreezeOut has frozen the embedding and the first d blocks, the prefix's output for (image i, view v) is a fixed
tensor. Stored is exactly what the uncached run computes there: the prefix run on the VISIBLE tokens of view v's
mask (cls + keep tokens, [1 + keep, D]) -- never the prefix on all tokens masked afterwards, which would leak the
masked patches into the visible tokens through attention -- and, with ``--prefix_target``, the prefix's output on
the full image of view v ([1 + L, D], before the target's LayerNorm). Epochs after a freeze read rows where present
and write them where absent; a batch is served from the cache when all its rows are present (at depths <= the
current one: shallower rows are extended), otherwise it runs the prefix on the whole batch (the same batch shape as
the uncached run) and writes its rows.

Layout under DIR (fp32 by default, the dtype the prefix computes in, so a hit is bit-identical;
``--prefix_cache_dtype float16|bfloat16`` halves the files and rounds every stored value: a hit is then close, not
equal):
    cache.json                    run fingerprint: data list hash, images, K, seed, mask ratio, shapes
    depth{d}.json                 sha256 of the frozen prefix's weights at depth d (embedding + d blocks)
    depth{d}_view{v}.vis|.full    memory-mapped [N, 1 + keep, D] / [N, 1 + L, D] rows, indexed by dataset index
    depth{d}_view{v}.visflags|.fullflags   [N] uint8: row written (set after the row's data is flushed)
Files are created whole (a sparse, zero file under a temporary name, then hard-linked into place: never replaced
under a reader); a crash leaves rows whose flag is 0, which are simply computed again. A deeper freeze
extends: a row of a shallower depth is read and only the blocks frozen since are run on it (the same tensors the
uncached run computes, block by block, on a batch of the same shape), then written at the new depth; a view's
shallower files are deleted once the view is complete at the deeper depth (a run's depth only grows).

Data-loader side (:meth:`PrefixCache.read`, in the workers): each row at the deepest depth <= the one current at
the epoch's start; model side (:func:`lookup` / :func:`store`, main process): a batch whose rows all exist at
depths <= the model's is served (shallower rows extended); a batch with a missing row runs the prefix from the
image.
"""
import hashlib
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from prefix_target import require_frozen_prefix
from util.errors import UserError

VERSION = 1
# storage dtypes: numpy's for the memmap, and how a stored row becomes the fp32 tensor the model computes with.
# bfloat16 has no numpy dtype: its bits are stored as int16 and viewed back (an exact round trip of the bf16 value)
STORAGE = {'float32': np.float32, 'float16': np.float16, 'bfloat16': np.int16}


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """fp32 rows -> the array written to a ``dtype`` file (rounded to nearest for the 16-bit dtypes)."""
    t = t.detach().to('cpu', torch.float32)
    if dtype == 'bfloat16':
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    return t.to(torch.float16).numpy() if dtype == 'float16' else t.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Rows read from a ``dtype`` file -> fp32."""
    t = torch.from_numpy(np.array(a))
    return t.view(torch.bfloat16).float() if dtype == 'bfloat16' else t.float()


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
                 full: bool, fingerprint: Dict[str, Any], dtype: str = 'float32'):
        self.root, self.n, self.views, self.keep, self.L, self.dim = root, int(num_images), int(views), int(keep), \
            int(num_patches), int(dim)
        self.full = bool(full)
        if dtype not in STORAGE:
            raise UserError(f"--prefix_cache_dtype {dtype}: choose {', '.join(STORAGE)}")
        self.dtype = dtype
        self.fingerprint = dict(fingerprint, version=VERSION, images=self.n, views=self.views, keep=self.keep,
                                num_patches=self.L, dim=self.dim, full=self.full, dtype=dtype)
        self.depth: Optional[int] = None  # the depth rows are served and written for
        self._maps: Dict[tuple, np.memmap] = {}
        self._checked: Dict[int, str] = {}
        self.hits = self.extended = self.batches = 0

    # ---- sizes ------------------------------------------------------------------------------------------------

    def bytes_per_view(self) -> int:
        row = (1 + self.keep) * self.dim + ((1 + self.L) * self.dim if self.full else 0)
        return self.n * (np.dtype(STORAGE[self.dtype]).itemsize * row + (2 if self.full else 1))

    def bytes_on_disk(self) -> int:
        """The cache at one depth: K views (a view's shallower rows are deleted once it is complete at a deeper
        depth; until then both are on disk)."""
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
        return {'vis': (self.n, 1 + self.keep, self.dim), 'full': (self.n, 1 + self.L, self.dim)}[kind]

    def _map(self, depth: int, view: int, kind: str, create: bool) -> Optional[np.memmap]:
        key = (depth, view, kind)
        if create and key in self._maps and self._maps[key].mode == 'r':
            # opened read-only by read() in this process (no loader workers: a resumed run, another rank's file)
            del self._maps[key]
        if key not in self._maps:
            path = self._file(depth, view, kind)
            shape = self._shape(kind)
            dtype = np.uint8 if kind.endswith('flags') else STORAGE[self.dtype]
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
        """The model's frozen prefix is now ``depth`` blocks deep: check (or record) its weights' hash. Once per
        freeze (it reads the weights to the host)."""
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
        self.depth = depth

    def _kinds(self) -> tuple:
        return ('vis', 'full') if self.full else ('vis',)

    def _has(self, depth: int, view: int, index: int) -> bool:
        for kind in self._kinds():
            flags = self._map(depth, view, f'{kind}flags', False)
            if flags is None or not flags[index]:
                return False
            # mapped now, with its flags: another process may unlink a view's shallower files once it is complete
            # deeper (_drop_shallower), and a map stays readable after the unlink, a path does not
            if self._map(depth, view, kind, False) is None:
                return False
        return True

    def _drop_shallower(self, depth: int, view: int) -> None:
        """View ``view`` is complete at ``depth``: its rows of shallower depths are never read again."""
        for d in range(depth):
            for kind in self._kinds():
                for k in (kind, f'{kind}flags'):
                    self._maps.pop((d, view, k), None)
                    try:
                        os.unlink(self._file(d, view, k))
                    except FileNotFoundError:
                        pass

    # ---- loader side --------------------------------------------------------------------------------------------

    def read(self, index: int, view: int) -> Dict[str, Any]:
        """The rows of (index, view) at the deepest depth <= the current one that has them (``depth``), or zeros
        with depth -1 (a miss; empty tensors while nothing is frozen). A shallower row is extended by the model (the newly frozen blocks only)."""
        out: Dict[str, Any] = {'depth': -1}
        if self.depth is None:  # nothing frozen yet (this epoch): no row can be used, so none is built and copied
            return {'depth': -1, 'vis': torch.zeros(0), 'full': torch.zeros(0)}
        d = self.depth
        while d >= 0 and not self._has(d, view, index):
            d -= 1
        for kind in self._kinds():
            out[kind] = (from_storage(self._map(d, view, kind, False)[index], self.dtype) if d >= 0
                         else torch.zeros(self._shape(kind)[1:]))
        if not self.full:
            out['full'] = torch.zeros(0)
        out['depth'] = d
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
            arr = to_storage(t, self.dtype)  # a fill batch only: hit batches never come here
            for v, rows in todo.items():
                idx = [index[b] for b in rows]
                mm = self._map(depth, v, kind, True)
                mm[idx] = arr[rows]
                mm.flush()  # the data is on disk before its flag says so
                fl = self._map(depth, v, f'{kind}flags', True)
                fl[idx] = 1
                fl.flush()
                if depth > 0 and fl.all() and all(self._map(depth, v, f'{k}flags', True).all() for k in self._kinds()):
                    self._drop_shallower(depth, v)


def lookup(model: torch.nn.Module, cached: Optional[Dict[str, Any]], kind: str) -> Optional[tuple]:
    """``(rows at the model's current depth, extended)`` from the loader's rows of ``kind`` when every row of the
    batch is present at some depth <= the current one, else None (the caller computes from the image).

    Rows of a shallower depth d are brought to the current depth by running blocks d.. on the whole batch and
    keeping each block's output only for the rows that need it (``torch.where`` on the per-row depth, a device
    tensor from the loader): the batch keeps the uncached run's shape, so each row sees the same kernels, and
    nothing is read back to the host. ``extended``: some row was extended (the caller writes the batch)."""
    cache = getattr(model, 'prefix_cache', None)
    if cache is None or cached is None or not model.embed_frozen:
        return None
    cur = model.num_frozen_blocks
    cache.set_depth(model, cur)
    depths = cached['depth']
    if kind == 'vis':
        cache.batches += 1
    lo = min(depths)
    if lo < 0 or max(depths) > cur:
        return None
    x = cached[kind]
    if lo < cur:
        per_row = cached['depth_t'].view(-1, 1, 1)
        with torch.no_grad():
            for b in range(lo, cur):
                x = torch.where(per_row <= b, model.blocks[b](x), x)
    if kind == 'vis':
        cache.hits += lo == cur
        cache.extended += lo < cur
    return x, lo < cur


def store(model: torch.nn.Module, cached: Optional[Dict[str, Any]], kind: str, rows: torch.Tensor) -> None:
    """Write the batch's missing rows of ``kind`` at the model's current depth."""
    cache = getattr(model, 'prefix_cache', None)
    if cache is None or cached is None or not model.embed_frozen:
        return
    cache.write(model.num_frozen_blocks, cached['view'], cached['index'], {kind: rows})


def check_prefix_cache(args) -> None:
    """Combinations --prefix_cache cannot honour, refused in one line before any work."""
    root = getattr(args, 'prefix_cache', None)
    dtype = getattr(args, 'prefix_cache_dtype', 'float32')
    if not root:
        if dtype != 'float32':  # a storage dtype with nothing stored would be ignored silently
            raise UserError(f'--prefix_cache_dtype {dtype}: needs --prefix_cache DIR')
        return
    if not getattr(args, 'fixed_views', 0):
        raise UserError(f'--prefix_cache {root}: needs --fixed_views K (a cached row is reusable only when the image '
                        f'comes back with the same crop, flip and mask)')
    require_frozen_prefix(args, f'--prefix_cache {root}', 'only a frozen prefix can be cached')


def build_cache(args, model: torch.nn.Module, dataset: Any) -> Optional[PrefixCache]:
    if not getattr(args, 'prefix_cache', None):
        return None
    keep = int(model.num_patches * (1 - args.mask_ratio))
    fp = {'data': data_list_hash(dataset.samples), 'seed': int(args.seed), 'mask_ratio': float(args.mask_ratio),
          'input_size': int(args.input_size), 'patch_size': int(model.patch_size), 'model': args.model}
    return PrefixCache(args.prefix_cache, len(dataset), args.fixed_views, keep, model.num_patches, model.embed_dim,
                       model.prefix is not None, fp, getattr(args, 'prefix_cache_dtype', 'float32'))


def cache_plan(cache: PrefixCache, freezer: Any, flops: Dict[str, Any], steps_per_epoch: int, epochs: int,
               views: int) -> str:
    """--plan_only line: size on disk, and the FLOP-model compute the cache saves. Epoch e (view e mod K) reads
    the rows epoch e - K wrote, all of them when e - K began with m >= 1 units frozen (every row then exists at
    depth >= m; shallower ones are extended); counted as saving, in every step of epoch e, the forward of m units
    on the visible tokens (and, with --prefix_target, their full-image pass). A lower bound: rows at deeper depths
    save more, and the partial epochs (images dropped by drop_last) are ignored."""
    from freezeout import decided_saving, step_cost
    T = steps_per_epoch * epochs
    enc = flops.get('unit_enc_fwd', flops['unit_fwd'])
    saved, served = 0.0, 0
    for e in range(views, epochs):
        m = freezer.num_frozen_at((e - views) * steps_per_epoch)
        if not m:
            continue
        served += 1
        cut = sum(enc[:m])  # the embedding and the m - 1 blocks frozen then, on the visible tokens
        if 'prefix_pass' in flops:  # and the full-image pass of --prefix_target (its heads still run)
            cut += flops['prefix_pass'][m]
        saved += steps_per_epoch * cut
    base = step_cost(flops, 0, freezer.dont_freeze_pe) * T
    fo = decided_saving(freezer, flops, T)
    return (f'prefix cache {cache.root}: {cache.bytes_on_disk() / 2**30:.3f} GiB on disk at one depth ({views} views '
            f'x {cache.n} images x {cache.bytes_per_view() / cache.n / 1024:.1f} KiB, {cache.dtype}); {served} of '
            f'{epochs} '
            f'epochs read it; saves {100 * saved / base:.1f}% of the no-freeze training FLOPs (FLOP model) on top of '
            f'the {100 * fo:.1f}% planned without it')
