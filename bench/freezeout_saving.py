"""FreezeOut: measured wall-clock saving vs the FLOP model, per freeze state, single process / DDP / end to end.

    python -m bench.freezeout_saving --model MIM_vit_tiny_patch16 --input_size 224 --batch_size 8 --threads 2 \
        --steps 3 --schedules cubic:0.8,linear:0.5,cubic:0.9 --json out.json
    python -m bench.freezeout_saving ... --ddp 2        # the same sweep in 2 gloo processes (1 thread each)
    python -m bench.freezeout_saving ... --e2e          # + a real run_pretrain.py --demo pair (plain vs cubic 0.8)
    python -m bench.freezeout_saving --e2e_only --e2e_variants "plain:--t_0 1;cubic:--how_scale cubic --t_0 0.8"

(a) Every freeze state the plan passes through (0, 1, 2, ... frozen units) is timed on one model: per state the
    parameters are made trainable again, a fresh AdamW is built from ``FreezeOut.param_groups`` and
    ``FreezeOut.apply_frozen(optimizer, n)`` freezes the first n units exactly as training does. The states are
    measured in rounds whose order alternates (0,1,..,K then K,..,1,0), so drift on a shared machine hits all states
    alike; each state's step time is the median of its timed steps over all rounds. Integrating over the steps the
    plan spends in each state (``schedule.steps_in_state()``) gives the measured saving of the whole run:
    1 - Σ_k n_k·t_k / (T·t_0).
(b) The FLOP-model saving: ``freezeout.projected_saving`` on ``measure_unit_flops`` of the same model.
(c) measured / FLOP-model.
    Per state also: the time breakdown (HOG, encoder incl. the no-grad prefix, decoders, backward, optimizer), the
    activation memory (bytes of the tensors autograd saves for backward, counted once per storage, parameters
    excluded, via ``torch.autograd.graph.saved_tensors_hooks``) and the gradient + AdamW state of the trainable
    parameters.
(d) ``--e2e``: ``run_pretrain.py --demo`` twice with the same seed and flags, without FreezeOut and with
    ``--how_scale cubic --t_0 0.8``; the saving is 1 - Σ train_epoch_time(FreezeOut) / Σ train_epoch_time(plain)
    from log.txt (the training loops' wall clock, data loading included).
``--ddp N``: the state sweep under N-process gloo DDP (torch.multiprocessing.spawn, 1 thread per process, the model
re-wrapped in a fresh DDP per state as run_pretrain.py does after a freeze event), per-step wall time of rank 0.
"""
import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

if __name__ == '__main__' and not __package__:  # run as a file (python bench/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'bench.freezeout_saving', *sys.argv[1:]])
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench import pretrain_step as ps  # noqa: E402
from freezeout import FreezeOut, FreezeOutSchedule, measure_unit_flops, projected_saving, step_cost  # noqa: E402
from util.log import write_json  # noqa: E402

PHASES = [p for p in ps.PHASES if p != 'data']  # phases that change with the freeze state / size
# --metric -> per-state key; the savings summary always has all four
METRIC_KEYS = {'wall': 'step_ms', 'cpu': 'cpu_ms', 'wall_min': 'step_min_ms', 'cpu_min': 'cpu_min_ms'}
SAVING_KEYS = {'wall': 'measured_saving', 'cpu': 'measured_saving_cpu_time', 'wall_min': 'measured_saving_min',
               'cpu_min': 'measured_saving_cpu_min'}


# ---------------------------------------------------------------------------------------------------------------------
# schedules


def parse_schedules(args: argparse.Namespace) -> List[Tuple[str, float]]:
    if args.schedules:
        out = []
        for item in args.schedules.split(','):
            how, _, t0 = item.partition(':')
            out.append((how.strip(), float(t0)))
        return out
    return [(args.how_scale, args.t_0)]


def make_schedule(args, names: Sequence[str], how: str, t0: float) -> FreezeOutSchedule:
    total = args.epochs * args.steps_per_epoch
    return FreezeOutSchedule(names, total, args.warmup_epochs * args.steps_per_epoch, args.lr, args.min_lr, t0, how,
                             scale_lr=not args.not_scale_lr, layerwise_lr=not args.non_layerwise_lr,
                             freeze_schedule=args.freeze_schedule)


