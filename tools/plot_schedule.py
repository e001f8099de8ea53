"""Plot the schedule a given pre-training run trains: every FreezeOut unit's LR over training with its freeze point
(the figure for papers), and the per-unit freeze steps as JSON beside it.

    python -m tools.plot_schedule --out schedule.png -- --data_path /path/to/imagenet --batch_size 256 \
        --accum_iter 4 --epochs 400 --warmup_epochs 40 --how_scale cubic --t_0 0.8 [--nproc 8]
    python -m tools.plot_schedule --out schedule.png --run OUTPUT_DIR      # the run in OUTPUT_DIR, as it was started

Everything after ``--`` is ``run_pretrain.py``'s own command line (the same parser, defaults, ``--demo`` and freeze
policy, plugins included); ``--nproc`` is the number of training processes (default 1). The plan is built by the
same code as ``run_pretrain.py --plan_only`` (``run_pretrain.plan``: the real loader length, accumulation, world
size, ``freezeout.build_freezer``), so ``OUT.json``'s freeze steps are the ones that run freezes at. A policy that
decides while training (adaptive) has no plan to draw: refused in one line. Top panel: LR per unit until it
freezes (x = frozen); bottom panel: number of frozen units. matplotlib (requirements-dev.txt) with Agg.
"""
import argparse
import json
import os
import sys
from typing import List, Optional

if __name__ == '__main__' and not __package__:  # run as a file (python tools/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'tools.plot_schedule', *sys.argv[1:]])

from util.args import ArgumentParser, integer  # noqa: E402
from util.errors import UserError, exit_main  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False)
    p.add_argument('--out', required=True, help='PNG to write; the freeze steps go to the same path with .json')
    p.add_argument('--run', default=None, metavar='OUTPUT_DIR',
                   help="draw the run in OUTPUT_DIR: its command line and process count from its newest checkpoint "
                        "(default: the run_pretrain.py flags after --)")
    p.add_argument('--nproc', default=1, type=int, domain=integer(1),
                   help='training processes (GPUs) the plan is for: the loader is sharded over them (default: 1)')
    p.add_argument('--points', default=600, type=int, domain=integer(2), help='samples per curve (default: 600)')
    p.add_argument('--title', default=None, help='figure title (default: the policy and its flags)')
    return p


def saved_command(run_dir: str):
    """(argv, world size) of the run in ``run_dir``, from its newest loadable checkpoint's saved args."""
    from util.checkpoint import find_resumable
    found = find_resumable(run_dir) if os.path.isdir(run_dir) else None
    if not found:
        raise UserError(f'--run {run_dir}: no loadable checkpoint-*.pth there')
    saved = found[1].get('args') or {}
    if not isinstance(saved.get('argv'), list):
        raise UserError(f'--run {run_dir}: {found[0]} does not record its command line; pass its flags after --')
    return [str(a) for a in saved['argv']], int(saved.get('world_size') or 1)


def build_plan(pretrain_argv: List[str], nproc: int = 1):
    """``(args, freezer or None, schedule, steps_per_epoch)`` for run_pretrain.py's command line on ``nproc``
    processes: the plan ``--plan_only`` prints."""
    import run_pretrain
    from util.args import parse_script_args
    args = parse_script_args(run_pretrain.get_args_parser(), pretrain_argv)
    return (args, *run_pretrain.plan(args, world_size=nproc))


def _grid(end: int, points: int, extra: List[int]) -> List[int]:
    n = max(2, points)
    xs = {round(i * (end - 1) / (n - 1)) for i in range(n)} | {e for e in extra if 0 <= e < end}
    return sorted(xs)


