"""Checkpoint I/O: atomic writes, safe loads (``weights_only=True``), auto-resume scan, RNG state capture/restore.

Every checkpoint we write is a dict of tensors and plain Python values only, so ``torch.load(path,
weights_only=True)`` loads it and loading never executes code from the file. Keys:
``model, optimizer, scaler, epoch, step, args (dict), rng, rng_ranks, version, run_id, checksum`` plus whatever the
caller adds (e.g. ``freezeout``). ``epoch`` is the last *finished* epoch (MAE convention: resume starts at
``epoch + 1``). ``rng`` is rank 0's random state; ``rng_ranks`` (multi-process runs only) every rank's, index = rank,
so that each rank of a resumed run continues its own stream (:func:`restore_rank_rng`).
``checksum`` is ``sha256-tree:<hex>`` of every other key (tensor bytes included, see :func:`state_digest`): torch's
zip reader does not verify its CRCs, so damaged tensor bytes would otherwise load silently and train to NaN. It is
computed once per save (on rank 0; every file of that save holds the same content) and verified once per load, on
rank 0, which tells the other ranks its verdict (:func:`load_checkpoint`).
"""
import argparse
import glob
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
import random
import re
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from util import distributed as du
from util import signals
from util.errors import UserError

CHECKPOINT_VERSION = 3  # 2: run_id and checksum; 3: per-rank RNG (rng_ranks), tree checksum


class CheckpointWriteError(signals.TrainingStopped):
    """A checkpoint (or its log record) could not be written; the previous checkpoint is intact."""
    exit_code = 1


class NonFiniteWeights(signals.TrainingStopped):
    """The weights about to be saved hold NaN/inf; nothing is saved."""
    exit_code = 3
LAST_NAME = 'checkpoint-last.pth'
_NUMBERED = re.compile(r'^checkpoint-(\d+)\.pth$')


def args_to_dict(args: argparse.Namespace) -> Dict[str, Any]:
    """``vars(args)`` restricted to plain values (anything else becomes its ``str``) so it loads weights-only."""
    out = {}
    for k, v in vars(args).items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


def capture_rng_state() -> Dict[str, Any]:
    """This process's torch (CPU, and CUDA on its current device), numpy and Python RNG states, as tensors/plain
    values. Only the current CUDA device: touching the others would create a CUDA context on every GPU of the node
    from every rank."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': {'version': py_state[0], 'state': list(py_state[1]), 'gauss': py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Optional[Dict[str, Any]]) -> None:
    """Set this process's RNGs to ``state`` (one :func:`capture_rng_state`); None/empty: leave them."""
    if not state:
        return
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(p['state']), p['gauss']))
    cuda = state.get('cuda')
    if cuda is None or not torch.cuda.is_available():
        return
    if torch.is_tensor(cuda):
        torch.cuda.set_rng_state(cuda)  # the current device (lazily, if CUDA is not initialised yet)
    elif torch.cuda.is_initialized() and torch.cuda.current_device() < len(cuda):
        torch.cuda.set_rng_state(cuda[torch.cuda.current_device()])  # version <= 2: a list over all devices


def restore_rank_rng(ckpt: Dict[str, Any], seed: int, where: str = '--resume') -> bool:
    """Continue this rank's own random stream from a checkpoint (call on every rank); returns True if it did.

    A checkpoint of ``W`` processes holds ``W`` states (``rng_ranks``); resumed with ``W`` processes, rank ``r`` takes
    state ``r``, so masks, drop path and augmentation draws continue as in an uninterrupted run. Resumed with another
    number of processes (or from a multi-process checkpoint written before per-rank states were saved) no state fits
    every rank: one warning, and each rank is re-seeded from ``seed + rank`` as at a fresh start. A checkpoint without
    RNG state leaves the RNGs as they are.
    """
    world, rank = du.get_world_size(), du.get_rank()
    ranks = ckpt.get('rng_ranks')
    if ranks is not None:
        if len(ranks) == world:
            restore_rng_state(ranks[rank])
            return True
        why = f'was written by {len(ranks)} processes, this run has {world}'
    else:
        if not ckpt.get('rng'):
            return False
        saved = ckpt.get('args') if isinstance(ckpt.get('args'), dict) else {}
        saved_world = int(saved.get('world_size') or 1)
        if saved_world == world == 1:
            restore_rng_state(ckpt['rng'])
            return True
        why = (f'was written by {saved_world} processes, this run has {world}' if saved_world != world else
               f'was written by {world} processes before each rank\'s random state was saved (only rank 0\'s)')
    du.print0(f'warning: {where} {why}: no saved random state fits every rank, so each rank is re-seeded from '
              f'--seed {seed} + rank (masks and other random draws continue differently from an uninterrupted run)')
    du.seed_process(seed)
    return False


