"""``python SCRIPT *argv`` / ``python -m MODULE *argv`` inside the test process: the program's real ``__main__``
(argument parsing, ``run_main``'s one-line errors and exit codes), without an interpreter + torch start-up per run."""
from __future__ import annotations

import contextlib
import io
import runpy
import sys
import traceback
import warnings
from pathlib import Path
from typing import List, Tuple

REPO = Path(__file__).resolve().parent.parent


def cli(script: str, argv: List[str]) -> Tuple[object, str, str]:
    """``(exit code, or 'traceback' for an uncaught exception, stdout, stderr)`` of ``python SCRIPT *argv``
    (``script`` a top-level ``run_*.py``) or ``python -m SCRIPT *argv`` (``script`` a module: ``tools.export``)."""
    if script.startswith(('tools/', 'bench/')):  # their file spelling re-executes as -m (os.execv: not in-process)
        script = script[:-len('.py')].replace('/', '.')
    out, err, old = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [script, *map(str, argv)]
    rc: object = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if script.endswith('.py'):
                    runpy.run_path(str(REPO / script), run_name='__main__')
                else:
                    with warnings.catch_warnings():  # imported by an earlier test: -m runs a fresh copy, as wanted
                        warnings.filterwarnings('ignore', message='.*found in sys.modules', category=RuntimeWarning)
                        runpy.run_module(script, run_name='__main__', alter_sys=True)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - what a CLI must never show
                traceback.print_exc()
                rc = 'traceback'
    finally:
        sys.argv = old
    return rc, out.getvalue(), err.getvalue()


def resume_from_epoch0(script: str, ref: Path, res: Path, argv_for) -> Tuple[dict, dict, List[dict], List[dict]]:
    """A run in ``res`` resumed from the finished run ``ref``'s ``checkpoint-0.pth`` (its first log record kept), with
    the same flags: ``argv_for(out_dir)`` -> argv. Returns (ref's, res's last checkpoint, ref's, res's log records),
    so a test compares an interrupted-and-resumed run with the uninterrupted one."""
    import json
    import shutil

    import torch
    res.mkdir()
    shutil.copy(ref / 'checkpoint-0.pth', res / 'checkpoint-last.pth')
    (res / 'log.txt').write_text((ref / 'log.txt').read_text().splitlines(keepends=True)[0])
    rc, out, err = cli(script, argv_for(res))
    assert rc == 0 and 'Resumed from' in out, err[-3000:]
    a, b = (torch.load(d / 'checkpoint-last.pth', map_location='cpu', weights_only=True) for d in (ref, res))
    logs = [[json.loads(line) for line in (d / 'log.txt').read_text().splitlines()] for d in (ref, res)]
    return a, b, logs[0], logs[1]
