"""Expand a grid of flag values into runs, run (or print, or submit) them, and chain evaluations on each.

    python -m tools.sweep --grid t_0=0.7,0.8,0.9 --grid how_scale=cubic,linear --then knn --then linprobe \\
        --out sweeps/t0 --run local -- run_pretrain.py --demo --epochs 10
    python -m tools.sweep ... --run print -- CUDA_VISIBLE_DEVICES=0,1 python3 -m torch.distributed.launch \\
        --nproc_per_node=2 run_pretrain.py --epochs 100 --batch_size 256 ...        # record.sh lines only
    python -m tools.sweep ... --run slurm --nodes 1 --ngpus 8 --partition gpu -- run_pretrain.py ...

Everything after ``--`` is the common command: optional ``NAME=value`` environment words and launcher words (as
record.sh takes them), one of the four scripts, and its flags. Each grid point adds ``--key value`` (a switch such
as ``all_stages`` takes on/off) and runs in ``<out>/<key>-<value>_<key>-<value>...`` with its TensorBoard events in
``tb/``; ``--then knn|linprobe|finetune`` evaluates the run's ``checkpoint-last.pth`` into ``<run>/<evaluation>``.

Each step records what it ran and how it ended in ``<its output folder>/launch_state.json``. Re-running the same
sweep skips the steps recorded as done with the same command and re-runs the others, which resume from their
newest checkpoint (auto-resume). A bad grid or flag fails before anything starts, in one line.
"""
import argparse
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __name__ == '__main__' and not __package__:  # run as a file (python tools/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'tools.sweep', *sys.argv[1:]])

from tools import submitit_launch as sl  # noqa: E402
from tools.submitit_launch import LaunchError  # noqa: E402
from util.args import ArgumentParser, domain_errors  # noqa: E402
from util.errors import exit_main  # noqa: E402

EVALS = {'knn': 'run_knn.py', 'linprobe': 'run_linprobe.py', 'finetune': 'run_finetune.py'}
SWITCH_ON, SWITCH_OFF = ('on', 'true', 'yes', '1'), ('off', 'false', 'no', '0')
OWNED = ('output_dir', 'resume', 'no_auto_resume')  # the sweep decides these per run
ENV_WORD = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*=')


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser('Grid sweep of run_pretrain.py (or another script) with chained evaluations',
                                allow_abbrev=False,
                                usage='%(prog)s --grid KEY=V1,V2 [...] --out DIR [--then EVAL] [--run MODE] -- '
                                      '[NAME=value ...] [launcher words] SCRIPT [common flags]')
    p.add_argument('--grid', action='append', default=[], metavar='KEY=V1,V2,...',
                   help='a flag of the script and its values; repeat for more axes; the runs are the cartesian '
                        'product (a switch flag takes on/off). Values are split on "|" when the spec holds one, '
                        'else on ",": a comma-list value is written stage_weights=1,1,1,1|4,3,2,1. Two spellings of '
                        'one value (0.8,0.80; on,1) are refused (default: none = one run of the common flags)')
    p.add_argument('--out', required=True, help='sweep folder: one sub-folder per run, plus sweep.json')
    p.add_argument('--then', action='append', default=[], metavar='EVAL',
                   help='evaluate each run\'s checkpoint-last.pth after it: knn, linprobe or finetune (repeatable, '
                        'or a comma list), into <run>/<EVAL> (default: none)')
    for name in EVALS:
        p.add_argument(f'--{name}_args', default='', metavar='"FLAGS"',
                       help=f'extra flags for every {EVALS[name]} of --then {name}, one shell-quoted string; '
                            f'--demo, --device and a --data_path holding val/ are inherited (default: none)')
    p.add_argument('--device', default=None, choices=['cpu', 'cuda'],
                   help='device of every step (pre-training and each --then evaluation): appended as --device to '
                        'each; refused when the common flags or an --EVAL_args set it too (default: none: each '
                        'script\'s own default, cuda with a CPU fallback)')
    p.add_argument('--amp', default=None, choices=['auto', 'bf16', 'fp16', 'none'],
                   help='mixed precision of every step, appended as --amp to each (CUDA only; on CPU the scripts run '
                        'fp32 whatever it says); refused when the common flags or an --EVAL_args set it too '
                        '(default: none: each script\'s own default, auto)')
    p.add_argument('--run', default='print', choices=['print', 'local', 'slurm'],
                   help='print the record.sh command lines; run them here one after another; or submit one job per '
                        'run through tools/submitit_launch.py (the SLURM flags below) (default: print)')
    sl.add_executor_args(p)
    return p


