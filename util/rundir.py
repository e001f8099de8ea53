"""One run per output folder: an exclusive lock for the run's lifetime, a run id, and start-up housekeeping.

* :func:`lock_output_dir` takes an exclusive ``flock`` on ``<output_dir>/.vitfreeze.lock`` (rank 0), held until the
  run ends (``run_main`` returns, or the process dies: the kernel releases it even after SIGKILL). A second run on the same folder stops with one line
  naming the holder. A lock file left by a process that died is detected (its lock is free), reported and reused.
  Under the lock, temp files left by dead processes (``.checkpoint-N.pth.tmp-<pid>``, ``log.txt.tmp-<pid>``) are
  removed, with a note.
* :func:`claim_run` decides the run id after the resume decision: a resumed run keeps the id of its checkpoint; a
  run starting from scratch in a folder that holds checkpoints stops with one line unless ``--overwrite``, which
  moves the old run's files into ``<output_dir>/previous-<UTC time>/`` just before the new run's first write. The id
  is written to ``<output_dir>/run.json`` (with the run's first log record), into every checkpoint (``run_id``) and
  every ``log.txt`` record, so auto-resume and log trimming only ever touch the files of the same run.
"""
import argparse
import json
import os
import re
import socket
import sys
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from util import distributed as du
from util.errors import UserError

LOCK_NAME = '.vitfreeze.lock'
RUN_FILE = 'run.json'
_TMP = re.compile(r'^\.?(?:checkpoint-(?:\d+|last)\.pth|log\.txt|run\.json)\.tmp-(\d+)$')
_CKPT = re.compile(r'^checkpoint-(?:\d+|last)\.pth$')
_held: Dict[str, int] = {}  # realpath of a locked folder -> open descriptor (kept for the process's lifetime)
_move_pending: Dict[str, str] = {}  # output_dir -> whose files --overwrite moves aside at the first write


def is_rank0() -> bool:
    """Global rank 0, also before the process group exists (launchers set RANK / SLURM_PROCID)."""
    if du.is_dist():
        return du.is_main_process()
    return int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0')) or 0) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(info: Dict[str, Any]) -> str:
    started = info.get('started')
    when = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started)) if isinstance(started, (int, float)) else '?'
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {when}"


def lock_output_dir(output_dir: str, flag: str = '--output_dir') -> None:
    """Hold an exclusive lock on ``output_dir`` until this process exits (rank 0; no-op without a folder)."""
    if not output_dir or not is_rank0():
        return
    import fcntl
    real = os.path.realpath(output_dir)
    if real in _held:
        return
    path = os.path.join(output_dir, LOCK_NAME)
    for _ in range(5):  # the holder may unlink the file between our open and our lock: retry on a fresh inode
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd)
            os.close(fd)
            raise UserError(f'{flag} {output_dir} is in use by another run ({_describe(info)}); wait for it to '
                            f'finish or choose another {flag}') from None
        except OSError as e:  # e.g. a file system without flock: run unlocked rather than not at all
            os.close(fd)
            du.print0(f'warning: {flag} {output_dir}: cannot lock ({e.strerror}); make sure no other run uses it')
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise UserError(f'{flag} {output_dir}: could not take the lock {path}; is another run starting there?')
    old = _read_info(fd)
    if old.get('pid') and old.get('pid') != os.getpid():
        print(f'note: {flag} {output_dir}: stale lock of a run that ended without releasing it '
              f'({_describe(old)}); taking it over', flush=True)
    info = dict(pid=os.getpid(), host=socket.gethostname(), started=time.time(), command=' '.join(sys.argv))
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + '\n').encode(), 0)
    _held[real] = fd
    import atexit
    atexit.register(_release, real, os.path.join(real, LOCK_NAME))
    clean_stale_temp_files(output_dir)


def folder_in_use(output_dir: str) -> Optional[str]:
    """Who holds ``output_dir``'s lock (``pid .. on .., started ..``), or None: a probe that takes and drops the lock
    at once and creates nothing (a launcher asks before it writes its state files into a folder)."""
    import fcntl
    path = os.path.join(output_dir, LOCK_NAME) if output_dir else ''
    if not path or not os.path.isfile(path) or os.path.realpath(output_dir) in _held:
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(_read_info(fd))
    except OSError:
        return None
    finally:
        os.close(fd)  # closing drops a lock we took
    return None


def release_all() -> None:
    """Release every folder lock this process holds (the end of ``run_main``; also registered with atexit)."""
    for real in list(_held):
        _release(real, os.path.join(real, LOCK_NAME))
    _move_pending.clear()  # an --overwrite that never reached a write moves nothing later


