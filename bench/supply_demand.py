"""Supply vs demand: does the loader keep up once FreezeOut makes the steps faster? The predicted wall saving.

    python -m bench.supply_demand --model MIM_vit_tiny_patch16 --input_size 224 --batch_size 32 --threads 1 \
        --cores_per_gpu 8 --backends pil,pil_prepared,dali_cpu --json sd.json --out sd.png
    python -m bench.supply_demand ... --device cuda --backends pil,pil_prepared,dali_cpu,dali_gpu   # on a GPU
    python -m bench.supply_demand --from_json sd.json --cores_per_gpu 4 --out sd4.png   # re-predict, measure nothing

(a) Supply: images/s of the pre-training input pipeline per CPU core for each backend, on ImageNet-like JPEGs
    (``bench.data_pipeline.write_images``: ``--images`` 500x375 photo-like pictures, one class folder) or on
    ``--data_path``:

        pil           run_pretrain.py's loader: util.datasets.build_dataset + pretrain_transform, a DataLoader
                      with ``--supply_cores`` worker processes (0 workers when it is 1: the main process)
        pil_prepared  the same on a copy made by tools/prepare_dataset.py --max_side ``--max_side`` (kept in
                      ``--dir``; re-runs skip done files)
        dali_cpu      util.dali_loader.DaliLoader on the CPU, ``--supply_cores`` threads
        dali_gpu      the same with ``device='mixed'`` decoding on the GPU (only with ``--device cuda``), measured
                      with the cores one GPU gets (its rate is the GPU's decoder, not a per-core one)

    A CPU backend's supply per GPU is its per-core rate x the cores each GPU gets (decoding is independent per
    image; linear in cores is the assumption, docs/PERFORMANCE.md section 8.5 measured how close it is).
(b) Demand: img/s one process consumes in each freeze state the plan passes through: ``bench.freezeout_saving.sweep``
    on synthetic batches already on ``--device`` (the training step alone, AMP on CUDA), step time t_k of state k.
(c) Prediction: a step in state k takes max(t_k, B / supply) (the loader prefetches, so whichever is slower sets
    the pace); over the plan's n_k steps per state, the run takes sum_k n_k max(t_k, B / S) against
    T max(t_0, B / S) without FreezeOut:  saving = 1 - sum_k n_k max(t_k, B/S) / (T max(t_0, B/S)).
    With S = infinity this is bench.freezeout_saving's measured compute saving; the FLOP model's saving
    (freezeout.projected_saving) is printed next to it. "bound from state k": the first state whose step is faster
    than the loader, from where on the saved compute turns into waiting.
    Per GPU count N (1/2/4/8) each GPU gets ``--cores_per_gpu`` cores, or ``--host_cores`` / N when that is fewer
    (a fixed host shared by more GPUs: where an 8-GPU run stops keeping up). Demand per GPU is one process's (the
    DDP all-reduce is not modelled: it only lowers demand, so a backend that keeps up here keeps up there).
"""
import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Sequence

if __name__ == '__main__' and not __package__:  # run as a file (python bench/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'bench.supply_demand', *sys.argv[1:]])

import torch  # noqa: E402

from bench import data_pipeline as dp  # noqa: E402
from bench import freezeout_saving as fs  # noqa: E402
from bench import pretrain_step as ps  # noqa: E402
from freezeout import FreezeOut, measure_unit_flops, projected_saving  # noqa: E402
from util.log import write_json  # noqa: E402

BACKENDS = ['pil', 'pil_prepared', 'dali_cpu', 'dali_gpu']
GPUS = [1, 2, 4, 8]


# ---------------------------------------------------------------------------------------------------------------------
# the prediction (pure: tested on injected numbers)


def predict(step_ms: Dict[int, float], steps_in_state: Sequence[int], batch_size: int,
            supply_img_s: float) -> Dict[str, object]:
    """The plan's wall saving when a step in state k takes ``max(step_ms[k], batch / supply)`` (see (c))."""
    if not supply_img_s > 0:
        raise ValueError(f'supply {supply_img_s} img/s: must be > 0 (math.inf: the loader never waits)')
    supply_ms = batch_size / supply_img_s * 1e3
    used = [k for k, n in enumerate(steps_in_state) if n]
    total = sum(steps_in_state)
    run = sum(steps_in_state[k] * max(step_ms[k], supply_ms) for k in used)
    base = total * max(step_ms[0], supply_ms)
    bound = [k for k in used if supply_ms > step_ms[k]]
    return {'saving': 1.0 - run / base, 'supply_ms_per_batch': supply_ms,
            'bound_from_state': bound[0] if bound else None,
            'data_bound_steps': sum(steps_in_state[k] for k in bound) / total}