def save_atomic(obj: Dict[str, Any], path: str) -> None:
    """Write ``obj`` to ``path`` so that a kill at any moment leaves either the old file or the new one.

    The bytes go to a temporary file in the same directory, are fsync'ed, then renamed over ``path``.
    ``VITFREEZE_TEST_PAUSE_IN_SAVE=<seconds>`` pauses between write and rename (for crash tests only).
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp-{os.getpid()}')
    try:
        try:
            with open(tmp, 'wb') as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:  # torch wraps the OSError of a full disk / size limit in a RuntimeError
            err = CheckpointWriteError(f'cannot write {path}: {_cause(e)}')
            err.cause = _cause(e)  # for callers that word their own message (tools/export.py)
            raise err from None
        pause = float(os.environ.get('VITFREEZE_TEST_PAUSE_IN_SAVE', '0') or 0)
        if pause > 0:
            print(f'[test hook] pausing {pause}s inside save of {path}', flush=True)
            time.sleep(pause)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _cause(e: BaseException) -> str:
    """The OS-level reason of a failed write (``File too large``, ``No space left on device``), else the message."""
    x: Optional[BaseException] = e
    while x is not None:
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
        x = x.__cause__ or x.__context__
    return (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]


DIGEST_SCHEME = 'sha256-tree'  # what save_checkpoint writes; 'sha256' (version 2 files) is still verified
_PIECE = 1 << 24  # bytes: tensors are hashed in pieces of at most 16 MiB, several at a time (hashlib drops the GIL)


def state_digest(obj: Any, scheme: str = DIGEST_SCHEME) -> str:
    """``<scheme>:<hex>`` of a checkpoint's content: structure, plain values, and every tensor's dtype, shape and bytes.

    Keys of dicts are visited in sorted order and lists/tuples alike, so the digest survives a save/load round trip.
    ``sha256-tree``: the structure and tensor metadata are hashed in visiting order, the tensor bytes in pieces of
    16 MiB by a thread pool, then the pieces' digests in order; one pass over the bytes, on all cores.
    ``sha256`` (checkpoint version 2): the same walk with the bytes fed inline, on one core.
    """
    if scheme not in ('sha256', 'sha256-tree'):
        raise ValueError(f'unknown checkpoint digest scheme {scheme!r}')
    h = hashlib.sha256()
    pieces: List[Any] = []

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach()
            h.update(f'T{t.dtype}{tuple(t.shape)};'.encode())
            if t.numel():
                data = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data
                if scheme == 'sha256':
                    h.update(data)
                else:
                    pieces.extend(data[i:i + _PIECE] for i in range(0, len(data), _PIECE))
        elif isinstance(x, dict):
            h.update(b'{')
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
            h.update(b'}')
        elif isinstance(x, (list, tuple)):
            h.update(b'[')
            for v in x:
                feed(v)
            h.update(b']')
        else:
            h.update(repr(x).encode() + b';')
    feed({k: v for k, v in obj.items() if k != 'checksum'} if isinstance(obj, dict) else obj)
    if pieces:
        def one(piece: Any) -> bytes:
            return hashlib.sha256(piece).digest()
        workers = min(8, os.cpu_count() or 1, len(pieces))
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                digests = list(pool.map(one, pieces))
        else:
            digests = [one(piece) for piece in pieces]
        h.update(f'P{len(digests)};'.encode())
        h.update(b''.join(digests))
    return f'{scheme}:' + h.hexdigest()


def verify_checksum(ckpt: Dict[str, Any]) -> Optional[bool]:
    """True/False: the stored checksum matches/does not; None: the file has none (older or foreign checkpoints)."""
    stored = ckpt.get('checksum')
    if not isinstance(stored, str) or ':' not in stored:
        return None
    scheme = stored.split(':', 1)[0]
    if scheme not in ('sha256', 'sha256-tree'):
        return False
    return state_digest(ckpt, scheme) == stored


def model_tensors(ckpt: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint: ``model`` (ours, MAE), ``state_dict`` or ``module``, else its top-level tensors."""
    for key in ('model', 'state_dict', 'module'):
        if isinstance(ckpt.get(key), dict):
            return {str(k): v for k, v in ckpt[key].items() if torch.is_tensor(v)}
    return {str(k): v for k, v in ckpt.items() if torch.is_tensor(v)}


