"""Graceful SIGTERM/SIGINT/SIGHUP for training loops: stop at a micro-batch boundary, write nothing half-done.

Usage in a script (``run_main`` in ``util/args.py`` turns :class:`Interrupted` into one line and exit 128+signal)::

    with GracefulStop() as stop:                 # all ranks, at the same point (creates a gloo group under DDP)
        for epoch in ...:
            train_one_epoch(..., stop=stop)      # the loop calls stop.check(epoch, i) before each micro-batch
            save_checkpoint(...)                 # a signal here is only noted: the save finishes (atomically)

The first SIGINT/SIGTERM only sets a flag, so the current micro-batch, checkpoint write or log line completes. The
loop's next :meth:`GracefulStop.check` raises :class:`Interrupted`; nothing of the unfinished epoch is written and
``checkpoint-last.pth`` stays the last finished epoch, so rerunning the same command resumes exactly. A second
SIGINT/SIGTERM exits at once (``os._exit``; checkpoint writes are atomic, so this is still safe).

Under DDP the ranks agree on the stop: every check all-reduces (MAX) the local flag of the *previous* check
asynchronously on a small gloo group, so all ranks raise at the same iteration (one iteration late) and none is
left waiting in a collective, even when only one rank received the signal. Loader worker processes inherit the
handler but ignore signals (the main process shuts them down).
"""
import os
import signal
import sys
from typing import Any, Dict, Optional

import torch

from util import distributed as du

# SIGHUP (terminal closed, ssh dropped) is a request to stop like SIGTERM: finish the write in progress, then stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# The newest checkpoint this process wrote or resumed from: (path, epoch). Set by util/checkpoint.py.
_last_checkpoint: Dict[str, Any] = {}
_active: list = []  # the installed GracefulStop (at most one)


class TrainingStopped(Exception):
    """Training stopped early on purpose; nothing of the unfinished epoch was written. ``exit_code`` for sys.exit;
    ``resume_hint``: the error line says which checkpoint to resume from, with what LR."""
    exit_code = 1
    resume_hint = False


class NonFiniteLoss(TrainingStopped, RuntimeError):
    """The loss became NaN/inf (every rank stops at the same flush); the message names epoch, iteration and the loss
    parts. Exit status 3, as for non-finite weights (util.checkpoint.NonFiniteWeights): the run diverged."""
    exit_code = 3
    resume_hint = True


class Interrupted(TrainingStopped):
    """A SIGINT/SIGTERM was received; raised at a micro-batch boundary."""

    def __init__(self, signum: int, epoch: Optional[int] = None, iteration: Optional[int] = None):
        self.signum, self.epoch, self.iteration = int(signum), epoch, iteration
        self.exit_code = 128 + self.signum
        where = '' if epoch is None else f' at epoch {epoch}' + ('' if iteration is None else f' iteration {iteration}')
        super().__init__(f'interrupted by {signal.Signals(self.signum).name}{where}')


def note_checkpoint(path: str, epoch: Any) -> None:
    """Record the newest checkpoint written by (or resumed into) this run, for the interruption message."""
    _last_checkpoint.update(path=path, epoch=epoch)


def last_checkpoint() -> Dict[str, Any]:
    """``{'path', 'epoch'}`` of the newest checkpoint written by (or resumed into) this run; empty if none."""
    return dict(_last_checkpoint)


def pending_signal() -> Optional[int]:
    """The stop signal received by the installed :class:`GracefulStop`, if any (for error paths in ``run_main``)."""
    return _active[-1].signum if _active else None