# ---- building the runs --------------------------------------------------------------------------------------------

def split_command(words: Sequence[str]) -> Tuple[List[str], List[str], str, List[str]]:
    """[NAME=value ...] [launcher words] SCRIPT [flags] -> (env words, launcher words, script, flags)."""
    words = list(words)
    i = 0
    while i < len(words) and ENV_WORD.match(words[i]):
        i += 1
    env = words[:i]
    for j in range(i, len(words)):
        if os.path.basename(words[j]) in sl.SCRIPTS:
            return env, words[i:j], words[j], words[j + 1:]
    raise LaunchError(f'no script after --: give one of {", ".join(sl.SCRIPTS)} and its common flags, e.g. '
                      f'-- run_pretrain.py --demo')


def _action(parser: argparse.ArgumentParser, key: str) -> Optional[argparse.Action]:
    for a in parser._actions:
        if f'--{key}' in a.option_strings:
            return a
    return None


def parse_grid(specs: Sequence[str], script: str, common: Sequence[str]) -> List[Tuple[str, List[str], bool]]:
    """['t_0=0.7,0.8', ...] -> [(key, values, is_switch)], checked against the script's parser."""
    parser = sl.script_parser(script)
    common_keys = {a[2:].split('=', 1)[0] for a in common if a.startswith('--')}
    axes, seen = [], set()
    for spec in specs:
        key, eq, vals = spec.partition('=')
        key = key.strip().lstrip('-')
        if not eq or not key:
            raise LaunchError(f'--grid {spec}: expected KEY=V1,V2,... (e.g. --grid t_0=0.7,0.8)')
        sep = '|' if '|' in vals else ','  # '|' keeps a comma-list value whole: stage_weights=1,1,1,1|4,3,2,1
        values = [v.strip() for v in vals.split(sep)]
        if not vals.strip() or any(v == '' for v in values):
            raise LaunchError(f'--grid {spec}: empty value; give {"|" if sep == "|" else "comma"}-separated values, '
                              f'e.g. {key}=A{sep}B')
        action = _action(parser, key)
        if action is None:
            raise LaunchError(f'--grid {spec}: {os.path.basename(script)} has no flag --{key} (see '
                              f'{os.path.basename(script)} --help)')
        if key in OWNED:
            raise LaunchError(f'--grid {spec}: --{key} is set by the sweep for every run')
        if key in seen:
            raise LaunchError(f'--grid {spec}: --{key} is given twice; put all its values in one --grid')
        if key in common_keys:
            raise LaunchError(f'--grid {spec}: --{key} is also among the common flags after --; keep one')
        switch = action.nargs == 0
        if switch:
            bad = [v for v in values if v.lower() not in SWITCH_ON + SWITCH_OFF]
            if bad:
                raise LaunchError(f'--grid {spec}: --{key} is a switch; its values are on/off, not {bad[0]!r}')
        seen_values: Dict[Any, str] = {}
        for v in values:
            norm = _normalised(action, v, switch)
            if norm in seen_values:
                hint = '' if sep == '|' or switch or action.type not in (None, str) else \
                    f' (for a comma-list value separate the values with |, e.g. {key}=1,1,1,1|4,3,2,1)'
                raise LaunchError(f'--grid {spec}: {seen_values[norm]!r} and {v!r} are the same value of --{key}; '
                                  f'keep one{hint}')
            seen_values[norm] = v
        seen.add(key)
        axes.append((key, values, switch))
    return axes


def _normalised(action: argparse.Action, value: str, switch: bool) -> Any:
    """The value the script will see (``0.80`` -> 0.8, ``ON`` -> True), to find two spellings of one point; a value
    its type refuses stays a string (the point's own check names it)."""
    if switch:
        return value.lower() in SWITCH_ON
    if callable(action.type):
        try:
            return action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            pass
    return value


def _slug(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9.+-]+', '_', text).strip('_') or '_'


def run_name(point: Sequence[Tuple[str, str]]) -> str:
    return '_'.join(f'{k}-{_slug(v)}' for k, v in point) or 'run'


def point_flags(point: Sequence[Tuple[str, str, bool]]) -> List[str]:
    out: List[str] = []
    for key, value, switch in point:
        if switch:
            out += [f'--{key}'] if value.lower() in SWITCH_ON else []
        else:
            out += [f'--{key}', value]
    return out


