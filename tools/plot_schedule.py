"""Plot every FreezeOut unit's learning rate over training, with its freeze point (the figure for papers).

    python -m tools.plot_schedule --epochs 400 --warmup_epochs 40 --how_scale cubic --t_0 0.8 --out schedule.png
    python -m tools.plot_schedule --how_scale linear --t_0 0.5 --not_scale_lr --dont_freeze_pe --out lin.png

Takes run_pretrain.py's FreezeOut flags (``--epochs --warmup_epochs --t_0 --how_scale --not_scale_lr
--non_layerwise_lr --dont_freeze_pe --blr/--lr --min_lr``) plus ``--depth`` (blocks, default 12),
``--steps_per_epoch`` (default 100) and ``--batch_size`` (effective batch for lr = blr · batch / 256, default 256).
The curves come from ``freezeout.FreezeOutSchedule`` itself (units ``embed, block1..blockN``; with
``--dont_freeze_pe`` the embedding follows the global schedule and is never frozen), so the picture is exactly what
training does. Top panel: LR per unit until it freezes (x = frozen); bottom panel: number of frozen units and the
fraction of blocks still trained. matplotlib (a dev/bench dependency, requirements-dev.txt) with the Agg backend.
"""
import argparse
import os
import sys
from typing import List, Optional

if __name__ == '__main__' and not __package__:  # run as a file (python tools/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'tools.plot_schedule', *sys.argv[1:]])

from freezeout import FreezeOutSchedule  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--epochs', default=400, type=int, help='training epochs (default: 400)')
    p.add_argument('--warmup_epochs', default=40, type=int, help='warm-up epochs (default: 40)')
    p.add_argument('--steps_per_epoch', default=100, type=int, help='optimizer steps per epoch (default: 100)')
    p.add_argument('--t_0', default=0.8, type=float, help='freeze point of the first unit before scaling (default: 0.8)')
    p.add_argument('--how_scale', default='cubic', choices=['linear', 'squared', 'cubic'])
    p.add_argument('--not_scale_lr', action='store_true', help='initial LR of every unit = lr (not lr / t_i)')
    p.add_argument('--non_layerwise_lr', action='store_true', help='all units follow the global schedule')
    p.add_argument('--dont_freeze_pe', action='store_true', help='the embedding is never frozen')
    p.add_argument('--freeze_schedule', default='vitfreeze', choices=['vitfreeze', 'freezeout'],
                   help="run_pretrain.py's --freeze_schedule (default: vitfreeze)")
    p.add_argument('--lr_schedule', default='cosine', choices=['cosine', 'constant'],
                   help="run_pretrain.py's --lr_schedule (default: cosine)")
    p.add_argument('--constant_tail', default=0.1, type=float,
                   help="run_pretrain.py's --constant_tail, a fraction (default: 0.1)")
    p.add_argument('--lr', default=None, type=float, help='absolute peak LR (default: blr · batch_size / 256)')
    p.add_argument('--blr', default=1e-3, type=float, help='base LR per 256 images (default: 1e-3)')
    p.add_argument('--batch_size', default=256, type=int, help='effective batch for --blr (default: 256)')
    p.add_argument('--min_lr', default=1e-6, type=float)
    p.add_argument('--depth', default=12, type=int, help='encoder blocks (default: 12)')
    p.add_argument('--points', default=600, type=int, help='samples per curve (default: 600)')
    p.add_argument('--title', default=None)
    p.add_argument('--out', required=True, help='PNG to write')
    return p


def build_schedule(args: argparse.Namespace) -> FreezeOutSchedule:
    names = ([] if args.dont_freeze_pe else ['embed']) + [f'block{i}' for i in range(1, args.depth + 1)]
    lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256
    return FreezeOutSchedule(names, args.epochs * args.steps_per_epoch, args.warmup_epochs * args.steps_per_epoch,
                             lr, args.min_lr, args.t_0, args.how_scale, scale_lr=not args.not_scale_lr,
                             layerwise_lr=not args.non_layerwise_lr, freeze_schedule=args.freeze_schedule,
                             lr_schedule=args.lr_schedule, constant_tail=args.constant_tail)


def _grid(end: int, points: int, extra: List[int]) -> List[int]:
    n = max(2, points)
    xs = {round(i * (end - 1) / (n - 1)) for i in range(n)} | {e for e in extra if 0 <= e < end}
    return sorted(xs)


