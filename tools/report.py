"""Compare pre-training runs: one table and three figures from their log.txt, checkpoint args and evaluations.

    python -m tools.report sweeps/t0                       # a sweep folder (tools/sweep.py --out): report inside it
    python -m tools.report runs/a runs/b runs/c --out cmp   # any run folders

Writes ``report.md`` (and ``report.json``, the same rows) with PNG figures beside it:

* ``loss_per_stage.png``: train loss of every stage (and the total) vs epoch, one line per run;
* ``step_time.png``: seconds per iteration vs epoch (FreezeOut's staircase);
* ``accuracy_vs_compute.png``: every accuracy found (fine-tune, linear probe, k-NN, online k-NN) vs training
  compute, as the FLOP model plans it (full-model epochs: epochs x (1 - planned saving)) and as measured (compute
  seconds), with the Pareto front (no run is both cheaper and more accurate) marked.

A run folder is one that holds a pre-training ``log.txt`` or a ``launch_state.json`` (written by the launcher and the
sweep); its evaluations are the sub-folders holding a ``log.txt`` of run_knn/run_linprobe/run_finetune. Unfinished,
failed and not-started runs are listed, never dropped. Without matplotlib the tables are still written and the
report says which figures are missing.
"""
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __name__ == '__main__' and not __package__:  # run as a file (python tools/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'tools.report', *sys.argv[1:]])

from util.args import ArgumentParser  # noqa: E402
from util.errors import UserError, exit_main  # noqa: E402

STATE_FILE = 'launch_state.json'
EVAL_KINDS = {'run_knn.py': 'knn', 'run_linprobe.py': 'linprobe', 'run_finetune.py': 'finetune'}
# run-location and process plumbing: never a difference between two runs worth a column
NOT_A_FLAG = {'output_dir', 'log_dir', 'resume', 'start_epoch', 'argv', 'rank', 'gpu', 'local_rank', 'dist_url',
              'distributed', 'dist_on_itp', 'dist_backend', 'auto_resume', 'plan_only', 'num_workers', 'pin_mem'}
HEADLINE_K = 20  # DINO reports k = 20


class ReportError(UserError):
    """Bad input: one line, exit status 2."""


# ---- reading ------------------------------------------------------------------------------------------------------

def read_log(path: str) -> List[Dict[str, Any]]:
    """JSON lines of a log.txt; a torn or foreign line is skipped (a killed run may leave half a line)."""
    out, skipped = [], 0
    try:
        with open(path, encoding='utf-8', errors='replace') as f:  # a non-UTF-8 line fails to parse: skipped
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    skipped += bool(line.strip())
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
                else:
                    skipped += 1
    except OSError:
        pass
    if skipped and path not in _noted:  # one line per skipped input (once: a log is read more than once)
        _noted.add(path)
        print(f'note: {path}: skipped {skipped} line(s) that are not JSON records', file=sys.stderr)
    return out


_noted: set = set()


def _num(v: Any) -> Optional[float]:
    """A logged number as float (NaN/inf kept: shown as such), None for a missing, null, string or bool value."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _sum(records: Sequence[Dict[str, Any]], *keys: str) -> Optional[float]:
    """Sum over records of the first number found under ``keys``; None when no record has one."""
    vals = [next((x for x in (_num(r.get(k)) for k in keys) if x is not None), None) for r in records]
    vals = [v for v in vals if v is not None]
    return sum(vals) if vals else None


def read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding='utf-8') as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def checkpoint_args(run_dir: str) -> Dict[str, Any]:
    """``args`` of the newest checkpoint (mmap: the weights are not read), {} if none loads."""
    cands = [os.path.join(run_dir, 'checkpoint-last.pth')]
    numbered = sorted((p for p in Path(run_dir).glob('checkpoint-*.pth') if p.stem.split('-')[-1].isdigit()),
                      key=lambda p: int(p.stem.split('-')[-1]), reverse=True)
    cands += [str(p) for p in numbered]
    for c in cands:
        if not os.path.isfile(c):
            continue
        try:
            import torch
            ck = torch.load(c, map_location='cpu', weights_only=True, mmap=True)
            if isinstance(ck, dict) and isinstance(ck.get('args'), dict):
                return dict(ck['args'])
        except Exception:  # noqa: BLE001 - a foreign or damaged file: try the next one
            continue
    return {}


def is_pretrain_log(records: Sequence[Dict[str, Any]]) -> bool:
    return any('train_loss' in r and 'test_acc1' not in r for r in records)


def epoch_records(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per-epoch records (other records, e.g. a run summary, are read as extra keys); the last one per epoch."""
    by_epoch: Dict[int, Dict[str, Any]] = {}
    for r in records:
        if isinstance(r.get('epoch'), int) and any(k.startswith('train_') for k in r):
            by_epoch[r['epoch']] = r
    return [by_epoch[e] for e in sorted(by_epoch)]


