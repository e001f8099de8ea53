"""Every flag of every script is checked against its declared domain before any work (issue 14 §3).

The flags are discovered from each script's ``get_args_parser()``, so a flag added later is walked too, and a
numeric flag declared without ``domain=`` (util/args) fails ``test_every_numeric_flag_has_a_domain``. Every
out-of-domain value must give: exit status 2, exactly one stderr line, starting ``error:`` and naming the flag,
no traceback, nothing on stdout, nothing written. The walk runs each script's real ``__main__`` block in one
interpreter per script (``tests/flag_walk.py``); ``test_real_process_*`` checks the same through a fresh process.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from util import args as uargs  # noqa: E402


def scripts() -> List[Path]:
    """Every command-line program with a ``get_args_parser()``: run_*.py and the tools."""
    found = sorted(REPO.glob('run_*.py')) + sorted(REPO.glob('tools/*.py')) + sorted(REPO.glob('util/*.py'))
    return [p for p in found if 'def get_args_parser' in p.read_text()]


def parser_of(script: Path):
    rel = script.relative_to(REPO).with_suffix('')
    return importlib.import_module('.'.join(rel.parts)).get_args_parser()


def prepare_paths(d: Path) -> Dict[str, Path]:
    """Files/folders that make path flags fail: a plain file, a folder, an output dir with bad entries."""
    d.mkdir(parents=True, exist_ok=True)
    (d / 'afile').write_text('not a directory\n')
    (d / 'adir').mkdir(exist_ok=True)
    (d / 'notes.txt').write_text('not features\n')
    bad_ckpt = d / 'out_ckpt_dir'
    (bad_ckpt / 'checkpoint-last.pth').mkdir(parents=True, exist_ok=True)
    bad_log = d / 'out_log_dir'
    (bad_log / 'log.txt').mkdir(parents=True, exist_ok=True)
    return dict(afile=d / 'afile', adir=d / 'adir', notes=d / 'notes.txt', bad_ckpt=bad_ckpt, bad_log=bad_log)


def required_argv(parser) -> List[str]:
    """Placeholder values for required options (never used: the walked flag fails first)."""
    out: List[str] = []
    for a in parser._actions:
        if a.option_strings and a.required:
            out += [a.option_strings[0], f'unused-{a.dest}']
    return out


def required_positionals(parser) -> List[str]:
    """Placeholders for required positionals, which go after the options (tools/submitit_launch.py SCRIPT takes
    the rest of the line as the script's flags): a real script name for ``script``."""
    return ['run_pretrain.py' if a.dest == 'script' else f'unused-{a.dest}'
            for a in parser._actions if not a.option_strings and a.nargs is None]


def walk_cases(script: Path, paths: Dict[str, Path]) -> List[Tuple[str, List[str]]]:
    """``(flag named in the message, argv)`` for every out-of-domain value of every flag the script has."""
    parser = parser_of(script)
    req = required_argv(parser)
    dests = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    cases: List[Tuple[str, List[str]]] = []
    for a in uargs.numeric_actions(parser):
        flag = a.option_strings[0]
        dom = uargs.domain_of(a)
        for v in (dom.bad_values() if dom else []) + ['abc']:
            cases.append((flag, [flag, v]))
    rel = {  # cross-flag rules: (flags the script must have, flag named, argv)
        ('warmup_epochs', 'epochs'): ('--warmup_epochs', ['--epochs', '2', '--warmup_epochs', '3']),
        ('start_epoch', 'epochs'): ('--start_epoch', ['--epochs', '2', '--warmup_epochs', '0', '--start_epoch', '2']),
        ('num_heads', 'embed_dim'): ('--num_heads', ['--embed_dim', '64', '--num_heads', '5']),
        ('cutmix_minmax',): ('--cutmix_minmax', ['--cutmix_minmax', '0.6', '0.4']),
    }
    for need, (flag, argv) in rel.items():
        if all(n in dests for n in need):
            cases.append((flag, argv))
    strings = {'device': ['xyz', 'cuda:x'], 'mixup_mode': ['bogus'], 'remode': ['bogus'], 'aa': ['garbage'],
               'stage_weights': ['0,0,0,0', '1,nan', 'heavy']}
    for dest, values in strings.items():
        if dest in dests:
            cases += [(dests[dest], [dests[dest], v]) for v in values]
    for a in parser._actions:  # argparse choices: walked too, so no string flag escapes
        if a.option_strings and a.choices and a.nargs != 0:
            cases.append((a.option_strings[0], [a.option_strings[0], 'not-a-choice']))
    path_cases = {
        'output_dir': [paths['afile'], paths['afile'] / 'sub'], 'log_dir': [paths['afile'], paths['afile'] / 'tb'],
        'dump_features': [paths['afile'] / 'feats'], 'resume': [paths['adir'], paths['adir'] / 'missing.pth'],
        'finetune': [paths['adir'] / 'missing.pth'], 'load_features': [paths['notes'], paths['adir'] / 'nope'],
    }
    for dest, values in path_cases.items():
        if dest in dests:
            cases += [(dests[dest], [dests[dest], str(v)]) for v in values]
    if 'output_dir' in dests:
        cases += [('--output_dir', ['--output_dir', str(paths['bad_ckpt'])]),
                  ('--output_dir', ['--output_dir', str(paths['bad_log'])])]
    pos = required_positionals(parser)
    return [(flag, req + argv + pos) for flag, argv in cases]


def run_walk(jobs: Dict[Path, List[Tuple[str, List[str]]]], scratch: Path) -> Dict[str, List[dict]]:
    """Walk every script's cases in one interpreter (``tests/flag_walk.py``); results by script file name."""
    spec = {}
    for script, cases in jobs.items():
        (scratch / script.stem).mkdir(parents=True, exist_ok=True)
        spec[str(script)] = {'cwd': str(scratch / script.stem), 'cases': [argv for _, argv in cases]}
    (scratch / 'cases.json').write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        env.pop(k, None)
    r = subprocess.run([sys.executable, str(REPO / 'tests' / 'flag_walk.py'), str(scratch / 'cases.json')],
                       cwd=scratch, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {Path(k).name: v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}


def problems(flag: str, res: dict) -> List[str]:
    """What is wrong with one walked case (empty: exit 2, one `error:` line naming the flag, nothing else)."""
    bad = []
    lines = [l for l in res['stderr'].splitlines() if l.strip()]
    if res['traceback'] or 'Traceback' in res['stderr']:
        bad.append('traceback: ' + (res['traceback'] or res['stderr'])[-400:])
    if res['rc'] != 2:
        bad.append(f"exit {res['rc']}")
    if len(lines) != 1 or not lines[0].startswith('error:') or flag not in lines[0]:
        bad.append(f'stderr {lines!r}')
    if res['stdout'].strip():
        bad.append(f"stdout {res['stdout'][-200:]!r}")
    if res['written']:
        bad.append(f"wrote {res['written']}")
    return bad


SCRIPTS = scripts()


@pytest.fixture(scope='module')
def walked(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, List[Tuple[str, dict]]]:
    base = tmp_path_factory.mktemp('walk')
    paths = prepare_paths(base / 'paths')
    jobs = {s: walk_cases(s, paths) for s in SCRIPTS}
    results = run_walk(jobs, base / 'scratch')
    return {s.name: list(zip([f for f, _ in cases], results[s.name])) for s, cases in jobs.items()}


def test_every_numeric_flag_has_a_domain() -> None:
    missing = [f'{s.name} {a.option_strings[0]}' for s in SCRIPTS for a in uargs.numeric_actions(parser_of(s))
               if uargs.domain_of(a) is None]
    assert not missing, f'numeric flags declared without a domain: {missing}'


def test_scripts_are_discovered() -> None:
    names = {s.name for s in SCRIPTS}
    assert {'run_pretrain.py', 'run_finetune.py', 'run_linprobe.py', 'run_knn.py'} <= names, names


@pytest.mark.parametrize('script', [s.name for s in SCRIPTS])
def test_defaults_and_demo_defaults_are_in_domain(script: str) -> None:
    s = next(p for p in SCRIPTS if p.name == script)
    parser = parser_of(s)
    args = parser.parse_args(required_argv(parser) + required_positionals(parser))
    assert uargs.domain_errors(args, parser) == []
    mod = importlib.import_module('.'.join(s.relative_to(REPO).with_suffix('').parts))
    actions = {a.dest: a for a in parser._actions}
    for k, v in getattr(mod, 'DEMO_DEFAULTS', {}).items():
        dom = uargs.domain_of(actions[k]) if k in actions else None
        if dom is not None and isinstance(v, (int, float)):
            assert dom.contains(v), (script, k, v)


@pytest.mark.parametrize('script', [s.name for s in SCRIPTS])
def test_every_out_of_domain_value_is_one_line_exit_2_nothing_written(script: str, walked) -> None:
    failures = {' '.join(r['argv']): p for flag, r in walked[script] if (p := problems(flag, r))}
    assert len(walked[script]) >= 3
    assert not failures, json.dumps(failures, indent=1)[:6000]


def test_messages_name_value_and_range(walked) -> None:
    msgs = {' '.join(r['argv']): r['stderr'].strip() for _, r in walked['run_pretrain.py']}
    assert msgs['--lr 0.0'] == 'error: --lr 0.0: must be > 0 and finite'
    assert msgs['--lr nan'] == 'error: --lr nan: must be > 0 and finite'
    assert msgs['--mask_ratio 1.0'] == 'error: --mask_ratio 1.0: must be in (0, 1)'
    assert msgs['--mask_ratio 0.0'] == 'error: --mask_ratio 0.0: must be in (0, 1)'  # would train nothing
    assert msgs['--save_freq 0'] == 'error: --save_freq 0: must be >= 1'
    assert msgs['--seed -1'] == 'error: --seed -1: must be in [0, 2147483647]'
    assert msgs['--epochs 2 --warmup_epochs 3'] == 'error: --warmup_epochs 3: must be in [0, --epochs 2]'
    assert msgs['--embed_dim 64 --num_heads 5'] == 'error: --num_heads 5: must divide --embed_dim 64'
    assert msgs['--stage_weights 0,0,0,0'] == \
        "error: --stage_weights '0,0,0,0': weights must be finite and >= 0, and not all 0"
    assert msgs['--device xyz'] == "error: --device 'xyz': must be cpu, cuda, cuda:N or mps"
    assert msgs['--batch_size abc'] == "error: argument --batch_size: invalid int value: 'abc' (see --help)"
    ft = {' '.join(r['argv']): r['stderr'].strip() for _, r in walked['run_finetune.py']}
    assert ft['--reprob 2.0'] == 'error: --reprob 2.0: must be in [0, 1]'
    assert ft['--aa garbage'].startswith("error: --aa 'garbage': not a timm auto-augment policy")
    assert ft['--mixup_mode bogus'] == "error: --mixup_mode 'bogus': must be one of batch, pair, elem"
    knn = {' '.join(r['argv']): r['stderr'].strip() for _, r in walked['run_knn.py']}
    assert knn['--temperature 0.0'] == 'error: --temperature 0.0: must be > 0 and finite'
    assert knn['--nb_knn 0'] == 'error: --nb_knn 0: must be >= 1'


def test_a_new_numeric_flag_without_domain_is_reported() -> None:
    p = uargs.ArgumentParser()
    p.add_argument('--brand_new_knob', type=float, default=1.0)
    p.add_argument('--declared_knob', type=float, default=1.0, domain=uargs.real(0.0, lo_open=True))
    assert uargs.domain_errors(p.parse_args([]), p) == \
        ['--brand_new_knob: no domain declared with the flag (add_argument(..., domain=...); a bug, please report it)']
    assert uargs.domain_errors(p.parse_args(['--brand_new_knob', '2', '--declared_knob', '-1']), p)[1] == \
        '--declared_knob -1.0: must be > 0 and finite'


def test_run_defining_flags_are_marked_where_declared() -> None:
    """Auto-resume and sweep fingerprints read the ``defines_run`` mark: the adaptive policy's flags count."""
    import run_pretrain
    marked = set(uargs.run_defining(run_pretrain.get_args_parser()))
    assert {'model', 'mask_ratio', 'blr', 'epochs', 't_0', 'freeze_policy', 'freeze_window', 'freeze_threshold',
            'freeze_signal', 'freeze_spacing', 'dont_freeze_pe', 'target', 'stage_weights'} <= marked
    assert not {'output_dir', 'num_workers', 'device', 'log_dir', 'resume', 'knn_eval_freq'} & marked


@pytest.mark.parametrize('script,argv,expected', [
    ('run_pretrain.py', ['--blr', 'nan'], 'error: --blr nan: must be > 0 and finite'),
    ('run_knn.py', ['--temperature', '0'], 'error: --temperature 0.0: must be > 0 and finite'),
])
def test_real_process_one_line(script: str, argv: List[str], expected: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(REPO / script), *argv], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert (r.returncode, r.stderr.strip(), r.stdout) == (2, expected, '')
    assert list(tmp_path.iterdir()) == []


def print_walk_table(tmp: Path) -> None:
    """Markdown rows of the flag-domain walk: every out-of-domain value of every flag of every script, with the
    exact message (used by ``python tests/test_reliability.py --table``)."""
    paths = prepare_paths(tmp / 'walk_paths')
    jobs = {s: walk_cases(s, paths) for s in SCRIPTS}
    results = run_walk(jobs, tmp / 'walk_scratch')
    print('\n| script | flags | exit | message (files written) |\n|---|---|---|---|')
    for s, cases in jobs.items():
        for (flag, argv), r in zip(cases, results[s.name]):
            lines = [l for l in r['stderr'].splitlines() if l.strip()]
            msg = lines[-1] if lines else (r['traceback'] or '').strip().splitlines()[-1:] or ['(nothing)']
            msg = msg if isinstance(msg, str) else msg[0]
            words = ' '.join(argv).replace(str(tmp), '<tmp>')
            verdict = 'none' if not r['written'] and not problems(flag, r) else 'CHECK: ' + '; '.join(problems(flag, r))
            print(f"| {s.relative_to(REPO)} | `{words}` | {r['rc']} | `{msg.replace(str(tmp), '<tmp>')}` ({verdict}) |",
                  flush=True)