def cores_for(gpus: int, cores_per_gpu: int, host_cores: int = 0) -> float:
    """CPU cores one GPU's loader gets."""
    return min(cores_per_gpu, host_cores / gpus) if host_cores else cores_per_gpu


def table(res: Dict[str, object], cores_per_gpu: int, host_cores: int = 0,
          gpus: Sequence[int] = GPUS) -> List[Dict[str, object]]:
    """One row per GPU count: per backend the supply one GPU gets and the predicted saving (:func:`predict`)."""
    step_ms = res['demand_step_ms']
    steps, b = res['steps_in_state'], res['batch_size']
    rows = []
    for n in gpus:
        c = cores_for(n, cores_per_gpu, host_cores)
        row = {'gpus': n, 'cores_per_gpu': c, 'compute_saving': predict(step_ms, steps, b, math.inf)['saving'],
               'flop_saving': res['flop_saving'], 'backends': {}}
        for name, s in res['supply'].items():
            per_gpu = s['img_per_s'] if s.get('per_gpu') else s['img_per_s_per_core'] * c
            row['backends'][name] = {'supply_img_s': per_gpu, **predict(step_ms, steps, b, per_gpu)}
        rows.append(row)
    return rows


def print_table(res: Dict[str, object], rows: List[Dict[str, object]]) -> None:
    cfg = res['config']
    steps = res['steps_in_state']
    print(f"\n{cfg['model']} {cfg['input_size']}px depth {res['depth']}, batch {res['batch_size']} per GPU, "
          f"{cfg['how_scale']} t_0={cfg['t_0']:g} ({cfg['freeze_schedule']}), demand on {cfg['device']}")
    print(f"{'state':>5} {'steps':>6} {'step ms':>8} {'demand img/s':>12}")
    for k, n in enumerate(steps):
        if n:
            t = res['demand_step_ms'][k]
            print(f"{k:>5} {n:>6} {t:>8.1f} {res['batch_size'] / t * 1e3:>12.1f}")
    print(f"\n{'backend':<13} {'img/s per core':>14} {'cores used':>10}  (supply)")
    for name, s in res['supply'].items():
        per = 'per GPU' if s.get('per_gpu') else f"{s['img_per_s_per_core']:.1f}"
        print(f"{name:<13} {per:>14} {s['cores']:>10}" + (f"  {s['img_per_s']:.1f} img/s per GPU"
                                                         if s.get('per_gpu') else ''))
    names = list(res['supply'])
    print(f"\npredicted wall saving of the plan (FLOP model {100 * res['flop_saving']:.1f}%, compute only "
          f"{100 * rows[0]['compute_saving']:.1f}%); 'bound@k': the loader is slower than the step from state k on")
    print(f"{'GPUs':>4} {'cores/GPU':>9}" + ''.join(f" {n:>22}" for n in names))
    for row in rows:
        cells = []
        for n in names:
            r = row['backends'][n]
            tag = '' if r['bound_from_state'] is None else f" bound@{r['bound_from_state']}"
            cells.append(f"{100 * r['saving']:>6.1f}%{tag} {r['supply_img_s']:>6.0f}/s")
        print(f"{row['gpus']:>4} {row['cores_per_gpu']:>9.3g}" + ''.join(f" {c:>22}" for c in cells))