def _read_info(fd: int) -> Dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode('utf-8', 'replace') or '{}')
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _release(real: str, path: str) -> None:
    """Clean exit: remove the lock file while still holding the lock, then drop it."""
    fd = _held.pop(real, None)
    if fd is None:
        return
    try:
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def clean_stale_temp_files(output_dir: str) -> List[str]:
    """Remove temp files of our atomic writes whose writer process is gone (call under the lock)."""
    removed = []
    for name in sorted(os.listdir(output_dir)):
        m = _TMP.match(name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        p = os.path.join(output_dir, name)
        try:
            size = os.path.getsize(p)
            os.remove(p)
        except OSError:
            continue
        removed.append(p)
        print(f'note: removed {p} ({size / 2 ** 20:.1f} MiB), a temp file left by process {m.group(1)} that is no '
              f'longer running', flush=True)
    return removed


# ---- run identity ----------------------------------------------------------------------------------------------


def new_run_id() -> str:
    return time.strftime('%Y%m%d-%H%M%S', time.gmtime()) + '-' + uuid.uuid4().hex[:8]


def folder_run_id(output_dir: str) -> Optional[str]:
    """The run id recorded in ``<output_dir>/run.json`` (None if absent or unreadable)."""
    try:
        with open(os.path.join(output_dir, RUN_FILE), encoding='utf-8') as f:
            rid = json.load(f).get('run_id')
        return rid if isinstance(rid, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def checkpoint_files(output_dir: str) -> List[str]:
    if not output_dir or not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if _CKPT.match(n))


def ensure_run_file(output_dir: str, run_id: Optional[str]) -> None:
    """Before the run's first write: move the old run aside if ``--overwrite`` asked for it, then record ``run_id``
    as the folder's run in ``run.json`` (rank 0, atomically) unless it already is. Deferred to this point so that a
    run failing at start-up (a bad flag found late, a checkpoint that does not fit) changes nothing."""
    if not output_dir or not run_id or not is_rank0():
        return
    what = _move_pending.pop(output_dir, None)
    if what:
        du.print0(f'--overwrite: moved the files of {what} into {move_aside(output_dir)}')
    if folder_run_id(output_dir) != run_id:
        _write_run_file(output_dir, run_id)


def _write_run_file(output_dir: str, run_id: str) -> None:
    path = os.path.join(output_dir, RUN_FILE)
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(dict(run_id=run_id, created=time.time(), command=' '.join(sys.argv)), f)
        f.write('\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def move_aside(output_dir: str) -> str:
    """Move the previous run's checkpoints, log.txt and run.json into ``previous-<UTC time>/``; returns it."""
    dest = os.path.join(output_dir, 'previous-' + time.strftime('%Y%m%d-%H%M%S', time.gmtime()))
    n = 0
    while os.path.exists(dest + (f'-{n}' if n else '')):
        n += 1
    dest += f'-{n}' if n else ''
    os.makedirs(dest)
    for name in checkpoint_files(output_dir) + [x for x in ('log.txt', RUN_FILE)
                                                if os.path.isfile(os.path.join(output_dir, x))]:
        os.replace(os.path.join(output_dir, name), os.path.join(dest, name))
    return dest


def claim_run(args: argparse.Namespace, resumed: Optional[Tuple[str, Dict[str, Any]]]) -> str:
    """Decide and record this run's id (sets ``args.run_id``); see the module docstring. Call on every rank."""
    out = getattr(args, 'output_dir', '') or ''
    folder_run = folder_run_id(out) if out else None
    existing = checkpoint_files(out)
    if resumed is not None:
        path, ckpt = resumed
        run_id = ckpt.get('run_id') or folder_run or new_run_id()
        foreign = existing and folder_run and ckpt.get('run_id') and ckpt['run_id'] != folder_run
        if foreign and not getattr(args, 'overwrite', False):
            raise UserError(f'--resume {path} is run {ckpt["run_id"]} but --output_dir {out} holds the checkpoints '
                            f'of run {folder_run} ({", ".join(existing)}); resume into another --output_dir, or '
                            f'pass --overwrite to move them aside')
        if foreign:
            _move_pending[out] = f'run {folder_run}'
            du.print0(f'--overwrite: the files of run {folder_run} in {out} are moved aside before the first write')
    elif existing:
        if not getattr(args, 'overwrite', False):
            why = ('none of them can be resumed (see the skipped files above)' if getattr(args, 'auto_resume', False)
                   else 'and --no_auto_resume starts from scratch')
            raise UserError(f'--output_dir {out} holds the checkpoints of another run ({", ".join(existing)}) '
                            f'{why}; nothing was changed. Use a new --output_dir, or pass --overwrite to move them '
                            f'(and log.txt) into {out}/previous-<time>/')
        run_id = new_run_id()
        _move_pending[out] = 'the previous run'
        du.print0(f'--overwrite: the files of the previous run in {out} are moved aside before the first write')
    else:
        run_id = folder_run or new_run_id()  # a run that never finished an epoch here restarts under its own id
    args.run_id = run_id  # run.json follows with the first record (ensure_run_file): a failed start writes nothing
    du.print0(f'run id: {run_id}')
    return run_id