def non_finite_message(ckpt: Dict[str, Any]) -> Optional[str]:
    """``'tensor NAME holds NaN/inf (k of n values)...'`` for weights that are not all finite, else None."""
    floats = [(k, v) for k, v in model_tensors(ckpt).items() if v.is_floating_point() or v.is_complex()]
    if not floats:
        return None
    ok = torch.stack([torch.isfinite(v).all() for _, v in floats])
    if bool(ok.all()):
        return None
    bad = [(k, v) for (k, v), good in zip(floats, ok.tolist()) if not good]
    name, t = bad[0]
    more = f'; also {", ".join(k for k, _ in bad[1:4])}{", ..." if len(bad) > 4 else ""}' if len(bad) > 1 else ''
    return (f'tensor {name} holds NaN/inf ({int((~torch.isfinite(t)).sum())} of {t.numel()} values{more}): the '
            f'weights diverged before this file was written; use an earlier checkpoint')


def _to_cpu(x: Any) -> Any:
    """A copy of the state with every tensor on the CPU (one device-to-host copy, shared by digest and save)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _read_checkpoint(path: str, flag: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f'{flag} {path}: ' + ('is a directory, not a checkpoint file' if os.path.isdir(path)
                                              else 'file not found'))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # MAE/LocalMIM/ViTFreeze pickled their args
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means "not a usable checkpoint"
        with open(path, 'rb') as f:
            head = f.read(4)
        if not head.startswith((b'PK\x03\x04', b'\x80')):  # neither torch.save's zip nor a (legacy) pickle
            raise UserError(f'{flag} {path}: not a PyTorch checkpoint (not written by torch.save)') from None
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'{flag} {path}: not a readable checkpoint, truncated or corrupt? ({msg[:160]})') from None
    if not isinstance(ckpt, dict):
        raise UserError(f'{flag} {path}: not a checkpoint (expected a dict, got {type(ckpt).__name__})')
    return ckpt


def _check_content(ckpt: Dict[str, Any], path: str, flag: str) -> Optional[str]:
    """The one-line verdict on a loaded checkpoint's content (None: usable): checksum, then finite weights."""
    if verify_checksum(ckpt) is False:
        return (f'{flag} {path}: checksum mismatch: the file was damaged after it was written (its content differs '
                f'from what was saved); use an earlier checkpoint')
    bad = non_finite_message(ckpt)
    return f'{flag} {path}: {bad}' if bad else None


def load_checkpoint(path: str, flag: str = '--resume') -> Dict[str, Any]:
    """Load a checkpoint safely (weights only) or raise a one-line UserError naming ``flag`` and the file.

    Refused: a missing/unreadable file, a checksum mismatch, and weights holding NaN/inf (naming the tensor).
    In a process group every rank must call this with the same path: each rank reads the file, rank 0 alone
    verifies the checksum and the weights (one hash per load, not one per rank), and one collective hands every
    rank the same verdict, so all ranks raise the same error (or none) and none waits in a collective alone.
    """
    err: Optional[str] = None
    ckpt: Dict[str, Any] = {}
    try:
        ckpt = _read_checkpoint(path, flag)
    except UserError as e:
        err = str(e)
    if err is None and du.is_main_process():
        err = _check_content(ckpt, path, flag)
    if du.is_dist():
        verdicts = du.all_gather_objects(err)
        failed = [(r, e) for r, e in enumerate(verdicts) if e]
        if failed:
            r, e = failed[0]
            err = e if r == 0 else f'{e} (on rank {r})'
    if err:
        raise UserError(err)
    return ckpt


