"""The docs/EXPERIMENTS.md runs: freezing policies, LR schedule, a stage-weight curriculum and fine-tuning with and
without FreezeOut on the demo data, several seeds, then one markdown table read from the runs' log.txt.

    python -m bench.experiments                       # all rows, seeds 0 1, into output_dir/experiments (resumable)
    python -m bench.experiments --dry_run             # print the exact commands only
    python -m bench.experiments --table_only          # re-print the table from finished runs
    python -m bench.experiments --rows cubic08,adaptive --seeds 0
    python -m bench.experiments --rows issue21 --figure docs/img/frontier.png   # a set of rows, + the frontier

Every row is compared with nofreeze and cubic08 seed by seed (paired: same seed = same init, data order and masks),
and the table says whether the difference is larger than the seeds' disagreement.

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
from typing import Dict, List, Optional, Sequence

if __name__ == '__main__' and not __package__:  # run as a file (python bench/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'bench.experiments', *sys.argv[1:]])

from tools import report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# name -> (flags, flag that must exist in the script's --help or None, what the row is). In flags, {nofreeze} is
# the same seed's nofreeze checkpoint (run that row first) and {run} the row's own run folder.
PRETRAIN_ROWS = {
    # --demo runs FreezeOut (cubic 0.8), so the rows without freezing say --t_0 1 (bit-identical to no FreezeOut)
    'nofreeze': (['--t_0', '1'], None, 'no freezing (plain LocalMIM, cosine)'),
    'cubic08': (['--how_scale', 'cubic', '--t_0', '0.8'], None, 'scheduled FreezeOut, cubic t_0 = 0.8'),
    'cubic07': (['--how_scale', 'cubic', '--t_0', '0.7'], None, 'scheduled FreezeOut, cubic t_0 = 0.7'),
    'adaptive': (['--freeze_policy', 'adaptive'], '--freeze_policy', 'adaptive, defaults (coherence signal)'),
    'adaptive_weight': (['--freeze_policy', 'adaptive', '--freeze_signal', 'weight'], '--freeze_signal',
                        'adaptive, weight-change signal (LR-dependent; the default before issue 25)'),
    'adaptive_output': (['--freeze_policy', 'adaptive', '--freeze_signal', 'output'], '--freeze_signal',
                        'adaptive, output signal (Egeria-style probe)'),
    'constant': (['--t_0', '1', '--lr_schedule', 'constant'], '--lr_schedule',
                 'no freezing, constant LR after warm-up'),
    'curriculum': (['--t_0', '1', '--stage_weights', 'equal', '--stage_weights_end', '1overk'], '--stage_weights_end',
                   'no freezing, stage weights equal -> 1/4,1/3,1/2,1'),
    # issue 21: the seed's next ideas
    'stage_pixel': (['--t_0', '1', '--stage_targets', 'hog,hog,pixel,pixel'], '--stage_targets',
                    'no freezing, HOG at stages 0-1, norm-pixels at 2-3'),
    'teacher': (['--t_0', '1', '--stage_targets', 'hog,hog,teacher,teacher', '--teacher', '{nofreeze}',
                 '--teacher_layer', '4'], '--teacher_layer',
                'no freezing, stages 2-3 regress block-4 features of the nofreeze encoder (same seed)'),
    'pixel': (['--t_0', '1', '--target', 'pixel'], '--target', 'no freezing, norm-pixels at every stage (MAE-like)'),
    'self_distill': (['--t_0', '1', '--self_distill', '1'], '--self_distill',
                     'no freezing, + self-distillation from the next deeper tap (weight 1)'),
    'self_distill_ema': (['--t_0', '1', '--self_distill', '1', '--distill_ema', '0.999'], '--distill_ema',
                         'no freezing, + self-distillation from an EMA encoder (0.999)'),
    'self_distill_01': (['--t_0', '1', '--self_distill', '0.1'], '--self_distill',
                        'no freezing, + self-distillation at weight 0.1 (the scale of one HOG stage loss)'),
    'self_distill_ema_01': (['--t_0', '1', '--self_distill', '0.1', '--distill_ema', '0.99'], '--distill_ema',
                            'no freezing, + self-distillation at weight 0.1 from an EMA encoder (0.99)'),
    'taps_all': (['--t_0', '1', '--stage_taps', 'all'], '--stage_taps', 'no freezing, every block a stage'),
    'taps_all_cubic08': (['--how_scale', 'cubic', '--t_0', '0.8', '--stage_taps', 'all'], '--stage_taps',
                         'cubic 0.8, every block a stage'),
    'taps_36': (['--t_0', '1', '--stage_taps', '3,6', '--stage_scales', '2,1'], '--stage_taps',
                'no freezing, two stages (taps 3 and 6 of the demo\'s 6 blocks)'),
    'layerdrop': (['--t_0', '1', '--layer_drop', '0.5'], '--layer_drop', 'progressive layer dropping, theta 0.5'),
    'layerdrop_cubic08': (['--how_scale', 'cubic', '--t_0', '0.8', '--layer_drop', '0.5'], '--layer_drop',
                          'cubic 0.8 + layer dropping of the trained suffix'),
    'grad_norm': (['--freeze_policy', 'grad_norm'], '--grad_percentile',
                  'gradient-signal freezing (AutoFreeze-style), defaults'),
    'mask_curr': (['--t_0', '1', '--mask_curriculum', 'min:max'], '--mask_curriculum',
                  'no freezing, mask difficulty random (1.27) -> hardest blocks (2.31 on the 8x8 grid)'),
    # issue 22: fixed views, the frozen prefix as target and as cache
    'cubic08_fv4': (['--how_scale', 'cubic', '--t_0', '0.8', '--fixed_views', '4'], '--fixed_views',
                    'cubic 0.8, 4 fixed (view, mask) pairs per image'),
    'cubic08_fv4_cache_fp16': (['--how_scale', 'cubic', '--t_0', '0.8', '--fixed_views', '4', '--prefix_cache',
                                '{run}/prefix_cache', '--prefix_cache_dtype', 'float16'], '--prefix_cache_dtype',
                               'cubic08_fv4_cache with fp16 rows (half the disk; close, not equal)'),
    'cubic08_fv4_cache_bf16': (['--how_scale', 'cubic', '--t_0', '0.8', '--fixed_views', '4', '--prefix_cache',
                                '{run}/prefix_cache', '--prefix_cache_dtype', 'bfloat16'], '--prefix_cache_dtype',
                               'cubic08_fv4_cache with bf16 rows (half the disk; close, not equal)'),
    'cubic08_fv4_add': (['--how_scale', 'cubic', '--t_0', '0.8', '--fixed_views', '4', '--prefix_target', 'add'],
                        '--prefix_target', 'cubic08_fv4 + the frozen prefix\'s features as a second target'),
    'cubic08_fv4_replace': (['--how_scale', 'cubic', '--t_0', '0.8', '--fixed_views', '4', '--prefix_target',
                             'replace'], '--prefix_target',
                            'cubic08_fv4, the frozen prefix\'s features replace HOG after a freeze'),
    'cubic08_fv4_cache': (['--how_scale', 'cubic', '--t_0', '0.8', '--fixed_views', '4', '--prefix_cache',
                           '{run}/prefix_cache'], '--prefix_cache',
                          'cubic08_fv4 with the frozen prefix read from a cache (the same numbers)'),
    'cubic08_fv4_add_cache': (['--how_scale', 'cubic', '--t_0', '0.8', '--fixed_views', '4', '--prefix_target', 'add',
                               '--prefix_cache', '{run}/prefix_cache'], '--prefix_cache',
                              'cubic08_fv4_add with the prefix and its full-image features cached'),
}
FINETUNE_ROWS = {
    'ft_plain': ([], None, 'fine-tune the nofreeze encoder, no freezing'),
    'ft_cubic08': (['--how_scale', 'cubic', '--t_0', '0.8'], '--t_0', 'fine-tune with FreezeOut cubic t_0 = 0.8'),
    'ft_adaptive': (['--freeze_policy', 'adaptive'], '--freeze_policy', 'fine-tune with adaptive freezing'),
}
# --rows also takes these names for sets of rows
ROW_SETS = {
    'base': ['nofreeze', 'cubic08', 'cubic07', 'adaptive', 'adaptive_weight', 'adaptive_output', 'constant',
             'curriculum'],
    'issue21': ['nofreeze', 'cubic08', 'stage_pixel', 'pixel', 'teacher', 'self_distill', 'self_distill_ema',
                'self_distill_01', 'self_distill_ema_01', 'taps_all',
                'taps_all_cubic08', 'taps_36', 'layerdrop', 'layerdrop_cubic08', 'grad_norm', 'mask_curr'],
    'issue22': ['nofreeze', 'cubic08', 'cubic08_fv4', 'cubic08_fv4_add', 'cubic08_fv4_replace', 'cubic08_fv4_cache',
                'cubic08_fv4_cache_fp16', 'cubic08_fv4_cache_bf16', 'cubic08_fv4_add_cache'],
    'finetune': list(FINETUNE_ROWS),
}
REFERENCES = ('nofreeze', 'cubic08')  # every row is compared with these, seed by seed
ALL_ROWS = list(PRETRAIN_ROWS) + list(FINETUNE_ROWS)
# --tiny: a smoke configuration (seconds per run), for checking the script itself
TINY_PRETRAIN = ['--input_size', '32', '--patch_size', '4', '--embed_dim', '32', '--depth', '4', '--num_heads', '2',
                 '--batch_size', '8', '--epochs', '2', '--warmup_epochs', '1', '--knn_eval_freq', '2',
                 '--vis_freq', '0']
TINY_FINETUNE = ['--batch_size', '8', '--epochs', '2', '--warmup_epochs', '1']


def row_command(row: str, seed: int, out: Path, python: str, data: Optional[str], tiny: bool,
                device: Optional[str] = None, amp: Optional[str] = None) -> List[str]:
    d = out / row / f's{seed}'
    if row in PRETRAIN_ROWS:
        nofreeze = str(out / 'nofreeze' / f's{seed}' / 'checkpoint-last.pth')
        flags = [f.format(nofreeze=nofreeze, run=str(d)) for f in PRETRAIN_ROWS[row][0]]
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
    cmd += (['--device', device] if device else []) + (['--amp', amp] if amp else [])
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
    freeze = last.get('planned_saving_so_far', last.get('decided_saving_so_far'))
    out['flop_saving'] = report.combined_saving(freeze, last.get('layer_drop_expected_saving'))
    if out['flop_saving'] is None:  # no freezing and no dropping: the full model every step
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


def seeds_done(out: Path, row: str) -> List[int]:
    """Seeds of the row whose run folder holds a log (finished or not: the 'seeds done' column counts finished)."""
    d = out / row
    return sorted(int(p.name[1:]) for p in d.glob('s*') if p.name[1:].isdigit() and (p / 'log.txt').is_file()) \
        if d.is_dir() else []


def paired(out: Path, row: str, ref: str, metric: str = 'knn_top1') -> str:
    """``metric`` of row minus ref, seed by seed over the seeds both finished: 'd0, d1, ... (mean m; verdict)'.
    The verdict is 'identical' when every difference is 0, 'noise' when the seeds disagree by more than the effect
    (max - min of the differences > |mean|), else 'real'; one seed gives no verdict."""
    if row == ref:
        return ''
    diffs = []
    for seed in sorted(set(seeds_done(out, row)) & set(seeds_done(out, ref))):
        a, b = summarise(row, out / row / f's{seed}').get(metric), summarise(ref, out / ref / f's{seed}').get(metric)
        if a is not None and b is not None:
            diffs.append(a - b)
    if not diffs:
        return '-'
    mean = statistics.fmean(diffs)
    body = ', '.join(f'{d:+.0f}' for d in diffs)
    if len(diffs) == 1:
        return f'{body} (1 seed)'
    verdict = 'identical' if max(map(abs, diffs)) == 0 else \
        'noise' if max(diffs) - min(diffs) > abs(mean) else 'real'
    return f'{body} (mean {mean:+.1f}; {verdict})'


def table(out: Path, rows: List[str], seeds: Optional[Sequence[int]], missing: Dict[str, str]) -> str:
    """The markdown table of ``rows``: every finished seed on disk (or only ``seeds``), mean ± sd, and the paired
    k-NN difference to each reference row."""
    refs = [r for r in REFERENCES if r in PRETRAIN_ROWS]
    lines = ['| row | what | seeds done | k-NN top-1 (k=20) | ' + ' | '.join(f'Δ k-NN vs {r} (paired)' for r in refs) +
             ' | fine-tune top-1 last / max | train s (compute) | wall s | FLOP-model saving % | measured saving % | '
             'frozen at end |',
             '|---|---|---|---|' + '---|' * len(refs) + '---|---|---|---|---|---|']
    for row in rows:
        what = (PRETRAIN_ROWS.get(row) or FINETUNE_ROWS[row])[2]
        if row in missing:
            lines.append(f'| {row} | {what} | {missing[row]} |' + ' |' * (len(refs) + 7))
            continue
        row_seeds = list(seeds) if seeds is not None else seeds_done(out, row)
        s = [summarise(row, out / row / f's{seed}') for seed in row_seeds]
        done = sum(1 for x in s if x.get('epochs'))
        ft = f"{_agg([x.get('top1_last') for x in s])} / {_agg([x.get('top1_max') for x in s])}" \
            if row in FINETUNE_ROWS else '-'
        pairs = ' | '.join(paired(out, row, r) if row in PRETRAIN_ROWS else '-' for r in refs)
        lines.append(f"| {row} | {what} | {done}/{len(row_seeds)} | {_agg([x.get('knn_top1') for x in s])} | {pairs} | "
                     f"{ft} | {_agg([x.get('train_s') for x in s])} | {_agg([x.get('wall_s') for x in s])} | "
                     f"{_agg([x.get('flop_saving') for x in s], pct=True)} | "
                     f"{_agg([x.get('measured_saving') for x in s], pct=True)} | "
                     f"{_agg([x.get('frozen_units') for x in s], digits=1)} |")
    return '\n'.join(lines)


def figure(out: Path, rows: List[str], path: Path) -> Optional[str]:
    """The accuracy-vs-saving frontier of the pre-training rows (tools/report.py's figure): every row a point."""
    groups = []
    for row in rows:
        d = out / row
        if row in PRETRAIN_ROWS and seeds_done(out, row):
            groups.append((row, [report.read_run(str(d / f's{seed}'), f's{seed}') for seed in seeds_done(out, row)]))
    return report.write_frontier(report.frontier_rows(groups), str(path), REFERENCES,
                                 title='Demo pre-training: k-NN top-1 vs FLOP saving (mean over seeds, bars = range)')


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
    p.add_argument('--seeds', default=[0, 1], type=int, nargs='+',
                   help='seeds to run for every row (default: 0 1); the table shows every seed finished on disk')
    p.add_argument('--rows', default=','.join(ALL_ROWS),
                   help=f"comma list of rows or row sets ({', '.join(f'{k}: ' + '+'.join(v) for k, v in ROW_SETS.items())}), "
                        f"run in order (default: all: {','.join(ALL_ROWS)})")
    p.add_argument('--data_path', default=None,
                   help='ImageFolder root with train/ and val/ instead of the demo data (default: --demo data)')
    p.add_argument('--python', default=sys.executable, help='interpreter for the runs (default: this one)')
    p.add_argument('--device', default=None, choices=['cpu', 'cuda'],
                   help='--device of every run (default: none: the scripts\' default, cuda with a CPU fallback)')
    p.add_argument('--amp', default=None, choices=['auto', 'bf16', 'fp16', 'none'],
                   help='--amp of every run (CUDA only) (default: none: the scripts\' default, auto)')
    p.add_argument('--dry_run', action='store_true', help='print the commands and exit')
    p.add_argument('--table_only', action='store_true', help='print the table of the finished runs and exit')
    p.add_argument('--tiny', action='store_true', help='smoke configuration: 2 epochs of a 4-block 32-wide model')
    p.add_argument('--figure', default=None, metavar='PNG',
                   help='also write the k-NN vs FLOP-saving frontier of the rows (every row a point, nofreeze and '
                        'cubic08 marked) to this PNG (default: none)')
    args = p.parse_args()
    rows: List[str] = []
    for r in (r for r in args.rows.split(',') if r):
        for x in ROW_SETS.get(r, [r]):
            if x not in rows:
                rows.append(x)
    bad = [r for r in rows if r not in ALL_ROWS]
    if bad:
        print(f"error: --rows {','.join(bad)}: unknown; choose from {','.join(ALL_ROWS)} or a set: "
              f"{','.join(ROW_SETS)}", file=sys.stderr)
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
            cmd = row_command(r, seed, out, args.python, args.data_path, args.tiny, args.device, args.amp)
            d = out / r / f's{seed}'
            if args.dry_run:
                print(('# ' + missing[r] + '\n# ' if r in missing else '') + shlex.join(cmd))
                continue
            if args.table_only or r in missing or complete(d, cmd):
                continue
            needs = out / 'nofreeze' / f's{seed}' / 'checkpoint-last.pth'
            if r in PRETRAIN_ROWS and any('{nofreeze}' in f for f in PRETRAIN_ROWS[r][0]) and not needs.is_file():
                print(f'== {r} seed {seed}: skipped: needs {needs} (run the nofreeze row of this seed first)',
                      flush=True)
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
        print(table(out, rows, None, missing))  # every seed finished on disk, not only this call's
        if args.figure:
            why = figure(out, rows, Path(args.figure))
            print(f'frontier figure: {args.figure}' if why is None else f'frontier figure not written: {why}')


if __name__ == '__main__':
    main()
