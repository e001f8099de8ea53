"""Driver of the flag-domain walk (tests/test_flag_domains.py, ``tests/test_reliability.py --table``).

    python tests/flag_walk.py CASES.json   ->  {script: [result per case]} as JSON on stdout

``CASES.json`` maps a script path to ``{"cwd": empty scratch folder, "cases": [argv, ...]}``. Each case runs the
script's real ``__main__`` block in this process (``runpy``), so hundreds of cases over all scripts cost one
interpreter start-up (torch/timm imports dominate). A case "wrote something" if the listing of its scratch folder
(the current directory while it runs) changed. A script inside a package (``tools/sweep.py``) runs as its module,
``python -m tools.sweep``, the way it is run from the repository root.
"""
import contextlib
import io
import json
import os
import runpy
import sys
import traceback


def walk(script: str, cases):
    folder = os.path.dirname(script)
    module = None  # tools/sweep.py -> tools.sweep (as python -m runs it; the file re-runs itself that way too)
    if os.path.isfile(os.path.join(folder, '__init__.py')):
        module = f'{os.path.basename(folder)}.{os.path.splitext(os.path.basename(script))[0]}'
    results = []
    for argv in cases:
        before = set(os.listdir('.'))
        out, err = io.StringIO(), io.StringIO()
        rc, tb = None, None
        sys.argv = [script, *argv]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if module:
                    runpy.run_module(module, run_name='__main__', alter_sys=True)
                else:
                    runpy.run_path(script, run_name='__main__')
                rc = 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - a traceback is exactly what the walk must report
                tb = traceback.format_exc()
        results.append(dict(argv=argv, rc=rc, stdout=out.getvalue(), stderr=err.getvalue(), traceback=tb,
                            written=sorted(set(os.listdir('.')) - before)))
    return results


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    results = {}
    for script, job in spec.items():
        os.chdir(job['cwd'])
        results[script] = walk(os.path.abspath(script), job['cases'])
    print(json.dumps(results))