def plot(res: Dict[str, object], rows: List[Dict[str, object]], path: str) -> str:
    """Left: demand per freeze state over the plan vs each backend's supply per GPU (at the 1-GPU cores). Right:
    predicted saving vs GPU count per backend, with the compute-only and FLOP-model savings."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    steps, b, step_ms = res['steps_in_state'], res['batch_size'], res['demand_step_ms']
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    xs, ys = [0.0], []
    for k, n in enumerate(steps):
        if n:
            xs.append(xs[-1] + n / sum(steps))
            ys.append(b / step_ms[k] * 1e3)
    ax.stairs(ys, xs, baseline=None, color='k', lw=1.8, label='demand (1 process)')
    for i, name in enumerate(res['supply']):
        for row, ls in ((rows[0], '--'), (rows[-1], ':')):  # the fewest GPUs' cores, and the most GPUs' if fewer
            if row is rows[-1] and row['cores_per_gpu'] == rows[0]['cores_per_gpu']:
                continue
            ax.axhline(row['backends'][name]['supply_img_s'], color=f'C{i}', ls=ls, lw=1.2,
                       label=f"{name} supply, {row['cores_per_gpu']:g} cores/GPU ({row['gpus']} GPU)")
    ax.set_xlabel('fraction of training (freeze states of the plan)')
    ax.set_ylabel('img/s per GPU')
    ax.set_xlim(0, 1)
    ax.set_yscale('log')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    gp = [r['gpus'] for r in rows]
    for i, name in enumerate(res['supply']):
        bx.plot(gp, [100 * r['backends'][name]['saving'] for r in rows], 'o-', color=f'C{i}', label=name)
    bx.plot(gp, [100 * r['compute_saving'] for r in rows], 'k:', label='compute only (loader never waits)')
    bx.plot(gp, [100 * r['flop_saving'] for r in rows], color='0.5', ls='-.', label='FLOP model')
    bx.set_xscale('log', base=2)
    bx.set_xticks(gp, [str(g) for g in gp])
    bx.set_xlabel('GPUs')
    bx.set_ylabel('predicted wall saving (%)')
    bx.set_ylim(bottom=0)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    cfg = res['config']
    fig.suptitle(f"{cfg['model']} {cfg['input_size']}px, batch {b}/GPU, {cfg['how_scale']} t_0={cfg['t_0']:g}: "
                 f"FreezeOut saving vs loader supply", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, bbox_inches='tight')
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# measurement


def source_folder(args: argparse.Namespace) -> str:
    """The ImageFolder the supply is measured on: ``--data_path``, else the bench's ImageNet-like JPEGs."""
    if args.data_path:
        return args.data_path
    root = os.path.join(args.dir, 'folder')
    dp.write_images(os.path.join(root, 'c0'), args.images, 500, 375, 90, args.seed)
    return root


def measure_supply(args: argparse.Namespace, backend: str, root: str) -> Dict[str, object]:
    from util.datasets import build_dataset, build_loader, pretrain_transform, seed_loader_epoch
    cores = args.supply_cores
    if backend == 'pil_prepared':
        from tools.prepare_dataset import prepare
        dst = os.path.join(args.dir, f'prepared-{args.max_side}')
        prepare(root, dst, args.max_side, workers=max(1, cores))
        root = dst
    if backend in ('pil', 'pil_prepared'):
        ds = build_dataset(root, 'train', pretrain_transform(args.input_size), allow_root=True, seed=args.seed)
        loader = build_loader(ds, args.batch_size, shuffle=True, drop_last=True, num_workers=0 if cores <= 1 else cores,
                              pin_mem=False, seed=args.seed, distributed=False)
        seed_loader_epoch(loader, args.seed, 0)
        n, dt = dp.time_batches(loader, args.supply_batches)
        rate = n / dt
        return {'backend': backend, 'cores': cores, 'images': n, 'seconds': dt, 'img_per_s': rate,
                'img_per_s_per_core': rate / cores}
    from util.dali_loader import DaliLoader
    gpu = backend == 'dali_gpu'
    threads = max(1, int(cores_for(1, args.cores_per_gpu, args.host_cores))) if gpu else cores
    threads = min(threads, os.cpu_count() or 1)
    device = torch.device(args.device if gpu else 'cpu')
    ds = build_dataset(root, 'train', None, allow_root=True)
    loader = DaliLoader(ds, 'pretrain', args.batch_size, args.input_size, args.seed, device=device,
                        num_threads=threads)
    n, dt = dp.time_batches(loader, args.supply_batches, sync=ps.sync_fn(device))
    rate = n / dt
    return {'backend': backend, 'cores': threads, 'images': n, 'seconds': dt, 'img_per_s': rate,
            'img_per_s_per_core': rate / threads, 'per_gpu': gpu}


