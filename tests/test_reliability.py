"""Reliability through the real CLI, and the bad-input message table.

The tests live in one file per thing they protect:
  * ``test_reliability_resume.py``: exact resume after every kind of stop, crash-safe checkpoints, weights-only
    loads (pre-training and evaluators);
  * ``test_reliability_bad_input.py``: bad flags/files/data, NaN loss, changed flags on resume: one line, exit code,
    nothing written;
  * ``test_reliability_ddp.py``: 2-process DDP (torchrun and the legacy launcher), SIGTERM under DDP, ``--dist_eval``;
helpers, fault-injection hooks and the shared reference runs: ``reliability_common.py``, ``hooks/sitecustomize.py``.

``python tests/test_reliability.py --table`` runs every bad-input case of :data:`TABLE` and prints the message table
(markdown), then the flag-domain walk of ``test_flag_domains.py`` (every out-of-domain value of every flag of every
script, with its exact message).

To add cases, append ``(module name, cases dict name, runner name, context keys)`` to :data:`TABLE`:
the runner is called as ``runner(case, tmp_dir, *[context[k] for k in keys])`` and returns
``(CompletedProcess, pattern, output_dir, snapshot_before, [script, *flags])``; context holds ``demo`` (the demo
data), ``ref`` (a finished 3-epoch FreezeOut pre-training dir), ``existing`` (an output_dir after epoch 0) and
``ev`` (``{'ft': finished fine-tune dir, 'pre': ref/checkpoint-2.pth}``).
"""
from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

TABLE = [
    ('test_reliability_bad_input', 'BAD_INPUTS', 'run_bad_input', ('demo', 'ref', 'existing')),
    ('test_reliability_bad_input', 'EVAL_BAD_INPUTS', 'run_eval_bad_input', ('demo', 'ev')),
]


def print_table() -> None:
    import tempfile

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    from reliability_common import EVAL, FT, pretrain_args, run, snapshot
    from tests.conftest import DEMO_KW
    from util.demo_data import make_demo_dataset
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo = make_demo_dataset(tmp / 'demo', **DEMO_KW)
        ref = tmp / 'ref'
        r = run('run_pretrain.py', pretrain_args(demo, ref, '--save_freq', '1'))
        assert r.returncode == 0, r.stderr
        ex = tmp / 'existing'
        ex.mkdir()
        shutil.copy(ref / 'checkpoint-0.pth', ex / 'checkpoint-last.pth')
        (ex / 'log.txt').write_text((ref / 'log.txt').read_text().splitlines(keepends=True)[0])
        r = run('run_finetune.py', [*EVAL, *FT, '--finetune', ref / 'checkpoint-2.pth', '--data_path', demo,
                                    '--output_dir', tmp / 'ft'])
        assert r.returncode == 0, r.stderr
        context = dict(demo=demo, ref=ref, existing=ex, ev={'ft': tmp / 'ft', 'pre': ref / 'checkpoint-2.pth'})
        print('| bad input | script and flags | exit | message (output_dir files) |\n|---|---|---|---|')
        for module_name, cases_name, runner_name, keys in TABLE:
            module = importlib.import_module(module_name)
            runner = getattr(module, runner_name)
            for case in getattr(module, cases_name):
                t = tmp / case
                t.mkdir()
                r, _, out, before, flags = runner(case, t, *[context[k] for k in keys])
                msg = [l for l in r.stderr.splitlines() if l.strip()][-1]
                flags = ' '.join(map(str, flags))
                for path, name in ((t, '<tmp>'), (ref, '<pretrain>'), (tmp / 'ft', '<finetune>')):
                    msg, flags = msg.replace(str(path), name), flags.replace(str(path), name)
                same = 'unchanged' if not out.exists() or snapshot(out) == before else 'CHANGED'
                print(f'| {case} | `{flags}` | {r.returncode} | `{msg}` ({same}) |', flush=True)
        from test_flag_domains import print_walk_table  # every flag of every script against its domain
        print_walk_table(tmp)


if __name__ == '__main__' and '--table' in sys.argv:
    print_table()
