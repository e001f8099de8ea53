"""Logging: MetricLogger with ETA (MAE style, device-agnostic), JSON lines in ``log.txt``, TensorBoard on rank 0.

Named ``log`` (not ``logging``) so scripts run from inside ``util/`` never shadow the standard library.
"""
import datetime
import json
import os
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, Optional

import torch

from util import distributed as du


class SmoothedValue:
    """A windowed median/average plus the global average of a stream of numbers."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or '{median:.4f} ({global_avg:.4f})'

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum count/total over ranks on the backend's own device (gloo: CPU), so CPU runs work too."""
        if not du.is_dist():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=du.collective_device())
        du.all_reduce_tensor(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Meters plus a ``log_every`` generator that prints progress with per-epoch ETA (and whole-run ETA if given)."""

    def __init__(self, delimiter: str = '  '):
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs: Any) -> None:
        for k, v in kwargs.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable: Iterable, print_freq: int, header: str = '',
                  remaining_after: Optional[int] = None, total: Optional[int] = None) -> Iterator:
        """Yield from ``iterable`` and print a progress line every ``print_freq`` items and at the last one.

        Args:
            remaining_after: iterations of the whole run left after this epoch; adds a whole-run ETA.
            total: length to report when ``iterable`` has no ``len`` (e.g. a truncated ``--debug`` epoch).
        """
        n = total if total is not None else len(iterable)
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        width = len(str(n))
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == n - 1:
                eta = iter_time.global_avg * (n - 1 - i)
                parts = [header, f'[{i:{width}d}/{n}]', f'eta: {_fmt_td(eta)}']
                if remaining_after is not None:
                    parts.append(f'run eta: {_fmt_td(eta + iter_time.global_avg * remaining_after)}')
                parts += [str(self), f'time: {iter_time}', f'data: {data_time}']
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f'max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}')
                du.print0(self.delimiter.join(p for p in parts if p))
            end = time.time()
        total_time = time.time() - start
        du.print0(f'{header} Total time: {_fmt_td(total_time)} ({total_time / max(1, n):.4f} s / it)')


def _fmt_td(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def write_json(path: Optional[str], obj: Any) -> None:
    """Write ``obj`` to ``path`` as indented JSON (a benchmark's ``--json`` result; non-JSON values as ``str``);
    nothing when ``path`` is empty."""
    if path:
        with open(path, 'w') as f:
            json.dump(obj, f, indent=1, default=str)


def append_json_log(output_dir: str, record: Dict[str, Any], filename: str = 'log.txt') -> Optional[int]:
    """Append one JSON line to ``<output_dir>/log.txt`` (rank 0 only; flushed and fsync'ed).

    Returns the file's size before the append (for :func:`epoch_record` to undo it), None where nothing was written.
    A write error (disk full, size limit) is one line naming the file and the cause.
    """
    if not output_dir or not du.is_main_process():
        return None
    path = os.path.join(output_dir, filename)
    from util.checkpoint import CheckpointWriteError, _cause
    try:
        with open(path, 'ab') as f:
            offset = f.tell()
            f.write((json.dumps(record) + '\n').encode('utf-8'))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CheckpointWriteError(f'cannot write {path}: {_cause(e)}') from None
    return offset


@contextmanager
def epoch_record(output_dir: str, record: Dict[str, Any], run_id: Optional[str] = None) -> Iterator[None]:
    """Log an epoch's record, then run the body (the epoch's checkpoint save); if the body fails, the record is
    removed again, so log.txt never holds an epoch whose checkpoint was not written.

    The record precedes the checkpoint on purpose: a kill between the two leaves a record that
    :func:`trim_json_log` drops on resume, whereas the other order would lose the record of a saved epoch.
    """
    if run_id is not None:
        from util.rundir import ensure_run_file
        ensure_run_file(output_dir, run_id)
        record = dict(record, run_id=run_id)
    offset = append_json_log(output_dir, record)
    try:
        yield
    except BaseException:
        if offset is not None:
            with open(os.path.join(output_dir, 'log.txt'), 'r+b') as f:
                f.truncate(offset)
                os.fsync(f.fileno())
        raise


def trim_json_log(output_dir: str, last_epoch: int, filename: str = 'log.txt', run_id: Optional[str] = None) -> int:
    """Before training from epoch ``last_epoch + 1``: drop this run's ``log.txt`` records of later epochs.

    The epoch's record is appended just before its checkpoint is written, so a run killed in between (or whose
    newest checkpoint turned out unreadable, or that died before its first checkpoint) leaves records that the
    resumed run writes again. Only JSON records with an ``epoch`` and the same ``run_id`` (or, in folders from
    before run ids, none) are dropped; every other line (a note, another run's record, bytes that are not UTF-8,
    a torn last line) is kept verbatim, newline-terminated so the next record starts on its own line. Rank 0 only;
    the file is replaced atomically. Returns the number of lines dropped.
    """
    path = os.path.join(output_dir or '', filename)
    if not output_dir or not du.is_main_process() or not os.path.isfile(path):
        return 0
    with open(path, 'rb') as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line.decode('utf-8'))
        except ValueError:  # includes UnicodeDecodeError
            rec = None
        ours = isinstance(rec, dict) and rec.get('run_id') in (None, run_id)
        if ours and isinstance(rec.get('epoch'), int) and rec['epoch'] > last_epoch:
            continue
        keep.append(line if line.endswith(b'\n') else line + b'\n')
    dropped = len(lines) - len(keep)
    if dropped or (lines and not lines[-1].endswith(b'\n')):
        tmp = f'{path}.tmp-{os.getpid()}'
        with open(tmp, 'wb') as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    if dropped:
        du.print0(f'{path}: dropped {dropped} record(s) of epochs > {last_epoch} (not covered by the checkpoint '
                  f'resumed from; they are trained and logged again)')
    return dropped


class TensorBoard:
    """A SummaryWriter on rank 0 when ``log_dir`` is set; a silent no-op elsewhere."""

    def __init__(self, log_dir: Optional[str]):
        self.writer = None
        if log_dir and du.is_main_process():
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=log_dir)

    def __bool__(self) -> bool:
        return self.writer is not None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def scalars(self, tag: str, values: Dict[str, float], step: int) -> None:
        """Several series on one chart (e.g. the LR of every FreezeOut unit)."""
        if self.writer is not None:
            self.writer.add_scalars(tag, values, step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, img, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