def last_value(records: Sequence[Dict[str, Any]], *keys: str) -> Tuple[Optional[float], Optional[Dict]]:
    """The newest number under any of ``keys`` (first key preferred within a record) and its record."""
    for r in reversed(records):
        for k in keys:
            v = r.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                return float(v), r
    return None, None


def combined_saving(freeze: Optional[float], layer_drop: Optional[float]) -> Optional[float]:
    """FLOP-model saving of a freeze plan and layer dropping together: dropping saves its share of what the freeze
    plan leaves (layer_drop is logged relative to the same run without dropping), so the costs multiply."""
    if freeze is None and layer_drop is None:
        return None
    return 1.0 - (1.0 - (freeze or 0.0)) * (1.0 - (layer_drop or 0.0))


def knn_top1(rec: Dict[str, Any]) -> Optional[Tuple[int, float]]:
    """(k, top-1) for k = 20 if logged, else the smallest k logged."""
    ks = sorted(int(k[5:-5]) for k in rec if k.startswith('knn_k') and k.endswith('_top1') and k[5:-5].isdigit()
                and _num(rec[k]) is not None)  # a null or string value is no result
    if not ks:
        return None
    k = HEADLINE_K if HEADLINE_K in ks else ks[0]
    return k, float(rec[f'knn_k{k}_top1'])


def whole_run_saving(epochs: Sequence[Dict[str, Any]]) -> Optional[float]:
    """Measured saving over all the run's epochs, whichever process (resume) ran them: compute time spent vs the
    step time of the latest epoch with nothing frozen (after the first, whose warm-up is noisy) for the same steps;
    engine_pretrain.saving_so_far's formula, which each process applies to its own epochs only. None without the
    per-epoch timings."""
    base, spent, steps = None, 0.0, 0.0
    for i, r in enumerate(epochs):
        ct, st = _num(r.get('train_compute_time')), _num(r.get('train_step_time'))
        if ct is None or not st or not math.isfinite(ct) or not math.isfinite(st):
            return None
        if not _num(r.get('frozen_units')) and (i > 0 or base is None):
            base = st
        spent += ct
        steps += ct / st  # step_time = compute_time / optimizer steps of the epoch
    return 1.0 - spent / (base * steps) if base and steps else None


def evaluated_this_run(run_dir: str, eval_dir: str) -> bool:
    """False when the evaluation's log predates the run now in ``run_dir`` (``run.json``'s creation by
    util.rundir: the run id the scripts' auto-resume uses), i.e. it evaluated a run since moved aside
    (``--overwrite``); True when either time is unknown."""
    created = _num((read_json(os.path.join(run_dir, 'run.json')) or {}).get('created'))
    try:
        written = os.path.getmtime(os.path.join(eval_dir, 'log.txt'))
    except OSError:
        return True
    return created is None or written >= created


def read_eval(path: str, kind_hint: str) -> Optional[Dict[str, Any]]:
    records = read_log(os.path.join(path, 'log.txt'))
    state = read_json(os.path.join(path, STATE_FILE)) or {}
    kind = EVAL_KINDS.get(state.get('script', ''), None)
    if kind is None:
        kind = next((k for k in ('knn', 'linprobe', 'finetune') if k in kind_hint.lower()), None)
    if kind is None:
        if any(knn_top1(r) for r in records) and not is_pretrain_log(records):
            kind = 'knn'
        elif any('test_acc1' in r for r in records):
            kind = 'eval'
        else:
            return None
    out: Dict[str, Any] = dict(kind=kind, state=state.get('state'), top1=None, best=None, epochs=None)
    if kind == 'knn':
        hits = [knn_top1(r) for r in records if knn_top1(r)]
        if hits:
            out['k'], out['top1'] = hits[-1]
    else:
        recs = [r for r in records if isinstance(r.get('test_acc1'), (int, float))]
        if recs:
            out['top1'] = float(recs[-1]['test_acc1'])
            out['best'] = max(float(r['test_acc1']) for r in recs)
            out['epochs'] = len(recs)
    if not records and state.get('state') is None:
        return None
    return out