def eval_data_flags(common: Sequence[str], extra: Sequence[str], cwd: str) -> List[str]:
    """What an evaluation inherits from the pre-training command: --demo, --device, and a data root with val/."""
    out = []
    if '--demo' in common:
        out.append('--demo')
    device = sl.flag_value(common, '--device')
    if device and sl.flag_value(extra, '--device') is None:
        out += ['--device', device]
    if sl.flag_value(extra, '--data_path') is None:
        for flag in ('--knn_data_path', '--data_path'):
            root = sl.flag_value(common, flag)
            if root and os.path.isdir(os.path.join(cwd, root, 'val')):
                out += ['--data_path', root]
                break
    return out


def build_runs(opts: argparse.Namespace, command: Sequence[str], cwd: str) -> Dict[str, Any]:
    """All runs and their steps; every script flag list is checked by its parser (raises LaunchError)."""
    env, launcher, script, common = split_command(command)
    for key in OWNED:
        if f'--{key}' in common or any(a.startswith(f'--{key}=') for a in common):
            raise LaunchError(f'--{key} in the common flags: the sweep sets it for every run (drop it; runs go to '
                              f'--out {opts.out})')
    # --device / --amp of the sweep: one value for every step, never two spellings of it in one command
    every: List[str] = []
    for flag in ('device', 'amp'):
        value = getattr(opts, flag, None)
        if value is None:
            continue
        if sl.flag_value(common, f'--{flag}') is not None:
            raise LaunchError(f'--{flag} {value} and --{flag} {sl.flag_value(common, "--" + flag)} in the common '
                              f'flags: give it once (the sweep\'s --{flag} applies to every step)')
        for t in EVALS:
            if sl.flag_value(shlex.split(getattr(opts, f'{t}_args')), f'--{flag}') is not None:
                raise LaunchError(f'--{flag} {value} and --{flag} in --{t}_args: give it once (the sweep\'s '
                                  f'--{flag} applies to every step)')
        every += [f'--{flag}', value]
    common = [*common, *every]
    thens = [t.strip() for spec in opts.then for t in spec.split(',') if t.strip()]
    for t in thens:
        if t not in EVALS:
            raise LaunchError(f'--then {t}: expected one of {", ".join(EVALS)}')
        if os.path.basename(script) != 'run_pretrain.py':
            raise LaunchError(f'--then {t}: evaluations chain on pre-training runs; the script is '
                              f'{os.path.basename(script)}')
    axes = parse_grid(opts.grid, script, common)
    out = os.path.abspath(opts.out)
    runs, names = [], {}
    for combo in itertools.product(*[[(k, v, s) for v in vals] for k, vals, s in axes]):
        name = run_name([(k, v) for k, v, _ in combo])
        if name in names:
            raise LaunchError(f'--grid: points {names[name]} and {dict((k, v) for k, v, _ in combo)} both name the '
                              f'folder {name}; make the values differ in letters/digits')
        names[name] = dict((k, v) for k, v, _ in combo)
        run_dir = os.path.join(out, name)
        argv = [*common, *point_flags(combo), '--output_dir', run_dir, '--log_dir', os.path.join(run_dir, 'tb')]
        argv = sl.without_flags(argv[:-2], with_value=('--log_dir',)) + argv[-2:]  # the per-run --log_dir wins
        try:
            sl.parse_script_argv(script, argv)
        except LaunchError as e:
            raise LaunchError(f'--grid point {name}: {e}') from None
        steps = [dict(script=str(sl.script_path(script)), argv=argv, output_dir=run_dir)]
        for t in thens:
            extra = shlex.split(getattr(opts, f'{t}_args')) + (['--amp', opts.amp] if opts.amp else [])
            eargv = [*eval_data_flags(common, extra, cwd), *extra, '--finetune',
                     os.path.join(run_dir, 'checkpoint-last.pth'), '--output_dir', os.path.join(run_dir, t)]
            try:  # its checkpoint is written by the step before: every other rule is checked now
                ns = sl.parse_script_argv(EVALS[t], eargv, inputs=False)
            except LaunchError as e:
                raise LaunchError(f'--then {t} (--{t}_args): {e}') from None
            if not ns.demo and sl.flag_value(eargv, '--data_path') is None:
                raise LaunchError(f'--then {t}: no data for the evaluation: pass --{t}_args "--data_path ROOT" '
                                  f'(ROOT holding train/ and val/)')
            steps.append(dict(script=str(sl.script_path(EVALS[t])), argv=eargv, output_dir=os.path.join(run_dir, t)))
        runs.append(dict(name=name, point=names[name], output_dir=run_dir, steps=steps))
    return dict(out=out, env=env, launcher=launcher, script=script, common=list(common), then=thens,
                grid={k: v for k, v, _ in axes}, runs=runs)