def interrupted_message(e: Interrupted, args: Any = None) -> str:
    """One line: what was interrupted, what is kept, how to resume."""
    msg = str(e)
    ckpt = _last_checkpoint.get('path')
    if not ckpt:
        return f'{msg}; no checkpoint was written by this run; rerun the same command to start again'
    msg += f'; last checkpoint: {ckpt} (epoch {_last_checkpoint.get("epoch")})'
    resume = getattr(args, 'resume', '') or ''
    auto = getattr(args, 'auto_resume', False)
    out = os.path.abspath(getattr(args, 'output_dir', '') or '.')
    if resume and os.path.abspath(resume) != os.path.abspath(ckpt):
        return f'{msg}; to resume, rerun with --resume {ckpt} instead of --resume {resume}'
    if not resume and not (auto and os.path.dirname(os.path.abspath(ckpt)) == out):
        return f'{msg}; to resume, rerun with --resume {ckpt}'
    return f'{msg}; rerun the same command to resume'


class GracefulStop:
    """Context manager: install SIGINT/SIGTERM handlers that set a flag; :meth:`check` raises at a safe point."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.signum: Optional[int] = None
        self._old: Dict[int, Any] = {}
        self._pid = os.getpid()
        self._group = None
        self._work = None
        self._buf: Optional[torch.Tensor] = None

    # -- handlers ---------------------------------------------------------------------------------------------
    def _handler(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process decides and shuts the workers down
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f'\nsecond {name}: exiting immediately (checkpoints on disk are complete; the current epoch is '
                  f'lost)', file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f'\n{name} received: stopping at the next iteration boundary without writing a partial epoch '
              f'(send it again to exit at once)', file=sys.stderr, flush=True)

    def __enter__(self) -> 'GracefulStop':
        while _active:  # one left open by an exception in an in-process caller (tests): restore its handlers first
            _active[-1].__exit__(None, None, None)
        _active.append(self)
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handler)
        if du.is_dist():
            import torch.distributed as dist
            self._group = dist.new_group(backend='gloo')  # collective: every rank enters here at the same point
        return self

    def __exit__(self, *exc) -> bool:
        if self._work is not None:
            try:
                self._work.wait()  # every rank launched the matching op, so this cannot block on a missing peer
            except Exception:  # noqa: BLE001 - a broken group must not mask the real exception
                pass
            self._work = None
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        if self in _active:
            _active.remove(self)
        return False

    # Without a ``with`` block (keeps the training loop's indentation): ``stop = GracefulStop().start()`` ...
    # ``stop.close()`` before ``du.cleanup()``. If the process ends by an exception, nothing needs closing.
    def start(self) -> 'GracefulStop':
        return self.__enter__()

    def close(self) -> None:
        self.__exit__(None, None, None)

    # -- polling ----------------------------------------------------------------------------------------------
    @property
    def requested(self) -> bool:
        """This process received a stop signal (not necessarily agreed by the other ranks yet)."""
        return self.signum is not None

    def agreed(self) -> Optional[int]:
        """The signal number if all ranks must stop now, else None. Identical on every rank at the same call."""
        if self._group is None:
            return self.signum
        import torch.distributed as dist
        stop = 0
        if self._work is not None:
            self._work.wait()
            self._work = None
            stop = int(self._buf.item())
        if stop:
            return stop
        self._buf = torch.tensor([self.signum or 0], dtype=torch.int32)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return None

    def check(self, epoch: Optional[int] = None, iteration: Optional[int] = None) -> None:
        """Raise :class:`Interrupted` if (all ranks agree that) a stop signal arrived. Call between micro-batches."""
        s = self.agreed()
        if s:
            raise Interrupted(s, epoch, iteration)


def install_default_handlers() -> Dict[int, Any]:
    """Outside a :class:`GracefulStop` (start-up, evaluation, k-NN): SIGTERM/SIGHUP raise :class:`Interrupted` in
    the main process, as SIGINT raises KeyboardInterrupt, so ``run_main`` reports them in one line. Nothing is being
    written at those points except atomically. Forked loader workers ignore them (the main process ends them)."""
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:
            return
        raise Interrupted(signum)
    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}  # the old ones, to restore


class _NoStop:
    """Stand-in when a loop runs without :class:`GracefulStop` (library use, tests)."""
    requested = False

    def check(self, epoch: Optional[int] = None, iteration: Optional[int] = None) -> None:
        return None


NO_STOP = _NoStop()