def read_run(run_dir: str, name: str, point: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    records = read_log(os.path.join(run_dir, 'log.txt'))
    epochs = epoch_records(records)
    state = read_json(os.path.join(run_dir, STATE_FILE)) or {}
    args = checkpoint_args(run_dir) if os.path.isdir(run_dir) else {}
    planned = args.get('epochs')
    run: Dict[str, Any] = dict(name=name, dir=run_dir, args=args, point=point or {}, epochs_done=len(epochs),
                               epochs_planned=planned, launch_state=state.get('state'),
                               returncode=state.get('returncode'), records=epochs)
    run['train_time_s'] = _sum(epochs, 'train_epoch_time')
    run['compute_time_s'] = _sum(epochs, 'train_compute_time', 'train_epoch_time')
    run['final_loss'] = _num(epochs[-1].get('train_loss')) if epochs else None  # a NaN last epoch shows NaN
    # an adaptive policy decides as it goes: its FLOP-model saving is the decided one
    run['planned_saving'], _ = last_value(records, 'planned_saving', 'planned_saving_so_far', 'decided_saving_so_far')
    run['measured_saving'], _ = last_value(records, 'measured_saving', 'measured_saving_so_far')
    if run['measured_saving'] is not None:  # the run's own figure, over every process that wrote its log
        run['measured_saving'] = whole_run_saving(epochs) if whole_run_saving(epochs) is not None \
            else run['measured_saving']
    run['freezeout'] = bool(args.get('freezeout')) or run['planned_saving'] is not None
    run['layer_drop_saving'], _ = last_value(epochs, 'layer_drop_expected_saving')
    run['flop_saving'] = combined_saving(run['planned_saving'], run['layer_drop_saving'])
    run['frozen_units'], _ = last_value(epochs, 'frozen_units')
    online = [(r['epoch'], knn_top1(r)) for r in epochs if knn_top1(r)]
    run['online_knn'] = dict(epoch=online[-1][0], k=online[-1][1][0], top1=online[-1][1][1]) if online else None
    # training compute in full-model epochs (the FLOP model's price of the freeze plan)
    if epochs:
        run['compute_epochs'] = len(epochs) * (1.0 - (run['flop_saving'] or 0.0))
    else:
        run['compute_epochs'] = None
    evals = {}
    if os.path.isdir(run_dir):
        for sub in sorted(os.listdir(run_dir)):
            p = os.path.join(run_dir, sub)
            if os.path.isdir(p) and sub not in ('tb', 'submitit') and (
                    os.path.isfile(os.path.join(p, 'log.txt')) or os.path.isfile(os.path.join(p, STATE_FILE))):
                ev = read_eval(p, sub)
                if ev is not None and not evaluated_this_run(run_dir, p):
                    print(f'note: {p}: an evaluation of an earlier run in {run_dir} (older than its run.json); '
                          f'not shown', file=sys.stderr)
                    continue
                if ev is not None:  # k in the column: k-NN results with different k are not comparable
                    evals[f'{sub} (k={ev["k"]})' if ev.get('k') is not None else sub] = ev
    run['evals'] = evals
    run['status'] = run_status(run)
    return run


def run_status(run: Dict[str, Any]) -> str:
    st, done, planned = run['launch_state'], run['epochs_done'], run['epochs_planned']
    complete = planned is not None and done >= planned
    if complete and st in (None, 'done', 'running'):
        return 'finished'
    if st == 'failed':
        return f'failed (exit status {run["returncode"]}) after {done} epochs'
    if done == 0 and st is None:
        return 'not started'
    where = f'{done}/{planned if planned is not None else "?"} epochs'
    if st == 'stopped':
        return f'unfinished ({where}, stopped by a signal; re-run to resume)'
    if st == 'running':
        return f'unfinished ({where}; running, or killed)'
    return f'unfinished ({where})'


def is_run_dir(path: str) -> bool:
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        st = read_json(os.path.join(path, STATE_FILE)) or {}
        return st.get('script', 'run_pretrain.py') == 'run_pretrain.py'
    return is_pretrain_log(read_log(os.path.join(path, 'log.txt')))


def discover(dirs: Sequence[str]) -> List[Dict[str, Any]]:
    """Runs of the given folders, in the sweep's order where there is a sweep.json, else by name."""
    runs: List[Dict[str, Any]] = []
    seen = set()
    for d in dirs:
        if not os.path.isdir(d):
            raise ReportError(f'{d}: no such folder; give run folders or a sweep folder (tools/sweep.py --out)')
        found: List[Tuple[str, str, Optional[Dict]]] = []
        sweep = read_json(os.path.join(d, 'sweep.json'))
        if sweep is None and os.path.isfile(os.path.join(d, 'sweep.json')):
            print(f'note: {os.path.join(d, "sweep.json")}: not a JSON object; its folders are listed instead',
                  file=sys.stderr)
        entries = sweep.get('runs') if sweep else None
        if sweep and not isinstance(entries, list):
            print(f'note: {os.path.join(d, "sweep.json")}: no list of runs; its folders are listed instead',
                  file=sys.stderr)
        for r in entries if isinstance(entries, list) else []:
            name = r.get('name') if isinstance(r, dict) else None
            if not isinstance(name, str) or not name or not isinstance(r.get('output_dir', ''), (str, type(None))):
                print(f'note: {os.path.join(d, "sweep.json")}: skipped a malformed run entry {str(r)[:60]!r}',
                      file=sys.stderr)
                continue
            # relative folders are the sweep folder's own; an old absolute one only if this copy lacks the run
            rel = r.get('output_dir') or name
            path = os.path.join(d, rel) if not os.path.isabs(rel) or not os.path.isdir(os.path.join(d, name)) \
                else os.path.join(d, name)
            point = r.get('point') if isinstance(r.get('point'), dict) else None
            found.append((path, name, point))
        if is_run_dir(d):
            found.append((d, os.path.basename(os.path.normpath(d)), None))
        else:
            for sub in sorted(os.listdir(d)):
                p = os.path.join(d, sub)
                if os.path.isdir(p) and is_run_dir(p):
                    found.append((p, sub, None))
        for path, name, point in found:
            key = os.path.realpath(path)
            if key in seen:
                continue
            seen.add(key)
            runs.append(read_run(path, name, point))
    if not runs:
        raise ReportError(f'{", ".join(dirs)}: no pre-training runs found (a run folder holds log.txt from '
                          f'run_pretrain.py or launch_state.json)')
    return runs


# ---- the table ----------------------------------------------------------------------------------------------------

def differing_flags(runs: Sequence[Dict[str, Any]]) -> List[str]:
    if len(runs) < 2:
        return []
    keys: List[str] = []
    for r in runs:  # grid keys first, in grid order
        for k in r['point']:
            if k not in keys:
                keys.append(k)
    for r in runs:
        for k in sorted(r['args']):
            if k not in keys and k not in NOT_A_FLAG:
                keys.append(k)
    out = []
    for k in keys:
        vals = {json.dumps(flag_of(r, k), sort_keys=True) for r in runs if flag_of(r, k) is not None}
        if len(vals) > 1 or (vals and any(flag_of(r, k) is None for r in runs if r['args'])):
            out.append(k)
    return out


def flag_of(run: Dict[str, Any], key: str) -> Any:
    if key in run['args']:
        return run['args'][key]
    return run['point'].get(key)


def fmt_num(v: Optional[float], nd: int) -> str:
    return '–' if v is None else 'NaN' if math.isnan(v) else f'{v:.{nd}f}'


def fmt_pct(v: Optional[float]) -> str:
    return '–' if v is None else f'{100 * v:.1f}%'


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return '–'
    if s < 60:
        return f'{s:.1f} s'
    return time.strftime('%H:%M:%S', time.gmtime(s)) if s < 86400 else f'{s / 3600:.1f} h'


def fmt_flag(v: Any) -> str:
    if v is None:
        return '–'
    if isinstance(v, float):
        return f'{v:g}'
    return str(v)


def eval_columns(runs: Sequence[Dict[str, Any]]) -> List[str]:
    order = {'knn': 0, 'linprobe': 1, 'finetune': 2}
    cols = {sub: ev['kind'] for r in runs for sub, ev in r['evals'].items()}
    return sorted(cols, key=lambda s: (order.get(cols[s], 3), s))


def eval_cell(ev: Optional[Dict[str, Any]]) -> str:
    if ev is None:
        return '–'
    if ev['top1'] is None:
        return f'({ev["state"] or "no result"})'
    cell = f'{ev["top1"]:.2f}'
    if ev.get('best') is not None and ev['best'] != ev['top1']:
        cell += f' (best {ev["best"]:.2f})'
    if ev.get('state') not in (None, 'done'):
        cell += f' [{ev["state"]}]'
    return cell


def table(runs: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[List[str]], List[str], List[str]]:
    flags = differing_flags(runs)
    evs = eval_columns(runs)
    head = ['#', 'run', *flags, 'epochs', 'train time', 'saving measured', 'saving planned', 'final loss',
            f'online k-NN top-1', *[f'{e} top-1' for e in evs], 'status']
    rows = []
    for i, r in enumerate(runs, 1):
        planned = r['epochs_planned']
        ok = r['online_knn']
        rows.append([str(i), r['name'], *[fmt_flag(flag_of(r, k)) for k in flags],
                     f'{r["epochs_done"]}/{planned if planned is not None else "?"}', fmt_time(r['train_time_s']),
                     fmt_pct(r['measured_saving']), fmt_pct(r['planned_saving']), fmt_num(r['final_loss'], 4),
                     '–' if ok is None else f'{ok["top1"]:.2f} (k={ok["k"]}, ep {ok["epoch"]})',
                     *[eval_cell(r['evals'].get(e)) for e in evs], r['status']])
    return head, rows, flags, evs


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[c.replace('|', '\\|') for c in row] for row in [head, *rows]]
    lines = ['| ' + ' | '.join(esc[0]) + ' |', '|' + '|'.join('---' for _ in head) + '|']
    lines += ['| ' + ' | '.join(r) + ' |' for r in esc[1:]]
    return '\n'.join(lines)