# ---------------------------------------------------------------------------------------------------------------------
# measurement on one process (also the body of each DDP worker)


def saved_tensor_bytes(model: nn.Module, net: nn.Module, imgs: torch.Tensor, mask_ratio: float) -> int:
    """Bytes autograd keeps for backward in one forward (each storage once; parameters and buffers excluded)."""
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(imgs, mask_ratio=mask_ratio)
    del out
    return sum(seen.values())


def trainable_state_bytes(model: nn.Module) -> int:
    """Gradient + AdamW exp_avg + exp_avg_sq of the trainable parameters (3 copies, same dtype)."""
    return sum(3 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def sweep(args: argparse.Namespace, states: Sequence[int], distributed: bool = False,
          log=print) -> Dict[int, Dict[str, object]]:
    """Time the training step in every freeze state in ``states`` (see the module docstring)."""
    from util.amp import make_amp
    device = torch.device(getattr(args, 'device', 'cpu'))  # CUDA for bench.supply_demand's demand on a GPU
    sync = ps.sync_fn(device)
    torch.manual_seed(args.seed)
    model = ps.build_model(args).to(device)
    model.train(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = FreezeOut.unit_names(model, args.dont_freeze_pe)
    sched = make_schedule(args, names, 'linear', 0.5)  # any schedule: the sweep only uses apply_frozen(n)
    freezer = FreezeOut(model, sched, args.dont_freeze_pe)
    amp = make_amp(device, 'none' if device.type == 'cpu' else getattr(args, 'amp', 'auto'))
    rank = dist.get_rank() if distributed else 0
    gen_args = argparse.Namespace(**vars(args))
    gen_args.seed = args.seed + rank
    batch = ps.make_batch(gen_args, device).to(device)  # on the device already: the step alone, no copy
    res: Dict[int, Dict[str, object]] = {n: {'times': [], 'cpu_times': [], 'phases': {ph: [] for ph in PHASES}}
                                         for n in states}
    for rnd in range(args.rounds):
        order = list(states) if rnd % 2 == 0 else list(reversed(states))
        for n in order:
            for p in trainable:
                p.requires_grad_(True)
            model.set_frozen(0, False)
            opt = torch.optim.AdamW(freezer.param_groups(args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
            freezer.apply_frozen(opt, n)
            net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if distributed else model
            for i in range(args.warmup + args.steps):
                if distributed:
                    dist.barrier()
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    loss = net(batch, mask_ratio=args.mask_ratio)['loss']
                    t1 = time.perf_counter()
                    loss.backward()
                    t2 = time.perf_counter()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    t3 = time.perf_counter()
                    t = {'step': (t3 - t0) * 1e3, 'forward': (t1 - t0) * 1e3, 'backward': (t2 - t1) * 1e3,
                         'optim': (t3 - t2) * 1e3, 'cpu': (time.process_time() - c0) * 1e3}
                else:
                    t = ps.timed_step(model, opt, batch, device, amp, args.mask_ratio, sync)
                if i >= args.warmup:
                    res[n]['times'].append(t['step'])
                    res[n]['cpu_times'].append(t['cpu'])
                    for ph in t:
                        if ph not in ('step', 'cpu', 'minflt'):
                            res[n]['phases'].setdefault(ph, []).append(t[ph])
            if rnd == 0:
                res[n]['activation_bytes'] = saved_tensor_bytes(model, model, batch, args.mask_ratio)
                res[n]['trainable_state_bytes'] = trainable_state_bytes(model)
                res[n]['active_stages'] = model.active_stages()
                res[n]['trainable_params'] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            del net, opt
            if rank == 0:
                log(f'  round {rnd + 1}/{args.rounds} state {n:>2}: {ps.median(res[n]["times"][-args.steps:]):8.1f} ms '
                    f'wall, {ps.median(res[n]["cpu_times"][-args.steps:]):8.1f} ms CPU (load {ps.loadavg()})')
    for n in states:
        r = res[n]
        r['step_ms'] = ps.median(r['times'])
        r['cpu_ms'] = ps.median(r['cpu_times'])
        r['step_min_ms'] = min(r['times'])
        r['cpu_min_ms'] = min(r['cpu_times'])
        r['phase_ms'] = {ph: ps.median(v) for ph, v in r['phases'].items() if v}
        del r['phases']
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, args: argparse.Namespace, states: List[int], out: str, port: int) -> None:
    os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'] = '127.0.0.1', str(port)
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        res = sweep(args, states, distributed=True, log=lambda m: print(f'[ddp] {m}', flush=True))
        if rank == 0:
            with open(out, 'w') as f:
                json.dump({str(k): v for k, v in res.items()}, f)
    finally:
        dist.destroy_process_group()


def ddp_sweep(args: argparse.Namespace, states: List[int]) -> Dict[int, Dict[str, object]]:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, 'ddp.json')
        mp.spawn(_ddp_worker, args=(args.ddp, args, list(states), out, _free_port()), nprocs=args.ddp, join=True)
        with open(out) as f:
            return {int(k): v for k, v in json.load(f).items()}


# ---------------------------------------------------------------------------------------------------------------------
# savings


def measured_saving(schedule: FreezeOutSchedule, step_ms: Dict[int, float]) -> float:
    steps = schedule.steps_in_state()
    run = sum(c * step_ms[k] for k, c in enumerate(steps) if c)
    return 1.0 - run / (schedule.total_steps * step_ms[0])


def summarise(args, names, schedules, flops, single, ddp) -> Dict[str, object]:
    out = []
    for how, t0 in schedules:
        s = make_schedule(args, names, how, t0)
        row = {'how_scale': how, 't_0': t0, 'steps_in_state': s.steps_in_state(),
               'flop_saving': projected_saving(s, flops, args.dont_freeze_pe),
               'measured_saving': measured_saving(s, {k: v['step_ms'] for k, v in single.items()}),
               'measured_saving_cpu_time': measured_saving(s, {k: v['cpu_ms'] for k, v in single.items()}),
               'measured_saving_min': measured_saving(s, {k: v['step_min_ms'] for k, v in single.items()}),
               'measured_saving_cpu_min': measured_saving(s, {k: v['cpu_min_ms'] for k, v in single.items()})}
        row['ratio'] = row['measured_saving'] / row['flop_saving'] if row['flop_saving'] else float('nan')
        if ddp:
            row['ddp_measured_saving'] = measured_saving(s, {k: v['step_ms'] for k, v in ddp.items()})
            row['ddp_ratio'] = row['ddp_measured_saving'] / row['flop_saving'] if row['flop_saving'] else float('nan')
            row['ddp_measured_saving_cpu_time'] = measured_saving(s, {k: v['cpu_ms'] for k, v in ddp.items()})
            row['ddp_measured_saving_min'] = measured_saving(s, {k: v['step_min_ms'] for k, v in ddp.items()})
            row['ddp_measured_saving_cpu_min'] = measured_saving(s, {k: v['cpu_min_ms'] for k, v in ddp.items()})
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# end to end


DEFAULT_VARIANTS = [('plain', ['--how_scale', 'cubic', '--t_0', '1']),  # --demo's plain run: t_0 1 = no FreezeOut
                    ('freezeout', ['--how_scale', 'cubic', '--t_0', '0.8'])]


def parse_variants(spec: Optional[str]) -> List[Tuple[str, List[str]]]:
    """``--e2e_variants 'NAME:FLAGS;NAME:FLAGS;...'`` -> [(name, flags)]; the first is the baseline. ``{run}`` in the
    flags is the run's own output folder (a per-run --prefix_cache). None: plain vs cubic 0.8."""
    if not spec:
        return list(DEFAULT_VARIANTS)
    out = []
    for part in (x.strip() for x in spec.split(';') if x.strip()):
        name, sep, flags = part.partition(':')
        if not sep or not name.strip() or not name.strip().isidentifier():
            raise SystemExit(f'error: --e2e_variants {part!r}: expected NAME:FLAGS (NAME a word), e.g. '
                             f'"plain:--t_0 1;cubic:--how_scale cubic --t_0 0.8"')
        out.append((name.strip(), flags.split()))
    if len(out) < 2 or len({n for n, _ in out}) != len(out):
        raise SystemExit('error: --e2e_variants: give at least two variants with distinct names (the first is the '
                         'baseline)')
    return out


def e2e(args: argparse.Namespace, log=print) -> Dict[str, object]:
    """Real run_pretrain.py --demo runs, same seed and flags, one per variant (default: plain vs cubic 0.8), in one
    interleaved sequence: A B C, then C B A, ... for repeats > 1, so drift on a shared machine hits every variant
    alike. Each variant's saving is measured against the first's training loop time."""
    variants = parse_variants(getattr(args, 'e2e_variants', None))
    runs: Dict[str, List[Dict[str, object]]] = {n: [] for n, _ in variants}
    flop: Dict[str, Optional[float]] = {n: None for n, _ in variants}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED='1')
    base = [sys.executable, os.path.join(REPO, 'run_pretrain.py'), '--demo', '--epochs', str(args.e2e_epochs),
            '--warmup_epochs', str(args.e2e_warmup_epochs), '--seed', str(args.seed), '--knn_eval_freq', '0',
            '--save_freq', '1000'] + (args.e2e_flags.split() if args.e2e_flags else [])
    order: List[Tuple[str, List[str]]] = []
    for r in range(args.e2e_repeats):
        order += variants if r % 2 == 0 else variants[::-1]
    with tempfile.TemporaryDirectory() as d:
        for i, (kind, flags) in enumerate(order):
            od = os.path.join(d, f'{kind}{i}')
            cmd = base + ['--output_dir', od, '--log_dir', os.path.join(od, 'tb')] + [f.format(run=od) for f in flags]
            t = time.time()
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
            if p.returncode != 0:
                raise RuntimeError(f'{" ".join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}')
            with open(os.path.join(od, 'log.txt')) as f:
                recs = [json.loads(line) for line in f if line.strip()]
            m = re.search(r'projected saving of training FLOPs[^:]*: ([0-9.]+)%', p.stdout)
            if m:  # a prefix cache prints the FLOPs it saves on top of the plan
                c = re.search(r'saves ([0-9.]+)% of the no-freeze training FLOPs', p.stdout)
                flop[kind] = (float(m.group(1)) + (float(c.group(1)) if c else 0.0)) / 100
            runs[kind].append({'train_loop_s': sum(r['train_epoch_time'] for r in recs),
                               'compute_s': sum(r.get('train_compute_time', 0.0) for r in recs),
                               'process_s': time.time() - t, 'process_cpu_s': cpu_s, 'epochs': len(recs),
                               'frozen_units': [r.get('frozen_units', 0) for r in recs],
                               'final_loss': recs[-1].get('train_loss')})
            log(f'  e2e {kind:<9}: training loop {runs[kind][-1]["train_loop_s"]:.1f}s '
                f'(compute {runs[kind][-1]["compute_s"]:.1f}s; process CPU time {cpu_s:.1f}s), frozen units per '
                f'epoch {runs[kind][-1]["frozen_units"]}', flush=True)

    def total(kind: str, key: str) -> float:
        return sum(r[key] for r in runs[kind])
    ref = variants[0][0]
    per = {}
    for kind, flags in variants:
        a, b = total(ref, 'train_loop_s'), total(kind, 'train_loop_s')
        ac, bc = total(ref, 'compute_s'), total(kind, 'compute_s')
        pa, pb = total(ref, 'process_cpu_s'), total(kind, 'process_cpu_s')
        per[kind] = {'flags': ' '.join(flags), 'train_loop_s': b, 'measured_saving': 1 - b / a,
                     'measured_saving_compute': 1 - bc / ac if ac else float('nan'),
                     'measured_saving_process_cpu': 1 - pb / pa if pa else float('nan'),
                     'flop_saving': flop[kind], 'final_loss': runs[kind][-1]['final_loss']}
    second = variants[1][0]
    res = {'command': ' '.join(base[1:]), 'runs': runs, 'variants': per, 'baseline': ref,
           'threads': args.threads, 'loadavg_at_end': ps.loadavg(), 'repeats': args.e2e_repeats,
           # the first two variants' numbers at the top level (plain vs cubic 0.8 by default), as before
           **{k: per[second][k] for k in ('measured_saving', 'measured_saving_compute',
                                          'measured_saving_process_cpu', 'flop_saving')}}
    if res['flop_saving']:
        res['ratio'] = res['measured_saving'] / res['flop_saving']
    return res


# ---------------------------------------------------------------------------------------------------------------------
# main


def unit_label(names: Sequence[str], n: int) -> str:
    if n == 0:
        return '-'
    return names[0] if n == 1 else f'{names[0]}..{names[n - 1]}'


def print_report(res: Dict[str, object], metric: str = 'wall') -> None:
    """The per-state table (phases in ``metric`` time: wall or process CPU) and the savings summary."""
    names, states = res['unit_names'], res['states']
    single, ddp = res['single'], res.get('ddp')
    cfg = res['config']
    key = METRIC_KEYS[metric]
    pre = 'cpu_' if metric.startswith('cpu') else ''
    print(f"\n{cfg['model']} {cfg['input_size']}px patch {cfg['patch_size']} depth {cfg['depth']}, batch "
          f"{cfg['batch_size']}, {cfg['threads']} threads; T = {cfg['epochs']} epochs x {cfg['steps_per_epoch']} "
          f"steps; median of {cfg['steps']} steps x {cfg['rounds']} rounds per state; phases in {metric} ms")
    hdr = (f"{'state':>5} {'frozen units':<16} {'active stages':<13} {'wall ms':>8} {'CPU ms':>8} {'rel':>5} "
           f"{'FLOP rel':>8} {'target':>6} {'enc':>6} {'dec':>6} {'bwd':>6} {'opt':>6} {'act MB':>7} {'grad+Adam MB':>12}")
    if ddp:
        hdr += f" {'DDP ms':>8} {'DDP rel':>7}"
    steps_cols = [f"{r['how_scale']} {r['t_0']:g}" for r in res['summary']]
    hdr += ''.join(f' {c:>11}' for c in steps_cols)
    print(hdr)
    base = single[0][key]
    for n in states:
        r = single[n]
        ph = r['phase_ms']
        line = (f"{n:>5} {unit_label(names, n):<16} {str(r['active_stages']).replace(' ', ''):<13} "
                f"{r['step_ms']:>8.1f} {r.get('cpu_ms', float('nan')):>8.1f} {r[key] / base:>5.2f} "
                f"{res['flop_rel'][n]:>8.2f} "
                + ' '.join(f"{ph.get(pre + k, float('nan')):>6.0f}" for k in PHASES)
                + f" {r['activation_bytes'] / 2 ** 20:>7.1f} {r['trainable_state_bytes'] / 2 ** 20:>12.1f}")
        if ddp:
            line += f" {ddp[n][key]:>8.1f} {ddp[n][key] / ddp[0][key]:>7.2f}"
        line += ''.join(f" {row['steps_in_state'][n]:>11}" for row in res['summary'])
        print(line)
    print(f"('rel' = {metric} step time / state 0; DDP columns in {metric} time of rank 0)")
    cols = [m for m in SAVING_KEYS if SAVING_KEYS[m] in res['summary'][0]]
    print(f"\n{'measured saving of the run':<27}" + ''.join(f" {m:>8}" for m in cols) + f" {'FLOP model':>10}  "
          + 'measured/FLOP: ' + ' '.join(f"{m:>8}" for m in cols))
    for row in res['summary']:
        fs = row['flop_saving']
        print(f"{row['how_scale'] + ' ' + format(row['t_0'], 'g') + ', 1 process':<27}"
              + ''.join(f" {100 * row[SAVING_KEYS[m]]:>7.1f}%" for m in cols) + f" {100 * fs:>9.1f}%  "
              + ' ' * 15 + ' '.join(f"{row[SAVING_KEYS[m]] / fs:>8.2f}" for m in cols))
        if ddp:
            dc = [m for m in cols if 'ddp_' + SAVING_KEYS[m] in row]
            print(f"{row['how_scale'] + ' ' + format(row['t_0'], 'g') + ', 2-proc DDP':<27}"
                  + ''.join(f" {100 * row['ddp_' + SAVING_KEYS[m]]:>7.1f}%" for m in dc) + f" {100 * fs:>9.1f}%  "
                  + ' ' * 15 + ' '.join(f"{row['ddp_' + SAVING_KEYS[m]] / fs:>8.2f}" for m in dc))
    if 'e2e' in res:
        print_e2e(res['e2e'])


def print_e2e(e: Dict[str, object]) -> None:
    if 'variants' not in e:  # a result saved before variants existed: plain vs cubic 0.8
        e = dict(e, baseline='plain', variants={
            'plain': {'train_loop_s': sum(r['train_loop_s'] for r in e['runs']['plain']), 'measured_saving': 0.0,
                      'measured_saving_compute': 0.0, 'measured_saving_process_cpu': 0.0, 'flop_saving': 0.0},
            'freezeout': {k: e.get(k) for k in ('measured_saving', 'measured_saving_compute',
                                                'measured_saving_process_cpu', 'flop_saving')}
            | {'train_loop_s': sum(r['train_loop_s'] for r in e['runs']['freezeout'])}})
    print(f"\nend to end ({e['command']}), {e.get('repeats', 1)} run(s) per variant, interleaved; savings vs "
          f"{e['baseline']}:")
    print(f"{'variant':<22} {'training loop s':>15} {'measured':>9} {'compute':>8} {'process CPU':>11} "
          f"{'FLOP model':>10} {'measured/FLOP':>13}")
    for kind, v in e['variants'].items():
        fl = v.get('flop_saving')
        ratio = f"{v['measured_saving'] / fl:>13.2f}" if fl else f"{'-':>13}"
        print(f"{kind:<22} {v['train_loop_s']:>15.1f} {100 * v['measured_saving']:>8.1f}% "
              f"{100 * v['measured_saving_compute']:>7.1f}% {100 * v['measured_saving_process_cpu']:>10.1f}% "
              f"{(f'{100 * fl:.1f}%' if fl is not None else 'n/a'):>10} {ratio}")


def plot_results(res: Dict[str, object], plot_dir: str, tag: Optional[str] = None, metric: str = 'wall'
                 ) -> List[str]:
    """Two PNGs: the step-time staircase of each schedule (measured vs FLOP model) and saving vs t_0."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    cfg = argparse.Namespace(**res['config'])
    names, flops, states = res['unit_names'], res['flops'], res['states']
    single, ddp = res['single'], res.get('ddp')
    tag = tag or f"{cfg.model.replace('MIM_vit_', 'vit_')}_{cfg.input_size}"
    key = METRIC_KEYS[metric]
    title = (f"{cfg.model} {cfg.input_size}px, batch {cfg.batch_size}, {cfg.threads} CPU thread(s), "
             f"{'process CPU time' if metric.startswith('cpu') else 'wall clock'}"
             f"{' (min of samples)' if metric.endswith('min') else ' (median)'}"
             + (' / 2-process gloo DDP, 1 thread each' if ddp else ''))
    os.makedirs(plot_dir, exist_ok=True)
    paths = []
    # 1. staircase: one panel per schedule
    nsch = len(res['summary'])
    fig, axes = plt.subplots(1, nsch, figsize=(3.3 * nsch + 0.6, 3.3), dpi=100, sharey=True, squeeze=False)
    base_ms = single[0][key]
    base_cost = step_cost(flops, 0, cfg.dont_freeze_pe)
    top = base_ms
    for i, (ax, row) in enumerate(zip(axes[0], res['summary'])):
        counts = row['steps_in_state']
        xs, meas, model_ms, dm = [0.0], [], [], []
        for k, n in enumerate(counts):
            if n:
                xs.append(xs[-1] + n / sum(counts))
                meas.append(single[k][key])
                model_ms.append(base_ms * step_cost(flops, k, cfg.dont_freeze_pe) / base_cost)
                if ddp:
                    dm.append(ddp[k][key] / ddp[0][key] * base_ms)
        top = max([top] + meas + dm)
        ax.stairs(model_ms, xs, baseline=None, color='0.35', lw=1.2, ls=':', label='FLOP model')
        ax.stairs(meas, xs, baseline=None, color='C0', lw=1.8, label=f'measured, 1 process')
        ms = row[SAVING_KEYS[metric]]
        sub = f"measured {100 * ms:.1f}%, FLOP {100 * row['flop_saving']:.1f}%"
        if ddp:
            ax.stairs(dm, xs, baseline=None, color='C3', lw=1.2, ls='--', label='measured, 2-proc DDP (scaled)')
            dms = row['ddp_' + SAVING_KEYS[metric]]
            sub += f"\nDDP {100 * dms:.1f}%"
        ax.set_title(f"{row['how_scale']} t_0={row['t_0']:g}: {sub}", fontsize=8)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_xlabel('fraction of training', fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.set_ylabel(f"step time (ms, {'CPU' if metric.startswith('cpu') else 'wall'})", fontsize=8)
            ax.legend(fontsize=6.5, loc='lower left', framealpha=0.9)
    axes[0][0].set_ylim(0, top * 1.08)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    p = os.path.join(plot_dir, f'freezeout_staircase_{tag}.png')
    fig.savefig(p, dpi=100, bbox_inches='tight')
    plt.close(fig)
    paths.append(p)
    # 2. saving vs t_0
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    grid = [0.3 + 0.01 * i for i in range(71)]
    pts = [0.5, 0.6, 0.7, 0.8, 0.9]
    step_ms = {k: v[key] for k, v in single.items()}
    for c, how in zip(['C0', 'C1', 'C2'], ['linear', 'squared', 'cubic']):
        ys = [100 * projected_saving(make_schedule(cfg, names, how, t), flops, cfg.dont_freeze_pe) for t in grid]
        ax.plot(grid, ys, color=c, lw=1.4, label=f'{how}: FLOP model')
        mp = []
        for t in pts:
            sch = make_schedule(cfg, names, how, t)
            need = [k for k, n in enumerate(sch.steps_in_state()) if n]
            if all(k in step_ms for k in need):
                mp.append((t, 100 * measured_saving(sch, step_ms)))
        if mp:
            ax.plot(*zip(*mp), 'o', color=c, ms=5, label=f'{how}: measured (state sweep)')
    if 'e2e' in res and res['e2e'].get('flop_saving'):
        e = res['e2e']
        ax.plot([0.8], [100 * (e['measured_saving_process_cpu'] if metric.startswith('cpu') else e['measured_saving'])],
                's',
                color='k', mfc='none', ms=7,
                label='cubic 0.8 end to end (demo model)')
    ax.set_xlabel('t_0')
    ax.set_ylabel('saving of the run (%)')
    ax.grid(alpha=0.3)
    ax.set_xlim(0.3, 1.0)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{cfg.model} {cfg.input_size}px, batch {cfg.batch_size}: saving vs t_0", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    p = os.path.join(plot_dir, f'freezeout_saving_vs_t0_{tag}.png')
    fig.savefig(p, dpi=100, bbox_inches='tight')
    plt.close(fig)
    paths.append(p)
    return paths


def load_json(path: str) -> Dict[str, object]:
    with open(path) as f:
        res = json.load(f)
    for key in ('single', 'ddp', 'flop_rel'):
        if key in res:
            res[key] = {int(k): v for k, v in res[key].items()}
    return res


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """How each freeze state is timed (:func:`sweep`)."""
    p.add_argument('--steps', default=3, type=int, help='timed steps per state per round (default: 3)')
    p.add_argument('--warmup', default=1, type=int, help='untimed steps per state per round (default: 1)')
    p.add_argument('--rounds', default=2, type=int, help='passes over the states, alternating order (default: 2)')


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """The FreezeOut plan (:func:`make_schedule`) and the optimizer the sweep builds."""
    p.add_argument('--t_0', default=0.8, type=float)
    p.add_argument('--how_scale', default='cubic', choices=['linear', 'squared', 'cubic'])
    p.add_argument('--freeze_schedule', default='vitfreeze', choices=['vitfreeze', 'freezeout'],
                   help='where units freeze: W + t_i (T - W) (vitfreeze, run_pretrain.py\'s default) or t_i T '
                        '(freezeout; docs/PERFORMANCE.md section 3 was measured with it) (default: vitfreeze)')
    p.add_argument('--schedules', default=None,
                   help='several schedules from one sweep, e.g. cubic:0.8,linear:0.5,cubic:0.9 (overrides --t_0/'
                        '--how_scale)')
    p.add_argument('--not_scale_lr', action='store_true')
    p.add_argument('--non_layerwise_lr', action='store_true')
    p.add_argument('--dont_freeze_pe', action='store_true')
    p.add_argument('--epochs', default=100, type=int, help='schedule length in epochs (default: 100)')
    p.add_argument('--warmup_epochs', default=10, type=int)
    p.add_argument('--steps_per_epoch', default=100, type=int)
    p.add_argument('--lr', default=1.5e-4, type=float)
    p.add_argument('--min_lr', default=1e-6, type=float)
    p.add_argument('--weight_decay', default=0.05, type=float)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ps.add_model_args(p)
    p.set_defaults(batch_size=8)
    add_sweep_args(p)
    add_plan_args(p)
    p.add_argument('--ddp', default=0, type=int, help='also sweep under N-process gloo DDP, 1 thread each')
    p.add_argument('--e2e', action='store_true', help='also run the run_pretrain.py --demo pair')
    p.add_argument('--e2e_only', action='store_true', help='only the end-to-end pair (no state sweep)')
    p.add_argument('--e2e_epochs', default=6, type=int)
    p.add_argument('--e2e_warmup_epochs', default=1, type=int)
    p.add_argument('--e2e_repeats', default=1, type=int,
                   help='runs per variant, in order A B .., then .. B A (default: 1)')
    p.add_argument('--e2e_flags', default='', help='extra run_pretrain.py flags for every end-to-end run')
    p.add_argument('--e2e_variants', default=None, metavar='"NAME:FLAGS;NAME:FLAGS;..."',
                   help='end-to-end variants instead of the plain/cubic-0.8 pair, the first the baseline of the '
                        'savings; {run} in FLAGS = the run\'s own output folder (e.g. --prefix_cache {run}/pc) '
                        '(default: "plain:--how_scale cubic --t_0 1;freezeout:--how_scale cubic --t_0 0.8")')
    p.add_argument('--json', default=None)
    p.add_argument('--plot_dir', default=None, help='write the staircase and saving-vs-t_0 PNGs here')
    p.add_argument('--from_json', default=None, help='re-print and re-plot a saved --json result, measure nothing')
    p.add_argument('--metric', default='wall', choices=list(METRIC_KEYS),
                   help='time used for the table and the plots: wall clock or process CPU time, median or min of '
                        'the samples (CPU time and min are steadier on a shared, oversubscribed machine) '
                        '(default: wall)')
    return p


def main(argv=None) -> Dict[str, object]:
    args = get_parser().parse_args(argv)
    if args.from_json:
        res = load_json(args.from_json)
        if 'single' in res:
            print_report(res, args.metric)
            if args.plot_dir:
                print('\n'.join(plot_results(res, args.plot_dir, metric=args.metric)))
        elif 'e2e' in res:
            print_e2e(res['e2e'])
        return res
    torch.set_num_threads(args.threads)
    schedules = parse_schedules(args)
    res: Dict[str, object] = {}
    if not args.e2e_only:
        torch.manual_seed(args.seed)
        model = ps.build_model(args)
        names = FreezeOut.unit_names(model, args.dont_freeze_pe)
        flops = measure_unit_flops(model, args.input_size, args.mask_ratio, torch.device('cpu'), args.dont_freeze_pe)
        del model
        plans = [make_schedule(args, names, h, t) for h, t in schedules]
        states = sorted({k for s in plans for k, c in enumerate(s.steps_in_state()) if c} | {0})
        base_cost = step_cost(flops, 0, args.dont_freeze_pe)
        res.update(loadavg_at_start=ps.loadavg(), config={**{k: v for k, v in vars(args).items()}, 'patch_size': ps.build_model(args).patch_size
                           if args.patch_size is None else args.patch_size,
                           'depth': len(names) - (0 if args.dont_freeze_pe else 1)},
                   machine=ps.machine_info(torch.device('cpu'), args.threads), unit_names=names, states=states,
                   flops={k: v for k, v in flops.items()},
                   flop_rel={n: step_cost(flops, n, args.dont_freeze_pe) / base_cost for n in states})
        print(f'sweeping {len(states)} freeze states {states} (single process, {args.threads} threads)', flush=True)
        single = sweep(args, states)
        res['single'] = single
        ddp = None
        if args.ddp:
            print(f'sweeping under {args.ddp}-process gloo DDP, 1 thread each', flush=True)
            ddp = ddp_sweep(args, states)
            res['ddp'] = ddp
        res['summary'] = summarise(args, names, schedules, flops, single, ddp)
        res['loadavg_at_end'] = ps.loadavg()
    if args.e2e or args.e2e_only:
        print('end-to-end run pair (run_pretrain.py --demo)', flush=True)
        res['e2e'] = e2e(args)
    if 'single' in res:
        print_report(res, args.metric)
    elif 'e2e' in res:
        print_e2e(res['e2e'])
    write_json(args.json, res)
    if args.plot_dir and 'single' in res:
        print('\n'.join(plot_results(res, args.plot_dir, metric=args.metric)))
    return res


if __name__ == '__main__':
    main()
