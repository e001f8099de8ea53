"""``python SCRIPT *argv`` inside the test process: the script's real ``__main__`` (argument parsing, ``run_main``'s
one-line errors and exit codes), without an interpreter + torch start-up per run."""
from __future__ import annotations

import contextlib
import io
import runpy
import sys
import traceback
from pathlib import Path
from typing import List, Tuple

REPO = Path(__file__).resolve().parent.parent


def cli(script: str, argv: List[str]) -> Tuple[object, str, str]:
    """``(exit code, or 'traceback' for an uncaught exception, stdout, stderr)`` of ``python SCRIPT *argv``."""
    out, err, old = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [script, *map(str, argv)]
    rc: object = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(REPO / script), run_name='__main__')
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - what a CLI must never show
                traceback.print_exc()
                rc = 'traceback'
    finally:
        sys.argv = old
    return rc, out.getvalue(), err.getvalue()