def checkpoint_candidates(output_dir: str) -> List[Tuple[int, str]]:
    """``(epoch_from_name, path)`` for ``checkpoint-N.pth`` in ``output_dir``, newest first (``last`` = +inf)."""
    found = []
    for p in glob.glob(os.path.join(output_dir, 'checkpoint-*.pth')):
        name = os.path.basename(p)
        m = _NUMBERED.match(name)
        if m:
            found.append((int(m.group(1)), p))
        elif name == LAST_NAME:
            found.append((1 << 62, p))
    return sorted(found, reverse=True)


def find_resumable(output_dir: str) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The newest checkpoint of this folder's run that loads, as ``(path, ckpt)``; says which it skipped and why.

    The folder's run is the one in ``run.json`` (else that of ``checkpoint-last.pth``); a checkpoint recording
    another run id (copied in, or left by another run) is never picked.
    """
    from util.rundir import folder_run_id
    run = folder_run_id(output_dir)
    best: Optional[Tuple[str, Dict[str, Any]]] = None
    for _, path in checkpoint_candidates(output_dir):
        try:
            ckpt = load_checkpoint(path, flag='--auto_resume')
            if 'model' not in ckpt or 'epoch' not in ckpt:
                raise UserError(f'--auto_resume {path}: no model/epoch keys')
            other = ckpt.get('run_id')
            if run is None and other:
                run = other  # no run.json (older folder): the newest loadable checkpoint defines the run
            if other and other != run:
                raise UserError(f'it belongs to run {other}, not to run {run} of this folder')
        except UserError as e:
            du.print0(f'auto-resume: skipping {path}: {e}')
            continue
        if best is None or int(ckpt['epoch']) > int(best[1]['epoch']):
            best = (path, ckpt)
        if os.path.basename(path) != LAST_NAME:
            break  # numbered files are sorted newest first: the first valid one is the newest numbered
    return best


def save_checkpoint(output_dir: str, epoch: int, state: Dict[str, Any], args: argparse.Namespace,
                    numbered: bool) -> List[str]:
    """Write ``checkpoint-last.pth`` (always) and ``checkpoint-{epoch}.pth`` (if ``numbered``); call on every rank.

    Every rank hands rank 0 its RNG state (one gather); rank 0 alone writes. ``state`` holds model/optimizer/scaler/
    step/... . RNG states and args are added here; the checksum is computed once for all files of the save.
    Returns the paths written (empty on ranks > 0).
    """
    if not output_dir:
        return []
    rng = du.gather_to_rank0(capture_rng_state())  # every rank's stream (a collective: before rank 0 goes on alone)
    if not du.is_main_process():
        return []
    check_finite_weights(state.get('model') or {}, epoch, args)
    obj = _to_cpu(dict(state))
    obj.update(epoch=epoch, args=args_to_dict(args), rng=rng[0], version=CHECKPOINT_VERSION,
               run_id=getattr(args, 'run_id', None))
    if len(rng) > 1:
        obj['rng_ranks'] = rng
    obj['checksum'] = state_digest(obj)
    paths = [os.path.join(output_dir, f'checkpoint-{epoch}.pth')] if numbered else []
    paths.append(os.path.join(output_dir, LAST_NAME))
    done: List[str] = []
    try:
        for p in paths:
            save_atomic(obj, p)
            done.append(p)
    except CheckpointWriteError as e:
        for p in done:  # all or nothing per epoch: a numbered file without its log record would be resumed from
            os.remove(p)
        last = signals.last_checkpoint()
        kept = f"{last['path']} (epoch {last.get('epoch')}) is kept" if last.get('path') else 'no checkpoint exists yet'
        raise CheckpointWriteError(f'{e}; epoch {epoch} was neither saved nor logged, {kept}; free space or raise '
                                   f'the limit, then rerun the same command to resume') from None
    signals.note_checkpoint(paths[-1], epoch)
    keep = getattr(args, 'keep_last', 0) or 0
    if keep > 0:
        prune_numbered(output_dir, keep, protect=paths)
    return paths


def check_finite_weights(model_state: Dict[str, Any], epoch: int, args: argparse.Namespace) -> None:
    """Refuse to save NaN/inf weights (one host sync per save): they would replace the last good checkpoint."""
    floats = [(k, v) for k, v in model_state.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not floats:
        return
    ok = torch.stack([torch.isfinite(v).all() for _, v in floats])
    if bool(ok.all()):
        return
    bad = [k for (k, _), good in zip(floats, ok.tolist()) if not good]
    raise NonFiniteWeights(f"weights are not finite after epoch {epoch} (NaN/inf in {', '.join(bad[:3])}"
                           f"{', ...' if len(bad) > 3 else ''}); not saving them. {resume_hint(args)}")


def resume_hint(args: argparse.Namespace) -> str:
    """Which checkpoint to resume from after a divergence, and with what learning rate (half the current one)."""
    explicit = 'lr' in [a[2:].split('=', 1)[0] for a in getattr(args, 'argv', []) if a.startswith('--')]
    if explicit or getattr(args, 'blr', None) is None:
        lr_flag = f'--lr {args.lr / 2:.3g}' if getattr(args, 'lr', None) else 'a lower --lr'
    else:
        lr_flag = f'--blr {args.blr / 2:.3g}'
    last = signals.last_checkpoint()
    if not last.get('path'):
        return f'No checkpoint was written by this run: rerun from scratch with {lr_flag} (half of now)'
    msg = f"Resume from {last['path']} (epoch {last.get('epoch')}): --resume {last['path']} {lr_flag} (half of now)"
    older = [p for e, p in checkpoint_candidates(os.path.dirname(last['path']) or '.')
             if os.path.basename(p) != LAST_NAME and last.get('epoch') is not None and e < int(last['epoch'])]
    if older:
        msg += f'; if it diverges again (the NaN came soon after that save), from {older[0]}'
    return msg


def prune_numbered(output_dir: str, keep: int, protect: List[str] = ()) -> None:
    """Delete all but the ``keep`` newest ``checkpoint-N.pth`` (``checkpoint-last.pth`` is never touched).

    ``protect`` (the files just written) always survive and count towards ``keep``: a stale or corrupt file with a
    higher epoch in its name (e.g. from an earlier, longer run) must not push out the checkpoint just written.
    """
    keep_set = {os.path.abspath(p) for p in protect}
    numbered = [p for e, p in checkpoint_candidates(output_dir) if os.path.basename(p) != LAST_NAME]
    kept = sum(1 for p in numbered if os.path.abspath(p) in keep_set)
    for p in numbered:
        if os.path.abspath(p) in keep_set:
            continue
        if kept < max(1, keep):
            kept += 1
            continue
        os.remove(p)


def resolve_resume(args: argparse.Namespace) -> Optional[Tuple[str, Dict[str, Any]]]:
    """Decide what to resume from: ``--resume PATH`` wins; else ``--auto_resume`` scans ``--output_dir``."""
    if getattr(args, 'resume', ''):
        ckpt = load_checkpoint(args.resume, flag='--resume')
        signals.note_checkpoint(args.resume, ckpt.get('epoch'))
        return args.resume, ckpt
    if getattr(args, 'auto_resume', False) and args.output_dir and os.path.isdir(args.output_dir):
        found = find_resumable(args.output_dir)
        if found:
            du.print0(f'Auto resume checkpoint: {found[0]}')
            signals.note_checkpoint(found[0], found[1].get('epoch'))
        return found
    return None


def warn_changed_flags(saved: Dict[str, Any], args: argparse.Namespace) -> List[str]:
    """Warn (not fail) about run-defining flags (declared ``defines_run``, util.args) that differ from the
    checkpoint's; returns the changed names."""
    changed = []
    now = args_to_dict(args)
    for k in getattr(args, 'run_defining', None) or saved.get('run_defining') or ():
        if k in saved and k in now and saved[k] != now[k]:
            changed.append(k)
            du.print0(f'warning: resuming with --{k} {now[k]!r} but the checkpoint was trained with {saved[k]!r}; '
                      f'the continued run will differ from an uninterrupted one')
    return changed