def measure(args: argparse.Namespace, backends: Sequence[str], log=print) -> Dict[str, object]:
    torch.manual_seed(args.seed)
    model = ps.build_model(args)
    names = FreezeOut.unit_names(model, args.dont_freeze_pe)
    flops = measure_unit_flops(model, args.input_size, args.mask_ratio, torch.device('cpu'), args.dont_freeze_pe)
    del model
    plan = fs.make_schedule(args, names, args.how_scale, args.t_0)
    steps = plan.steps_in_state()
    states = [k for k, n in enumerate(steps) if n]
    states = sorted(set(states) | {0})
    res: Dict[str, object] = {
        'config': {k: v for k, v in vars(args).items() if k not in ('from_json',)},
        'machine': ps.machine_info(torch.device(args.device), args.threads), 'loadavg_at_start': ps.loadavg(),
        'unit_names': names, 'depth': len(names) - (0 if args.dont_freeze_pe else 1), 'batch_size': args.batch_size,
        'steps_in_state': steps, 'flop_saving': projected_saving(plan, flops, args.dont_freeze_pe), 'supply': {}}
    root = source_folder(args)
    for b in backends:
        log(f'supply: {b} ({args.supply_batches} batches of {args.batch_size})', flush=True)
        res['supply'][b] = measure_supply(args, b, root)
    log(f'demand: {len(states)} freeze states {states} on {args.device}', flush=True)
    single = fs.sweep(args, states, log=lambda m: log(m, flush=True))
    res['demand_step_ms'] = {k: v['step_ms'] for k, v in single.items()}
    res['demand'] = {k: {kk: v[kk] for kk in ('step_ms', 'cpu_ms', 'step_min_ms', 'active_stages',
                                               'trainable_params')} for k, v in single.items()}
    res['loadavg_at_end'] = ps.loadavg()
    return res


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ps.add_model_args(p)
    fs.add_sweep_args(p)
    fs.add_plan_args(p)
    p.add_argument('--device', default='cpu', help='where the demand is measured (and dali_gpu decodes) '
                                                    '(default: cpu)')
    p.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'fp16'],
                   help='mixed precision of the demand on CUDA (CPU: fp32) (default: auto)')
    p.add_argument('--backends', default='pil,pil_prepared,dali_cpu',
                   help=f'comma list of {BACKENDS}; dali_* need nvidia-dali, dali_gpu --device cuda '
                        f'(default: pil,pil_prepared,dali_cpu)')
    p.add_argument('--cores_per_gpu', default=8, type=int, help='CPU cores each GPU\'s loader gets (default: 8)')
    p.add_argument('--host_cores', default=0, type=int,
                   help='cores of the whole host: each of N GPUs gets min(cores_per_gpu, host_cores / N) '
                        '(default: 0 = cores_per_gpu on every GPU count)')
    p.add_argument('--supply_cores', default=1, type=int,
                   help='worker processes / DALI threads the CPU backends are measured with (default: 1)')
    p.add_argument('--supply_batches', default=8, type=int, help='timed loader batches per backend (default: 8)')
    p.add_argument('--data_path', default='', help='ImageFolder to measure the supply on (default: the bench\'s '
                                                   'ImageNet-like JPEGs in --dir)')
    p.add_argument('--dir', default='/tmp/vitfreeze_bench_supply', help='generated and prepared images '
                                                                        '(default: %(default)s)')
    p.add_argument('--images', default=256, type=int, help='generated JPEGs, 500x375 (default: 256)')
    p.add_argument('--max_side', default=256, type=int,
                   help='pil_prepared: tools/prepare_dataset.py --max_side in px (default: 256)')
    p.add_argument('--json', default=None, help='write the measurements and the table here')
    p.add_argument('--out', default=None, help='write the figure (PNG) here (needs matplotlib)')
    p.add_argument('--from_json', default=None, help='re-predict, print and plot a saved --json, measure nothing')
    p.set_defaults(batch_size=32, epochs=100, warmup_epochs=10, steps_per_epoch=100)
    return p


def main(argv=None) -> Dict[str, object]:
    args = get_parser().parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            res = json.load(f)
    else:
        backends = [b.strip() for b in args.backends.split(',') if b.strip()]
        bad = [b for b in backends if b not in BACKENDS]
        if bad:
            print(f'error: --backends {",".join(bad)}: choose from {",".join(BACKENDS)}', file=sys.stderr)
            sys.exit(2)
        if 'dali_gpu' in backends and torch.device(args.device).type != 'cuda':
            print('error: --backends dali_gpu: needs --device cuda', file=sys.stderr)
            sys.exit(2)
        if any(b.startswith('dali') for b in backends):
            from util.dali_loader import require_dali
            from util.errors import UserError
            try:
                require_dali()
            except UserError as e:
                print(f'error: --backends {",".join(b for b in backends if b.startswith("dali"))}: {e}',
                      file=sys.stderr)
                sys.exit(2)
        torch.set_num_threads(args.threads)
        t = time.time()
        res = measure(args, backends)
        res['seconds'] = round(time.time() - t, 1)
    res['demand_step_ms'] = {int(k): v for k, v in res['demand_step_ms'].items()}  # JSON keys are strings
    rows = table(res, args.cores_per_gpu, args.host_cores)
    res['table'] = rows
    res['table_cores'] = {'cores_per_gpu': args.cores_per_gpu, 'host_cores': args.host_cores}
    print_table(res, rows)
    write_json(args.json, res)
    if args.out:
        print(plot(res, rows, args.out))
    return res


if __name__ == '__main__':
    main()
