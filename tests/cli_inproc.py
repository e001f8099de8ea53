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