# ---- running ------------------------------------------------------------------------------------------------------

def record_line(sweep: Dict[str, Any], step: Dict[str, Any], cwd: str) -> List[str]:
    """``bash record.sh [env] [launcher] SCRIPT ARGV`` as words; evaluations run as single processes."""
    record = 'record.sh' if os.path.isfile(os.path.join(cwd, 'record.sh')) else str(sl.REPO_ROOT / 'record.sh')
    name = os.path.basename(step['script'])
    typed = sweep['script'] if name == os.path.basename(sweep['script']) else name
    script = typed if os.path.isfile(os.path.join(cwd, typed)) else step['script']
    is_pretrain = name == os.path.basename(sweep['script'])
    launcher = sweep['launcher'] if (is_pretrain and sweep['launcher']) else [sys.executable]
    return ['bash', record, *sweep['env'], *launcher, script, *step['argv']]


def run_print(sweep: Dict[str, Any], cwd: str) -> int:
    for run in sweep['runs']:
        print(f'# {run["name"]}: {json.dumps(run["point"])}')
        for step in run['steps']:
            line = shlex.join(record_line(sweep, step, cwd))
            print(f'# finished (skipped on re-run): {line}' if sl.step_finished(step) else line)
    return 0


def _call(words: List[str], cwd: str) -> int:
    """Run a record.sh line in its own process group; SIGINT/SIGTERM to the sweep reach the run as SIGINT.

    SIGINT, not SIGTERM: record.sh and its tee ignore SIGINT and keep logging while the script stops at an
    iteration boundary and exits 130, so nothing is left running or half-written when the sweep is stopped.
    """
    proc = subprocess.Popen(words, cwd=cwd, start_new_session=True)

    def forward(signum, frame) -> None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                return proc.wait()
            except InterruptedError:
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_local(sweep: Dict[str, Any], cwd: str) -> int:
    failed = []
    for run in sweep['runs']:
        ran = False  # once a step runs again, the evaluations after it must too (its checkpoint changed)
        for step in run['steps']:
            name = os.path.basename(step['script'])
            if not ran and sl.step_finished(step):
                print(f'[sweep] {run["name"]}: {name} finished before, skipped', flush=True)
                continue
            words = record_line(sweep, step, cwd)
            print(f'[sweep] {run["name"]}: {shlex.join(words)}', flush=True)
            sl.write_state(step['output_dir'], script=name, argv=list(step['argv']), state='running',
                           returncode=None, started=sl.now(), job_id=None)
            rc = _call(words, cwd)
            ran = True
            state = 'done' if rc == 0 else ('stopped' if rc in sl.INTERRUPTED_CODES else 'failed')
            sl.write_state(step['output_dir'], state=state, returncode=rc, ended=sl.now())
            if rc in sl.INTERRUPTED_CODES:
                print(f'[sweep] stopped by a signal in {run["name"]} ({name}); re-run the same sweep command to '
                      f'resume', file=sys.stderr, flush=True)
                return rc
            if rc != 0:
                failed.append(f'{run["name"]} ({name}, exit status {rc})')
                break  # its evaluations need its checkpoint
    if failed:
        print(f'[sweep] failed: {"; ".join(failed)}; fix and re-run the same command (finished steps are skipped)',
              file=sys.stderr, flush=True)
        return 1
    print(f'[sweep] all {len(sweep["runs"])} runs finished; report: python -m tools.report {sweep["out"]}',
          flush=True)
    return 0


def run_slurm(sweep: Dict[str, Any], opts: argparse.Namespace, cwd: str) -> int:
    sl.import_submitit()
    if sweep['launcher']:
        print(f'note: launcher words {shlex.join(sweep["launcher"])} are not used with --run slurm: every job runs '
              f'--nodes x --ngpus processes (submitit tasks)', flush=True)
    status = 0
    for run in sweep['runs']:
        if all(sl.step_finished(s) for s in run['steps']):
            print(f'[sweep] {run["name"]}: finished before, not submitted', flush=True)
            continue
        job = sl.submit(opts, run['steps'], os.path.join(run['output_dir'], 'submitit'),
                        opts.job_name or f'sweep_{run["name"]}'[:100], cwd)
        if opts.cluster == 'local' or opts.wait:  # local jobs run one at a time, like --run local
            status = max(status, sl.wait_for(job))
    return status