# ---- figures ------------------------------------------------------------------------------------------------------

def accuracy_series(runs: Sequence[Dict[str, Any]]) -> Dict[str, List[Tuple[int, Dict[str, Any], float]]]:
    """metric name -> [(run index, run, top-1)] for finished runs; evaluations first, online k-NN last."""
    out: Dict[str, List] = {}
    for col in eval_columns(runs):
        pts = [(i, r, r['evals'][col]['top1']) for i, r in enumerate(runs, 1)
               if col in r['evals'] and r['evals'][col]['top1'] is not None and r['status'] == 'finished']
        if pts:
            out[f'{col} top-1'] = pts
    pts = [(i, r, r['online_knn']['top1']) for i, r in enumerate(runs, 1)
           if r['online_knn'] and r['status'] == 'finished']
    if pts:
        out['online k-NN top-1'] = pts
    return out


def pareto(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point beats on both axes (cost lower-or-equal and accuracy higher)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def write_figures(runs: Sequence[Dict[str, Any]], out_dir: str) -> Tuple[List[str], Optional[str]]:
    """(PNG file names written, reason figures are missing or None)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return [], 'matplotlib is not installed (pip install matplotlib, or -r requirements-dev.txt)'
    written = []
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    markers = ['o', 's', '^', 'D', 'v', 'P', 'X', '*']
    # later runs draw thinner lines on top, so runs with identical curves (e.g. t_0 = 1 in any scaling) stay visible
    style = {r['name']: dict(color=colors[i % len(colors)], linestyle=['-', '--', ':', '-.'][(i // len(colors)) % 4],
                             marker=markers[i % len(markers)], markersize=4,
                             linewidth=max(1.0, 2.8 - 1.6 * i / max(1, len(runs) - 1)))
             for i, r in enumerate(runs)}
    label = {r['name']: f'[{i}] {r["name"]}' for i, r in enumerate(runs, 1)}
    with_data = [r for r in runs if r['records']]

    # 1. loss per stage
    stages = sorted({int(k[len('train_loss_s'):]) for r in with_data for rec in r['records'] for k in rec
                     if k.startswith('train_loss_s') and k[len('train_loss_s'):].isdigit()})
    panels = [('train_loss', 'total (weighted sum)')] + [(f'train_loss_s{s}', f'stage {s}') for s in stages]
    if with_data:
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
        for ax, (key, title) in zip(axes.flat, panels):
            for r in with_data:
                pts = [(rec['epoch'], rec[key]) for rec in r['records'] if isinstance(rec.get(key), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), label=label[r['name']], **style[r['name']])
            ax.set_title(title)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel('epoch')
            ax.set_ylabel('train loss')
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis('off')
        fig.suptitle('Loss per stage vs epoch (a stage stops when the block feeding it freezes)')
        _legend(fig, axes.flat[0])
        _save(fig, os.path.join(out_dir, 'loss_per_stage.png'), written)

        # 2. step time
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for r in with_data:
            pts = [(rec['epoch'], rec['train_step_time']) for rec in r['records']
                   if isinstance(rec.get('train_step_time'), (int, float))]
            if pts:
                ax.step(*zip(*pts), where='mid', label=label[r['name']], **style[r['name']])
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel('seconds per iteration')
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title('Step time per epoch (FreezeOut staircase)')
        _legend(fig, ax)
        _save(fig, os.path.join(out_dir, 'step_time.png'), written)

    # 3. accuracy vs compute, Pareto front
    series = accuracy_series(runs)
    if series:
        xs = [('compute_epochs', 'training compute (full-model epochs, FLOP model)'),
              ('compute_time_s', 'training compute time (s, measured)')]
        fig, axes = plt.subplots(len(series), 2, figsize=(11, 3.8 * len(series)), squeeze=False)
        for row, (metric, pts) in zip(axes, series.items()):
            for ax, (xkey, xlabel) in zip(row, xs):
                data = [(r[xkey], acc, i, r) for i, r, acc in pts if r[xkey] is not None]
                if not data:
                    ax.axis('off')
                    continue
                front = pareto([(x, y) for x, y, _, _ in data])
                tags: Dict[Tuple[float, float], List[int]] = {}
                for j, (x, y, i, r) in enumerate(data):
                    ax.scatter([x], [y], s=70 if j in front else 30, color=style[r['name']]['color'],
                               marker=style[r['name']]['marker'], edgecolors='black' if j in front else 'none',
                               zorder=3)
                    tags.setdefault((x, y), []).append(i)
                for (x, y), ids in tags.items():  # one label per place: runs with equal results share it
                    ax.annotate('[' + ','.join(map(str, ids)) + ']', (x, y), textcoords='offset points',
                                xytext=(5, 4), fontsize=8)
                fx = [data[j][0] for j in front]
                fy = [data[j][1] for j in front]
                ax.step(fx, fy, where='post', color='black', alpha=0.6, linewidth=1, label='Pareto front', zorder=2)
                ax.set_xlabel(xlabel)
                ax.set_ylabel(metric + ' (%)')
                ax.grid(alpha=0.3)
        handles = [plt.Line2D([], [], marker=style[r['name']]['marker'], linestyle='',
                              color=style[r['name']]['color'], label=label[r['name']])
                   for r in runs if any(r is p[1] for s in series.values() for p in s)]
        handles.append(plt.Line2D([], [], marker='o', linestyle='-', color='black', alpha=0.6, markersize=8,
                                  markerfacecolor='none', label='Pareto front (outlined)'))
        fig.suptitle('Accuracy vs training compute (front: no other run is cheaper and more accurate)')
        fig.tight_layout()
        fig.legend(handles=handles, loc='center left', bbox_to_anchor=(1.0, 0.5), fontsize=8)
        _save(fig, os.path.join(out_dir, 'accuracy_vs_compute.png'), written)
    return written, None


def _legend(fig, ax) -> None:
    fig.tight_layout()
    h, l = ax.get_legend_handles_labels()
    if h:  # outside, to the right: bbox_inches='tight' grows the canvas to fit any number of runs
        fig.legend(h, l, loc='center left', bbox_to_anchor=(1.0, 0.5), fontsize=8)


def _save(fig, path: str, written: List[str]) -> None:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)
    written.append(os.path.basename(path))


# ---- the accuracy-vs-saving frontier (one point per row of runs) ---------------------------------------------------

def frontier_rows(groups: Sequence[Tuple[str, Sequence[Dict[str, Any]]]]) -> List[Dict[str, Any]]:
    """One entry per row (a named set of runs, e.g. the seeds of one configuration): the FLOP-model saving and the
    last online k-NN top-1 of each finished run. Rows with no finished run with a k-NN are left out."""
    out = []
    for name, runs in groups:
        fin = [r for r in runs if r['status'] == 'finished' and r['online_knn']]
        if fin:
            out.append(dict(name=name, saving=[100.0 * (r['flop_saving'] or 0.0) for r in fin],
                            top1=[r['online_knn']['top1'] for r in fin], k=fin[0]['online_knn']['k'],
                            seeds=[r['name'] for r in fin]))
    return out


def write_frontier(rows: Sequence[Dict[str, Any]], path: str, marks: Sequence[str] = ('nofreeze', 'cubic08'),
                   title: str = '') -> Optional[str]:
    """k-NN top-1 vs FLOP-model saving: every row a point at its mean over runs, bars spanning its runs' min..max on
    both axes, the rows named in ``marks`` drawn as reference markers, and the front of rows that no other row beats
    on both (more saving and more accuracy). Returns why no figure was written, or None."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return 'matplotlib is not installed (pip install matplotlib, or -r requirements-dev.txt)'
    if not rows:
        return 'no row has a finished run with an online k-NN result'
    mean = [(sum(r['saving']) / len(r['saving']), sum(r['top1']) / len(r['top1'])) for r in rows]
    front = set(pareto([(-x, y) for x, y in mean]))
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    ref_style = [dict(marker='*', color='black', s=220), dict(marker='D', color='tab:red', s=110),
                 dict(marker='P', color='tab:blue', s=140)]
    for j, (r, (x, y)) in enumerate(zip(rows, mean)):
        ax.errorbar([x], [y], xerr=[[x - min(r['saving'])], [max(r['saving']) - x]],
                    yerr=[[y - min(r['top1'])], [max(r['top1']) - y]], fmt='none', ecolor='grey', alpha=0.5,
                    linewidth=1, zorder=1)
        if r['name'] in marks:
            st = ref_style[list(marks).index(r['name']) % len(ref_style)]
            ax.scatter([x], [y], zorder=4, label=f"{r['name']} (reference)", edgecolors='white', **st)
        else:
            ax.scatter([x], [y], s=50, color='tab:green' if j in front else 'tab:grey',
                       edgecolors='black' if j in front else 'none', zorder=3)
    # labels: rows at about the same place (many rows save 0%) get their names stacked instead of overprinted
    span = max(1e-9, max(y for _, y in mean) - min(y for _, y in mean))
    step, placed = span / 28, []
    for j in sorted(range(len(rows)), key=lambda j: -mean[j][1]):
        x, y = mean[j]
        ly = y
        while any(abs(px - x) < 4.5 and abs(py - ly) < step for px, py in placed):
            ly -= step
        placed.append((x, ly))
        ax.annotate(f"{rows[j]['name']} (n={len(rows[j]['top1'])})", (x, y), xytext=(x + 0.35, ly), fontsize=7,
                    va='center', arrowprops=dict(arrowstyle='-', color='grey', lw=0.4) if ly != y else None)
    fr = sorted(front, key=lambda j: mean[j][0])
    ax.plot([mean[j][0] for j in fr], [mean[j][1] for j in fr], color='tab:green', alpha=0.6, linewidth=1,
            label='front (no row saves more and is more accurate)', zorder=2)
    for name in marks:  # horizontal guides: a row above a reference's line is at least as accurate as it
        for r, (x, y) in zip(rows, mean):
            if r['name'] == name:
                ax.axhline(y, color=ref_style[list(marks).index(name) % len(ref_style)]['color'], alpha=0.25,
                           linestyle='--', linewidth=1)
    ax.set_xlabel('training FLOPs saved vs no freezing (FLOP model, %)')
    ax.set_ylabel(f"online k-NN top-1 (k={rows[0]['k']}, %)")
    ax.grid(alpha=0.3)
    ax.set_title(title or 'Accuracy vs FLOP saving: mean over seeds, bars = range over seeds')
    ax.legend(fontsize=8, loc='best')
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)
    return None


