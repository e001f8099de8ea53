"""Checkpoint I/O: atomic writes, safe loads (``weights_only=True``), auto-resume scan, RNG state capture/restore.

Every checkpoint we write is a dict of tensors and plain Python values only, so ``torch.load(path,
weights_only=True)`` loads it and loading never executes code from the file. Keys:
``model, optimizer, scaler, epoch, step, args (dict), rng, version, run_id, checksum`` plus whatever the caller
adds (e.g. ``freezeout``). ``epoch`` is the last *finished* epoch (MAE convention: resume starts at ``epoch + 1``).
``checksum`` is ``sha256:<hex>`` of every other key (tensor bytes included, see :func:`state_digest`): torch's zip
reader does not verify its CRCs, so damaged tensor bytes would otherwise load silently and train to NaN.
"""
import argparse
import glob
import hashlib
import os
import random
import re
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from util import distributed as du
from util import signals
from util.errors import UserError

CHECKPOINT_VERSION = 2  # 2: run_id and checksum


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
    """Torch (CPU and CUDA), numpy and Python RNG states as tensors/plain values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': {'version': py_state[0], 'state': list(py_state[1]), 'gauss': py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Optional[Dict[str, Any]]) -> None:
    if not state:
        return
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(p['state']), p['gauss']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


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


def state_digest(obj: Any) -> str:
    """``sha256:<hex>`` of a checkpoint's content: structure, plain values, and every tensor's dtype, shape and bytes.

    Keys of dicts are visited in sorted order and lists/tuples alike, so the digest survives a save/load round trip.
    """
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach()
            h.update(f'T{t.dtype}{tuple(t.shape)};'.encode())
            if t.numel():
                h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
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
    return 'sha256:' + h.hexdigest()


def _to_cpu(x: Any) -> Any:
    """A copy of the state with every tensor on the CPU (one device-to-host copy, shared by digest and save)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def load_checkpoint(path: str, flag: str = '--resume') -> Dict[str, Any]:
    """Load a checkpoint safely (weights only) or raise a one-line UserError naming ``flag`` and the file."""
    if not os.path.isfile(path):
        raise UserError(f'{flag} {path}: ' + ('is a directory, not a checkpoint file' if os.path.isdir(path)
                                              else 'file not found'))
    try:
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
    if isinstance(ckpt.get('checksum'), str) and state_digest(ckpt) != ckpt['checksum']:
        raise UserError(f'{flag} {path}: checksum mismatch: the file was damaged after it was written (its content '
                        f'differs from what was saved); use an earlier checkpoint')
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
    """Write ``checkpoint-last.pth`` (always) and ``checkpoint-{epoch}.pth`` (if ``numbered``); rank 0 only.

    ``state`` holds model/optimizer/scaler/step/... . RNG state and args are added here. Returns the paths written.
    """
    if not output_dir or not du.is_main_process():
        return []
    check_finite_weights(state.get('model') or {}, epoch, args)
    obj = _to_cpu(dict(state))
    obj.update(epoch=epoch, args=args_to_dict(args), rng=capture_rng_state(), version=CHECKPOINT_VERSION,
               run_id=getattr(args, 'run_id', None))
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


# Flags whose change alters the run: a resumed run with different values is no longer "the same run".
RUN_DEFINING_FLAGS = ('model', 'input_size', 'patch_size', 'mask_ratio', 'hog_nbins', 'hog_bias', 'all_stages',
                      'stage_weights', 'batch_size', 'accum_iter', 'epochs', 'warmup_epochs', 'lr', 'blr', 'min_lr',
                      'weight_decay', 'seed', 'world_size', 't_0', 'how_scale', 'not_scale_lr', 'non_layerwise_lr',
                      'dont_freeze_pe', 'freezeout', 'freeze_schedule', 'lr_schedule', 'constant_tail',
                      'stage_weights_end', 'layer_decay', 'drop_path', 'nb_classes', 'smoothing', 'mixup',
                      'cutmix', 'mask_curriculum')


def warn_changed_flags(saved: Dict[str, Any], args: argparse.Namespace) -> List[str]:
    """Warn (not fail) about run-defining flags that differ from the checkpoint's; returns the changed names."""
    changed = []
    now = args_to_dict(args)
    for k in RUN_DEFINING_FLAGS:
        if k in saved and k in now and saved[k] != now[k]:
            changed.append(k)
            du.print0(f'warning: resuming with --{k} {now[k]!r} but the checkpoint was trained with {saved[k]!r}; '
                      f'the continued run will differ from an uninterrupted one')
    return changed