def _changed_run_flags(script: str, old_argv: Sequence[str], new_argv: Sequence[str]) -> List[str]:
    """``--flag OLD -> NEW`` for each run-defining flag (util.args.run_defining: what auto-resume warns about) that
    differs between two command lines of ``script``; an old command line its parser no longer reads counts as
    changed."""
    from util.args import run_defining
    try:
        old = sl.parse_script_argv(script, old_argv, check=False)
    except LaunchError:
        return ['(its recorded command line no longer parses)']
    new = sl.parse_script_argv(script, new_argv, check=False)
    dests = sorted(set(run_defining(old._parser)) | set(run_defining(new._parser)))  # plugin flags included
    return [f'--{d} {getattr(old, d, None)!r} -> {getattr(new, d, None)!r}'
            for d in dests if getattr(old, d, None) != getattr(new, d, None)]


def check_run_folders(sweep: Dict[str, Any]) -> None:
    """Before anything is written: no step's folder is in use by a live run, and no run folder holds a run with other
    run-defining flags, which auto-resume would continue with a changed schedule. With ``--overwrite`` among the
    common flags such a run (its checkpoints, log.txt, run.json, evaluations and launch states) is moved into
    ``<run>/previous-<time>/``; without it the sweep is refused in one line."""
    from util import rundir
    overwrite = '--overwrite' in sweep['common']
    for run in sweep['runs']:
        for step in run['steps']:
            sl.check_not_in_use(step['output_dir'])
        first = run['steps'][0]
        st = sl.read_state(first['output_dir'])
        has_run = bool(rundir.checkpoint_files(first['output_dir'])) or \
            os.path.isfile(os.path.join(first['output_dir'], 'log.txt'))
        if not st or not has_run or st.get('argv') == first['argv']:
            continue
        changed = _changed_run_flags(sweep['script'], st.get('argv') or [], first['argv'])
        if not changed:
            continue  # the same run (other flags only): auto-resume continues it
        if not overwrite:
            raise LaunchError(f'{first["output_dir"]} holds a run with other run-defining flags '
                              f'({"; ".join(changed)}); continuing it would mix two runs: pass --overwrite after '
                              f'-- to move it aside, or choose another --out')
        dest = rundir.move_aside(first['output_dir'])
        for step in run['steps'][1:]:
            if os.path.isdir(step['output_dir']):
                os.replace(step['output_dir'], os.path.join(dest, os.path.basename(step['output_dir'])))
        os.replace(os.path.join(first['output_dir'], sl.STATE_FILE), os.path.join(dest, sl.STATE_FILE))
        print(f'[sweep] {run["name"]}: --overwrite: the previous run ({"; ".join(changed)}) moved into {dest}',
              flush=True)


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    cut = argv.index('--') if '--' in argv else len(argv)
    parser = get_args_parser()

    def _error(message: str) -> None:
        raise LaunchError(message)
    parser.error = _error
    opts = parser.parse_args(argv[:cut])
    errors = domain_errors(opts, parser, argv[:cut])  # the launcher flags' domains, before anything starts
    if errors:
        raise LaunchError(errors[0])
    if cut == len(argv):
        raise LaunchError('missing "--" before the command, e.g. ... --out DIR -- run_pretrain.py --demo')
    cwd = os.getcwd()
    sweep = build_runs(opts, argv[cut + 1:], cwd)
    if opts.run == 'print':
        return run_print(sweep, cwd)
    check_run_folders(sweep)
    os.makedirs(sweep['out'], exist_ok=True)
    with open(os.path.join(sweep['out'], 'sweep.json'), 'w') as f:
        json.dump(dict(command=argv, cwd=cwd, **{k: sweep[k] for k in ('grid', 'then', 'script', 'common')},
                       # relative: a copied or moved sweep folder reports its own runs, not the original's
                       runs=[dict(name=r['name'], point=r['point'],
                                  output_dir=os.path.relpath(r['output_dir'], sweep['out'])) for r in sweep['runs']]),
                  f, indent=1)
    if opts.run == 'local':
        return run_local(sweep, cwd)
    return run_slurm(sweep, opts, cwd)


if __name__ == '__main__':
    exit_main(main, sys.argv[1:])