def plot(args: argparse.Namespace, out: Optional[str] = None) -> str:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib import cm
    from matplotlib.colors import Normalize

    s = build_schedule(args)
    spe, total = args.steps_per_epoch, s.total_steps
    out = out or args.out
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 5.6), sharex=True, dpi=100,
                                  gridspec_kw={'height_ratios': [3.2, 1], 'hspace': 0.08})
    cmap = cm.get_cmap('viridis') if hasattr(cm, 'get_cmap') else matplotlib.colormaps['viridis']
    norm = Normalize(0, max(1, len(s.units) - 1))
    keypts = [s.warmup_steps - 1, s.warmup_steps] + [u.freeze_step - 1 for u in s.units if u.freeze_step]
    # the global schedule (the plain run) for reference
    g = _grid(total, args.points, keypts)
    glabel = ('embed: global schedule, never frozen' if args.dont_freeze_pe
              else 'global schedule (no FreezeOut)')
    ax.plot([j / spe for j in g], [s.global_lr_at(j) for j in g], color='k' if args.dont_freeze_pe else '0.55',
            lw=1.0, ls='--', label=glabel, zorder=4 if args.dont_freeze_pe else 1)
    for u in s.units:
        end = u.freeze_step if u.freeze_step is not None else total
        xs = _grid(end, args.points, keypts)
        c = cmap(norm(u.index))
        ax.plot([j / spe for j in xs], [s.lr_at(u.index, j) for j in xs], color=c, lw=1.4, zorder=2)
        if u.freeze_step is not None:
            y = s.lr_at(u.index, u.freeze_step - 1)
            ax.plot([u.freeze_step / spe], [y], marker='x', color=c, ms=7, mew=1.8, zorder=3)
            ax2.axvline(u.freeze_step / spe, color=c, lw=0.8, alpha=0.6)
    ax.plot([], [], marker='x', ls='none', color='k', label='unit frozen here')
    ax.set_ylabel('learning rate')
    ax.set_ylim(bottom=-0.025 * max(u.alpha for u in s.units))
    ax.grid(alpha=0.3)
    ax.legend(loc='upper right', fontsize=8, frameon=False)
    sm = cm.ScalarMappable(cmap=cmap, norm=norm)
    cb = fig.colorbar(sm, ax=[ax, ax2], pad=0.015, fraction=0.035)
    ticks = sorted({0, len(s.units) - 1} | set(range(0, len(s.units), max(1, len(s.units) // 6))))
    cb.set_ticks(ticks)
    cb.set_ticklabels([s.units[i].name for i in ticks])
    cb.ax.tick_params(labelsize=8)
    cb.set_label('unit' + (' (embedding never frozen)' if args.dont_freeze_pe else ''), fontsize=9)
    # bottom: frozen units over training
    steps = sorted({0, total - 1} | {u.freeze_step for u in s.units if u.freeze_step})
    xs, ys = [], []
    for j in steps:
        xs.append(j / spe)
        ys.append(s.num_frozen_at(j))
    xs.append(total / spe)
    ys.append(ys[-1])
    ax2.step(xs, ys, where='post', color='k', lw=1.4)
    ax2.set_ylabel('frozen\nunits', fontsize=9)
    ax2.set_ylim(-0.3, len(s.units) + 0.3)
    ax2.set_xlabel('epoch')
    ax2.grid(alpha=0.3)
    ax2.set_xlim(0, total / spe)
    if s.warmup_steps:
        for a in (ax, ax2):
            a.axvspan(0, s.warmup_steps / spe, color='0.9', zorder=0)
    if s.warmup_steps >= 0.06 * total:
        ax.text(s.warmup_steps / spe / 2, ax.get_ylim()[1] * 0.97, 'warm-up', ha='center', va='top', fontsize=7,
                color='0.4')
    flags = [f'{args.how_scale} t_0={args.t_0:g}']
    flags += [f for f, on in (('not_scale_lr', args.not_scale_lr), ('non_layerwise_lr', args.non_layerwise_lr),
                              ('dont_freeze_pe', args.dont_freeze_pe)) if on]
    ax.set_title(args.title or f"FreezeOut schedule: {', '.join(flags)}; {args.depth} blocks, {args.epochs} epochs "
                               f"({args.warmup_epochs} warm-up)", fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches='tight')
    plt.close(fig)
    return out


def main(argv=None) -> str:
    args = get_parser().parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit('tools/plot_schedule.py needs matplotlib: pip install -r requirements-dev.txt')
    path = plot(args)
    print(path)
    return path


if __name__ == '__main__':
    main()
