"""The docs/EXPERIMENTS.md runs: freezing policies, LR schedule, a stage-weight curriculum and fine-tuning with and
without FreezeOut on the demo data, several seeds, then one markdown table read from the runs' log.txt.

    python -m bench.experiments                       # all rows, seeds 0 1, into output_dir/experiments (resumable)
    python -m bench.experiments --dry_run             # print the exact commands only
    python -m bench.experiments --table_only          # re-print the table from finished runs
    python -m bench.experiments --rows cubic08,adaptive --seeds 0

Runs are sequential (each alone on the machine: their seconds are the measurement) and skipped when their log.txt
is already complete, so an interrupted set continues where it stopped. A row whose flag this checkout lacks (e.g.
--lr_schedule before it lands) is reported as such, not run.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent

# name -> (script, flags, flag that must exist in the script's --help or None, what the row is)
PRETRAIN_ROWS = {
    # --demo runs FreezeOut (cubic 0.8), so the rows without freezing say --t_0 1 (bit-identical to no FreezeOut)
    'nofreeze': (['--t_0', '1'], None, 'no freezing (plain LocalMIM, cosine)'),
    'cubic08': (['--how_scale', 'cubic', '--t_0', '0.8'], None, 'scheduled FreezeOut, cubic t_0 = 0.8'),
    'cubic07': (['--how_scale', 'cubic', '--t_0', '0.7'], None, 'scheduled FreezeOut, cubic t_0 = 0.7'),
    'adaptive': (['--freeze_policy', 'adaptive'], '--freeze_policy', 'adaptive, defaults (weight signal)'),
    'adaptive_output': (['--freeze_policy', 'adaptive', '--freeze_signal', 'output'], '--freeze_signal',
                        'adaptive, output signal (Egeria-style probe)'),
    'constant': (['--t_0', '1', '--lr_schedule', 'constant'], '--lr_schedule',
                 'no freezing, constant LR after warm-up'),
    'curriculum': (['--t_0', '1', '--stage_weights', 'equal', '--stage_weights_end', '1overk'], '--stage_weights_end',
                   'no freezing, stage weights equal -> 1/4,1/3,1/2,1'),
}
FINETUNE_ROWS = {
    'ft_plain': ([], None, 'fine-tune the nofreeze encoder, no freezing'),
    'ft_cubic08': (['--how_scale', 'cubic', '--t_0', '0.8'], '--t_0', 'fine-tune with FreezeOut cubic t_0 = 0.8'),
    'ft_adaptive': (['--freeze_policy', 'adaptive'], '--freeze_policy', 'fine-tune with adaptive freezing'),
}
ALL_ROWS = list(PRETRAIN_ROWS) + list(FINETUNE_ROWS)
# --tiny: a smoke configuration (seconds per run), for checking the script itself
TINY_PRETRAIN = ['--input_size', '32', '--patch_size', '4', '--embed_dim', '32', '--depth', '4', '--num_heads', '2',
                 '--batch_size', '8', '--epochs', '2', '--warmup_epochs', '1', '--knn_eval_freq', '2',
                 '--vis_freq', '0']
TINY_FINETUNE = ['--batch_size', '8', '--epochs', '2', '--warmup_epochs', '1']


def row_command(row: str, seed: int, out: Path, python: str, data: Optional[str], tiny: bool) -> List[str]:
    d = out / row / f's{seed}'
    if row in PRETRAIN_ROWS:
        flags = PRETRAIN_ROWS[row][0]
        cmd = [python, 'run_pretrain.py', '--demo', '--seed', str(seed), '--output_dir', str(d),
               '--log_dir', str(d / 'tb'), *flags]
        if tiny:
            cmd += TINY_PRETRAIN
    else:
        flags = FINETUNE_ROWS[row][0]
        ckpt = out / 'nofreeze' / f's{seed}' / 'checkpoint-last.pth'
        cmd = [python, 'run_finetune.py', '--demo', '--seed', str(seed), '--finetune', str(ckpt), '--output_dir',
               str(d), *flags]
        if tiny:
            cmd += TINY_FINETUNE
    if data:
        cmd += ['--data_path', data]
    return cmd


def has_flag(script: str, flag: Optional[str], python: str, cache: Dict[str, str]) -> bool:
    if flag is None:
        return True
    if script not in cache:
        cache[script] = subprocess.run([python, script, '--help'], cwd=REPO, capture_output=True, text=True).stdout
    return flag in cache[script]


def records(d: Path) -> List[dict]:
    f = d / 'log.txt'
    if not f.is_file():
        return []
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()]


def _knn_top1(recs: List[dict]) -> Optional[float]:
    for r in reversed(recs):
        ks = sorted(int(k[5:-5]) for k in r if k.startswith('knn_k') and k.endswith('_top1'))
        if ks:
            k = 20 if 20 in ks else ks[0]
            return r[f'knn_k{k}_top1']
    return None


def summarise(row: str, d: Path) -> Dict[str, Optional[float]]:
    """The numbers of one finished run, from its log.txt (and wall.json written by this script)."""
    recs = records(d)
    wall = json.loads((d / 'wall.json').read_text())['seconds'] if (d / 'wall.json').is_file() else None
    out: Dict[str, Optional[float]] = {'wall_s': wall, 'epochs': len(recs)}
    if not recs:
        return out
    last = recs[-1]
    # pre-training logs the loop's compute time; fine-tuning its epoch time (train loop only, no evaluation)
    key = 'train_compute_time' if 'train_compute_time' in last else 'train_epoch_time'
    out['train_s'] = sum(r[key] for r in recs if key in r) if key in last else None
    out['flop_saving'] = last.get('planned_saving_so_far', last.get('decided_saving_so_far'))
    if out['flop_saving'] is None and row in ('nofreeze', 'constant', 'curriculum', 'ft_plain'):
        out['flop_saving'] = 0.0
    out['measured_saving'] = last.get('measured_saving_so_far')
    out['frozen_units'] = last.get('frozen_units', 0)
    if row in PRETRAIN_ROWS:
        out['knn_top1'] = _knn_top1(recs)
    else:
        out['top1_last'] = last.get('test_acc1')
        out['top1_max'] = max(r.get('test_acc1', 0.0) for r in recs)
    return out


def _agg(vals: List[Optional[float]], pct: bool = False, digits: int = 1) -> str:
    v = [x for x in vals if x is not None]
    if not v:
        return '-'
    k = 100.0 if pct else 1.0
    mean = statistics.fmean(v) * k
    if len(v) == 1:
        return f'{mean:.{digits}f}'
    return f'{mean:.{digits}f} ± {statistics.stdev(v) * k:.{digits}f}'


def table(out: Path, rows: List[str], seeds: List[int], missing: Dict[str, str]) -> str:
    lines = ['| row | what | seeds done | k-NN top-1 (k=20) | fine-tune top-1 last / max | train s (compute) | '
             'wall s | FLOP-model saving % | measured saving % | frozen at end |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for row in rows:
        what = (PRETRAIN_ROWS.get(row) or FINETUNE_ROWS[row])[2]
        if row in missing:
            lines.append(f'| {row} | {what} | {missing[row]} | | | | | | | |')
            continue
        s = [summarise(row, out / row / f's{seed}') for seed in seeds]
        done = sum(1 for x in s if x.get('epochs'))
        ft = f"{_agg([x.get('top1_last') for x in s])} / {_agg([x.get('top1_max') for x in s])}" \
            if row in FINETUNE_ROWS else '-'
        lines.append(f"| {row} | {what} | {done}/{len(seeds)} | {_agg([x.get('knn_top1') for x in s])} | {ft} | "
                     f"{_agg([x.get('train_s') for x in s])} | {_agg([x.get('wall_s') for x in s])} | "
                     f"{_agg([x.get('flop_saving') for x in s], pct=True)} | "
                     f"{_agg([x.get('measured_saving') for x in s], pct=True)} | "
                     f"{_agg([x.get('frozen_units') for x in s], digits=1)} |")
    return '\n'.join(lines)


def complete(d: Path, cmd: List[str]) -> bool:
    """A run is done when its log.txt has one record per epoch of its command line."""
    epochs = None
    if '--epochs' in cmd:
        epochs = int(cmd[cmd.index('--epochs') + 1])
    recs = records(d)
    return bool(recs) and (d / 'wall.json').is_file() and (epochs is None or len(recs) >= epochs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='output_dir/experiments', help='root of the runs (default: output_dir/experiments)')
    p.add_argument('--seeds', default=[0, 1], type=int, nargs='+', help='seeds of every row (default: 0 1)')
    p.add_argument('--rows', default=','.join(ALL_ROWS),
                   help=f"comma list of rows, in order (default: all: {','.join(ALL_ROWS)})")
    p.add_argument('--data_path', default=None,
                   help='ImageFolder root with train/ and val/ instead of the demo data (default: --demo data)')
    p.add_argument('--python', default=sys.executable, help='interpreter for the runs (default: this one)')
    p.add_argument('--dry_run', action='store_true', help='print the commands and exit')
    p.add_argument('--table_only', action='store_true', help='print the table of the finished runs and exit')
    p.add_argument('--tiny', action='store_true', help='smoke configuration: 2 epochs of a 4-block 32-wide model')
    args = p.parse_args()
    rows = [r for r in args.rows.split(',') if r]
    bad = [r for r in rows if r not in ALL_ROWS]
    if bad:
        print(f"error: --rows {','.join(bad)}: unknown; choose from {','.join(ALL_ROWS)}", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out).resolve()
    cache: Dict[str, str] = {}
    missing = {}
    for r in rows:
        script, flag = ('run_pretrain.py', PRETRAIN_ROWS[r][1]) if r in PRETRAIN_ROWS else \
            ('run_finetune.py', FINETUNE_ROWS[r][1])
        if not has_flag(script, flag, args.python, cache):
            missing[r] = f'not run: {script} has no {flag} on this checkout'
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    for r in rows:
        for seed in args.seeds:
            cmd = row_command(r, seed, out, args.python, args.data_path, args.tiny)
            d = out / r / f's{seed}'
            if args.dry_run:
                print(('# ' + missing[r] + '\n# ' if r in missing else '') + shlex.join(cmd))
                continue
            if args.table_only or r in missing or complete(d, cmd):
                continue
            d.mkdir(parents=True, exist_ok=True)
            print(f'== {r} seed {seed}: {shlex.join(cmd)}', flush=True)
            t0 = time.time()
            with open(d / 'stdout.txt', 'w') as f:
                rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                print(f'   failed (exit {rc}); see {d / "stdout.txt"}', flush=True)
                continue
            (d / 'wall.json').write_text(json.dumps({'seconds': time.time() - t0, 'command': cmd}))
    if not args.dry_run:
        print(table(out, rows, args.seeds, missing))


if __name__ == '__main__':
    main()