def write_frontier_report(dirs: Sequence[str], out_dir: str, marks: Sequence[str]) -> str:
    """--frontier: each DIR is one row (its run folders are the row's runs, e.g. seeds): frontier.png + .md."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ReportError(f'--out {out_dir}: is a file, not a folder; choose another --out')
    groups = [(os.path.basename(os.path.normpath(d)), discover([d])) for d in dirs]
    rows = frontier_rows(groups)
    os.makedirs(out_dir, exist_ok=True)
    missing = write_frontier(rows, os.path.join(out_dir, 'frontier.png'), marks)
    lines = ['# Accuracy vs FLOP saving', '', '| row | runs | FLOP-model saving % (per run) | k-NN top-1 (per run) |',
             '|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['name']} | {len(r['top1'])} | {', '.join(f'{v:.1f}' for v in r['saving'])} | "
                     f"{', '.join(f'{v:.1f}' for v in r['top1'])} |")
    for name, runs in groups:
        if name not in {r['name'] for r in rows}:
            lines.append(f'| {name} | 0 finished with a k-NN | | |')
    lines += ['', '![frontier](frontier.png)' if missing is None else f'Figure not written: {missing}.', '']
    with open(os.path.join(out_dir, 'frontier.md'), 'w') as f:
        f.write('\n'.join(lines))
    if missing:
        print(f'note: figure not written: {missing}', file=sys.stderr)
    print(f'frontier: {os.path.join(out_dir, "frontier.md")} ({len(rows)} rows)')
    return os.path.join(out_dir, 'frontier.md')


# ---- report.md ----------------------------------------------------------------------------------------------------

def write_report(dirs: Sequence[str], out_dir: str, figures: bool = True) -> str:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ReportError(f'--out {out_dir}: is a file, not a folder; choose another --out')
    runs = discover(dirs)
    os.makedirs(out_dir, exist_ok=True)
    head, rows, flags, evs = table(runs)
    written, missing = write_figures(runs, out_dir) if figures else ([], 'figures were not requested (--no_figures)')
    n_fin = sum(r['status'] == 'finished' for r in runs)
    lines = [f'# Study report', '',
             f'{len(runs)} runs from {", ".join(dirs)} ({n_fin} finished); written by tools/report.py on '
             f'{time.strftime("%Y-%m-%d %H:%M")}.', '', md_table(head, rows), '']
    others = [(i, r) for i, r in enumerate(runs, 1) if r['status'] != 'finished']
    if others:
        lines += ['## Unfinished, failed or not started', '']
        lines += [f'- [{i}] {r["name"]}: {r["status"]} ({r["dir"]})' for i, r in others]
        lines.append('')
    lines += ['## Figures', '']
    names = {'loss_per_stage.png': 'Loss per stage vs epoch', 'step_time.png': 'Step time per epoch',
             'accuracy_vs_compute.png': 'Accuracy vs training compute, Pareto front'}
    for f in written:
        lines += [f'![{names.get(f, f)}]({f})', '']
    if missing:
        lines += [f'Figures not written: {missing}.', '']
    elif 'accuracy_vs_compute.png' not in written:
        lines += ['No accuracy vs compute figure: no finished run has an accuracy (online k-NN or an evaluation).', '']
    lines += ['## Columns', '',
              '- flags: those whose value differs between the runs (checkpoint args; the grid point otherwise).',
              '- epochs: done / planned. train time: sum of the logged epochs\' wall time (without online k-NN).',
              '- saving measured: compute time actually spent vs the step time of the last epoch with nothing '
              'frozen, for the same steps (over all the run\'s epochs, across resumes); planned: the FLOP model of the '
              'freeze plan over the epochs done. – = no FreezeOut.',
              '- final loss: the last epoch\'s mean train loss. online k-NN: the last during pre-training (k=20 '
              'if logged). Evaluations: top-1 of the last epoch (best epoch in brackets when different); k-NN: '
              f'k={HEADLINE_K} if evaluated.',
              '- accuracy vs compute: full-model epochs = epochs x (1 - planned saving); measured = sum of compute '
              'time (data loading excluded).', '']
    with open(os.path.join(out_dir, 'report.md'), 'w') as f:
        f.write('\n'.join(lines))
    slim = [{k: v for k, v in r.items() if k != 'records'} for r in runs]
    with open(os.path.join(out_dir, 'report.json'), 'w') as f:
        json.dump(dict(columns=head, rows=rows, runs=slim, figures=written, figures_missing=missing), f, indent=1,
                  default=str)
    if missing and figures:
        print(f'note: figures not written: {missing}', file=sys.stderr)
    print(f'report: {os.path.join(out_dir, "report.md")} ({len(runs)} runs, {len(written)} figures)')
    return os.path.join(out_dir, 'report.md')


def main(argv: Sequence[str]) -> int:
    p = ArgumentParser('Comparison report of pre-training runs (table + figures)', allow_abbrev=False)
    p.add_argument('dirs', nargs='+', metavar='DIR', help='run folders, or sweep folders holding run folders')
    p.add_argument('--out', default=None,
                   help='where report.md and the PNGs go (default: DIR when one folder is given)')
    p.add_argument('--no_figures', action='store_true', help='tables only (default: figures too)')
    p.add_argument('--frontier', action='store_true',
                   help='instead of the report: each DIR is one row (its run folders are the row\'s seeds, as in '
                        'bench/experiments.py\'s OUT/ROW/sS); write frontier.png (online k-NN top-1 vs FLOP-model '
                        'saving, mean and range over seeds) and frontier.md (default: off)')
    p.add_argument('--mark', default='nofreeze,cubic08',
                   help='with --frontier: comma list of row names drawn as references (default: nofreeze,cubic08)')

    def _error(message: str) -> None:
        raise ReportError(message)
    p.error = _error
    args = p.parse_args(list(argv))
    if args.out is None:
        if len(args.dirs) != 1:
            raise ReportError(f'{len(args.dirs)} folders given: pass --out DIR for the report')
        args.out = args.dirs[0]
    if args.frontier:
        write_frontier_report(args.dirs, args.out, [m for m in args.mark.split(',') if m])
        return 0
    write_report(args.dirs, args.out, figures=not args.no_figures)
    return 0


if __name__ == '__main__':
    exit_main(main, sys.argv[1:])