def plot(args: argparse.Namespace, pretrain_argv: List[str], out: Optional[str] = None) -> str:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib import cm
    from matplotlib.colors import Normalize

    nproc = args.nproc
    if args.run:
        pretrain_argv, nproc = saved_command(args.run)
    targs, fo, sched, spe = build_plan(pretrain_argv, nproc)
    if fo is None:
        raise UserError('no FreezeOut in that command line (--t_0/--how_scale/--freeze_policy): nothing to plot')
    if not fo.policy.plans_ahead:
        raise UserError(f'--freeze_policy {fo.policy.name} decides while training: there is no schedule to draw '
                        f'(its decisions are in the run\'s log.txt and TensorBoard)')
    out = out or args.out
    total, warm = sched.total_steps, sched.warmup_steps
    names = [u.name for u in fo.sched_units]
    freeze = fo.freeze_steps()
    with open(os.path.splitext(out)[0] + '.json', 'w') as f:
        json.dump({'policy': fo.policy.name, 'units': names, 'freeze_steps': freeze, 'total_steps': total,
                   'warmup_steps': warm, 'steps_per_epoch': spe, 'processes': nproc,
                   'argv': pretrain_argv}, f, indent=1)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 5.6), sharex=True, dpi=100,
                                  gridspec_kw={'height_ratios': [3.2, 1], 'hspace': 0.08})
    cmap = cm.get_cmap('viridis') if hasattr(cm, 'get_cmap') else matplotlib.colormaps['viridis']
    norm = Normalize(0, max(1, len(names) - 1))
    keypts = [warm - 1, warm] + [s - 1 for s in freeze if s]
    g = _grid(total, args.points, keypts)
    pe = targs.dont_freeze_pe
    ax.plot([j / spe for j in g], [sched.lr_at(j) for j in g], color='k' if pe else '0.55', lw=1.0, ls='--',
            label='embed: global schedule, never frozen' if pe else 'global schedule (no FreezeOut)',
            zorder=4 if pe else 1)
    peak = 0.0
    for i, s in enumerate(freeze):
        xs = _grid(s if s is not None else total, args.points, keypts)
        c = cmap(norm(i))
        ys = [fo.unit_lr(i, j) for j in xs]
        peak = max([peak] + ys)
        ax.plot([j / spe for j in xs], ys, color=c, lw=1.4, zorder=2)
        if s is not None:
            ax.plot([s / spe], [fo.unit_lr(i, max(0, s - 1))], marker='x', color=c, ms=7, mew=1.8, zorder=3)
            ax2.axvline(s / spe, color=c, lw=0.8, alpha=0.6)
    ax.plot([], [], marker='x', ls='none', color='k', label='unit frozen here')
    ax.set_ylabel('learning rate')
    ax.set_ylim(bottom=-0.025 * max(peak, 1e-12))
    ax.grid(alpha=0.3)
    ax.legend(loc='upper right', fontsize=8, frameon=False)
    sm = cm.ScalarMappable(cmap=cmap, norm=norm)
    cb = fig.colorbar(sm, ax=[ax, ax2], pad=0.015, fraction=0.035)
    ticks = sorted({0, len(names) - 1} | set(range(0, len(names), max(1, len(names) // 6))))
    cb.set_ticks(ticks)
    cb.set_ticklabels([names[i] for i in ticks])
    cb.ax.tick_params(labelsize=8)
    cb.set_label('unit' + (' (embedding never frozen)' if pe else ''), fontsize=9)
    steps = sorted({0, total - 1} | {s for s in freeze if s})
    xs, ys = [j / spe for j in steps] + [total / spe], [fo.num_frozen_at(j) for j in steps]
    ys.append(ys[-1])
    ax2.step(xs, ys, where='post', color='k', lw=1.4)
    ax2.set_ylabel('frozen\nunits', fontsize=9)
    ax2.set_ylim(-0.3, len(names) + 0.3)
    ax2.set_xlabel('epoch')
    ax2.grid(alpha=0.3)
    ax2.set_xlim(0, total / spe)
    if warm:
        for a in (ax, ax2):
            a.axvspan(0, warm / spe, color='0.9', zorder=0)
    if warm >= 0.06 * total:
        ax.text(warm / spe / 2, ax.get_ylim()[1] * 0.97, 'warm-up', ha='center', va='top', fontsize=7, color='0.4')
    what = (f'{targs.how_scale} t_0={targs.t_0:g}, {targs.freeze_schedule}' if fo.schedule is not None
            else fo.policy.name)
    ax.set_title(args.title or f'FreezeOut: {what}; {len(names)} units, {targs.epochs} epochs ({targs.warmup_epochs} '
                               f'warm-up), T={total} steps on {nproc} process(es)', fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches='tight')
    plt.close(fig)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, pretrain_argv = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    args = get_parser().parse_args(own)
    if not args.run and not pretrain_argv:
        raise UserError("give run_pretrain.py's flags after --, or --run OUTPUT_DIR")
    try:
        import matplotlib  # noqa: F401  (a dev extra: say so before any work)
    except ImportError:
        raise UserError('tools/plot_schedule.py needs matplotlib: pip install -r requirements-dev.txt') from None
    print(plot(args, pretrain_argv))
    return 0


if __name__ == '__main__':
    exit_main(main, sys.argv[1:])
