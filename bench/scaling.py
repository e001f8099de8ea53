"""How step time and memory grow with batch size and input size (LocalMIM pre-training step, CPU or CUDA).

    python -m bench.scaling --models MIM_vit_tiny_patch16,MIM_vit_small_patch16 --threads 2 --json scaling.json

Two sweeps per model, each config timed with ``bench/pretrain_step.py``'s instrumented step (median of ``--steps``
after one warm-up step):

* batch sweep at ``--input_size`` (224): batch 1, 2, 4, 8, 16, 32, 64;
* input sweep at ``--sweep_batch`` (8): 32, 64, 128, 160, 224 px. (112 px is not possible with 16 px patches:
  its 7x7 grid cannot be pooled to the 0.5-scale stage, so 128 takes its place.)

Per config: step time and its phases, ms per image, forward GFLOP per image (``freezeout.measure_unit_flops``),
achieved GFLOP/s (training FLOPs = 3x forward), activation memory (bytes autograd saves for backward, each storage
once, parameters excluded) and peak RSS of the config (Linux: ``/proc/self/clear_refs`` resets the high-water mark
after ``malloc_trim``; ``-`` where that is not available; CUDA: ``max_memory_allocated``).

Super-linear growth is flagged: (batch) ms per image at the largest batch more than ``--tol`` above its minimum;
(input) the log-log slope of step time vs tokens between consecutive sizes above 1 + tol, and whether FLOPs explain it
(the GFLOP/img slope) or the machine gets less efficient (falling GFLOP/s). A config whose predicted time exceeds
``--max_config_s`` is skipped and listed.
"""
import argparse
import ctypes
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

if __name__ == '__main__' and not __package__:  # run as a file (python bench/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'bench.scaling', *sys.argv[1:]])

import torch  # noqa: E402

from bench import pretrain_step as ps  # noqa: E402
from freezeout import measure_unit_flops  # noqa: E402
from util.log import write_json  # noqa: E402

PHASES = [p for p in ps.PHASES if p != 'data']  # phases that change with the freeze state / size


def _trim() -> None:
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0). False if not possible."""
    _trim()
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def vm_hwm_mb(key: str = 'VmHWM') -> Optional[float]:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def measure(args: argparse.Namespace, model_name: str, size: int, batch: int, first: bool = True
            ) -> Dict[str, object]:
    """One round of one config: a fresh model, 1 warm-up + ``--steps`` timed steps; memory/FLOPs on the first round."""
    from util.amp import make_amp
    from bench.freezeout_saving import saved_tensor_bytes  # the same helper as the FreezeOut bench
    device = torch.device(args.device)
    sync = ps.sync_fn(device)
    cfg = argparse.Namespace(model=model_name, input_size=size, patch_size=None, hog_nbins=9, batch_size=batch,
                             seed=0, depth=None, embed_dim=None, num_heads=None)
    torch.manual_seed(0)
    model = ps.build_model(cfg).to(device)
    res: Dict[str, object] = {'model': model_name, 'input_size': size, 'batch_size': batch,
                              'tokens': model.num_patches,
                              'params_m': sum(p.numel() for p in model.parameters()) / 1e6}
    if first:
        res['gflop_fwd_per_img'] = measure_unit_flops(model, size, args.mask_ratio, device)['total_fwd'] / 1e9
    opt = ps.make_optimizer(model)
    amp = make_amp(device, 'auto')
    batch_t = ps.make_batch(cfg, device)
    rss_ok = reset_peak_rss() if (first and device.type == 'cpu') else False
    rss0 = vm_hwm_mb('VmRSS') if rss_ok else None
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    samples = []
    for i in range(1 + args.steps):
        t = ps.timed_step(model, opt, batch_t, device, amp, args.mask_ratio, sync)
        if i >= 1:
            samples.append(t)
    res['samples'] = samples
    if first:
        peak = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == 'cuda'
                else (vm_hwm_mb() if rss_ok else None))
        res['peak_mem_mb'] = peak
        res['peak_delta_mb'] = peak - rss0 if (peak is not None and rss0 is not None) else None
        res['activation_mb'] = saved_tensor_bytes(model, model, batch_t.to(device), args.mask_ratio) / 2 ** 20
    del model, opt, batch_t
    _trim()
    return res


def finish(r: Dict[str, object], stat: str) -> Dict[str, object]:
    """Reduce the samples of all rounds: ``stat`` = min (best of, the least disturbed by other load) or median."""
    red = min if stat == 'min' else ps.median
    samples = r['samples']
    r['step_ms'] = red([x['step'] for x in samples])
    r['step_median_ms'] = ps.median([x['step'] for x in samples])
    r['step_min_ms'] = min(x['step'] for x in samples)
    r['cpu_ms'] = red([x['cpu'] for x in samples])
    r['minflt_per_img'] = ps.median([x['minflt'] for x in samples]) / r['batch_size']
    r['phase_ms'] = {ph: red([x[ph] for x in samples]) for ph in PHASES}
    r['ms_per_img'] = r['step_ms'] / r['batch_size']
    r['img_per_s'] = r['batch_size'] / r['step_ms'] * 1e3
    r['gflop_per_s'] = 3 * r['gflop_fwd_per_img'] * r['batch_size'] / (r['step_ms'] / 1e3)
    r['n_samples'] = len(samples)
    r['all_step_ms'] = [x['step'] for x in samples]
    del r['samples']
    return r


def flag_batch(rows: List[Dict[str, object]], tol: float) -> Optional[str]:
    per = [(r['batch_size'], r['ms_per_img']) for r in rows]
    if len(per) < 2:
        return None
    best_b, best = min(per, key=lambda x: x[1])
    last_b, last = per[-1]
    if last > (1 + tol) * best:
        return (f'ms/img rises from {best:.1f} (batch {best_b}) to {last:.1f} (batch {last_b}): '
                f'{last / best:.2f}x, super-linear in batch')
    return None


def flag_input(rows: List[Dict[str, object]], tol: float) -> List[str]:
    out = []
    for a, b in zip(rows, rows[1:]):
        lt = math.log(b['tokens'] / a['tokens'])
        s_time = math.log(b['step_ms'] / a['step_ms']) / lt
        s_flop = math.log(b['gflop_fwd_per_img'] / a['gflop_fwd_per_img']) / lt
        b['slope_time_vs_tokens'], b['slope_flop_vs_tokens'] = s_time, s_flop
        b['phase_slopes'] = {ph: math.log(max(1e-6, b['phase_ms'][ph]) / max(1e-6, a['phase_ms'][ph])) / lt
                             for ph in PHASES}
        if s_time > 1 + tol:
            why = 'FLOPs grow as fast' if s_flop > 1 + tol and s_time <= s_flop + tol else \
                'FLOPs do not explain it (efficiency falls)'
            out.append(f"{a['input_size']}->{b['input_size']} px: time ~ tokens^{s_time:.2f} (FLOPs ~ "
                       f"tokens^{s_flop:.2f}; {why})")
    return out


def main(argv=None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', default='MIM_vit_tiny_patch16,MIM_vit_small_patch16')
    p.add_argument('--batches', default='1,2,4,8,16,32,64')
    p.add_argument('--input_size', default=224, type=int, help='input size of the batch sweep (default: 224)')
    p.add_argument('--sizes', default='32,64,128,160,224')
    p.add_argument('--sweep_batch', default=8, type=int, help='batch of the input-size sweep (default: 8)')
    p.add_argument('--steps', default=1, type=int, help='timed steps per config and round after 1 warm-up (default: 1)')
    p.add_argument('--rounds', default=3, type=int,
                   help='passes over all configs, alternating order, so bursts of load elsewhere hit every config '
                        '(default: 3)')
    p.add_argument('--stat', default='min', choices=['min', 'median'],
                   help='reduction over all timed steps of a config: min (best of; robust to other load on a '
                        'shared machine) or median (default: min)')
    p.add_argument('--threads', default=2, type=int)
    p.add_argument('--device', default='cpu')
    p.add_argument('--mask_ratio', default=0.75, type=float)
    p.add_argument('--max_config_s', default=120.0, type=float,
                   help='skip a config whose predicted time (all rounds, warm-up + steps) exceeds this '
                        '(default: 120)')
    p.add_argument('--tol', default=0.15, type=float, help='tolerance of the super-linear flags (default: 0.15)')
    p.add_argument('--json', default=None)
    p.add_argument('--plot', default=None, help='write a PNG of both sweeps here')
    p.add_argument('--from_json', default=None, help='re-print / re-plot a saved --json result')
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            out = json.load(f)
        print_tables(out)
        if args.plot:
            print(plot(out, args.plot))
        return out
    torch.set_num_threads(args.threads)
    out: Dict[str, object] = {'machine': ps.machine_info(torch.device(args.device), args.threads),
                              'batch_sweep': {}, 'input_sweep': {}, 'skipped': [], 'flags': {},
                              'batch_input_size': args.input_size, 'sweep_batch': args.sweep_batch,
                              'stat': args.stat, 'rounds': args.rounds, 'steps': args.steps}
    t_start = time.time()
    plan = []  # (name, sweep, size, batch) in ascending order per sweep
    for name in args.models.split(','):
        plan += [(name, 'batch_sweep', args.input_size, int(b)) for b in args.batches.split(',')]
        plan += [(name, 'input_sweep', int(sz), args.sweep_batch) for sz in args.sizes.split(',')]
    recs: Dict[tuple, Dict[str, object]] = {}
    skipped = set()
    for rnd in range(args.rounds):
        order = plan if rnd % 2 == 0 else list(reversed(plan))
        for key in order:
            name, sweep, size, b = key
            if key in skipped:
                continue
            if rnd == 0:
                prev = [recs[k] for k in plan[:plan.index(key)] if k in recs and k[:2] == key[:2]]
                if prev:
                    # cheapest ms per image-pixel seen so far in this sweep (a burst of load elsewhere must not
                    # make us skip everything after it)
                    per = min(min(x['step'] for x in pr['samples']) / (pr['batch_size'] * pr['input_size'] ** 2)
                              for pr in prev)
                    predicted = per * b * size ** 2 / 1e3 * (1 + args.steps) * args.rounds
                    if predicted > args.max_config_s:
                        skipped.add(key)
                        out['skipped'].append({'model': name, 'input_size': size, 'batch_size': b,
                                               'predicted_s': predicted})
                        print(f'{name} {size}px batch {b}: skipped (predicted {predicted:.0f}s for {args.rounds} '
                              f'rounds > --max_config_s {args.max_config_s:g})', flush=True)
                        continue
            r = measure(args, name, size, b, first=key not in recs)
            if key in recs:
                recs[key]['samples'] += r['samples']
            else:
                recs[key] = r
            print(f"round {rnd + 1}/{args.rounds} {name:<22} {size:>4}px batch {b:>3}: "
                  f"{ps.median([x['step'] for x in r['samples']]):>9.1f} ms (load {ps.loadavg()})", flush=True)
    for key in plan:
        if key in recs:
            out[key[1]].setdefault(key[0], []).append(finish(recs[key], args.stat))
    for name in args.models.split(','):
        out['batch_sweep'].setdefault(name, [])
        out['input_sweep'].setdefault(name, [])
        out['flags'][name] = {'batch': flag_batch(out['batch_sweep'][name], args.tol),
                              'input': flag_input(out['input_sweep'][name], args.tol)}
    out['total_s'] = time.time() - t_start
    print_tables(out)
    write_json(args.json, out)
    if args.plot:
        print(plot(out, args.plot))
    return out


def plot(out: Dict[str, object], path: str) -> str:
    """Left: ms per image vs batch. Right: step time vs tokens (log-log) with the FLOP-proportional prediction."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for c, (name, rows) in zip(['C0', 'C1', 'C2'], out['batch_sweep'].items()):
        short = name.replace('MIM_vit_', 'ViT-').replace('_patch16', '/16')
        if rows:
            a1.plot([r['batch_size'] for r in rows], [r['ms_per_img'] for r in rows], 'o-', color=c, label=short)
        rows2 = out['input_sweep'].get(name, [])
        if rows2:
            x = [r['tokens'] for r in rows2]
            a2.plot(x, [r['step_ms'] for r in rows2], 'o-', color=c, label=f'{short} measured')
            r0 = rows2[-1]
            a2.plot(x, [r0['step_ms'] * r['gflop_fwd_per_img'] / r0['gflop_fwd_per_img'] for r in rows2], ':',
                    color=c, label=f'{short} prop. to FLOPs')
    a1.set_xscale('log', base=2)
    bs = sorted({r['batch_size'] for rows in out['batch_sweep'].values() for r in rows})
    a1.set_xticks(bs)
    a1.set_xticklabels([str(b) for b in bs])
    a1.set_xlabel('batch size')
    a1.set_ylabel('ms per image')
    a1.set_ylim(bottom=0)
    a1.set_title(f"batch sweep ({out.get('batch_input_size', 224)} px)", fontsize=9)
    a2.set_xscale('log')
    a2.set_yscale('log')
    a2.set_xlabel('tokens per image (input size / 16)^2')
    a2.set_ylabel('step time (ms)')
    a2.set_title(f"input sweep (batch {out.get('sweep_batch', 8)})", fontsize=9)
    for a in (a1, a2):
        a.grid(alpha=0.3, which='both')
        a.legend(fontsize=7)
    m = out['machine']
    fig.suptitle(f"{m['cpu']} ({m['cpu_count']} cores), {m['threads']} thread(s); step time = "
                 f"{out.get('stat', 'median')} of {out.get('rounds', 1)} rounds", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches='tight')
    plt.close(fig)
    return path


def _peak(r: Dict[str, object]) -> str:
    if r.get('peak_mem_mb') is None:
        return '-'
    d = r.get('peak_delta_mb')
    return f"{r['peak_mem_mb']:.0f}" + (f" (+{d:.0f})" if d is not None else '')


def print_tables(out: Dict[str, object]) -> None:
    m = out['machine']
    print(f"\n{m['cpu']} ({m['cpu_count']} cores), {m['threads']} threads, torch {m['torch']}; "
          f"total {out['total_s']:.0f}s; times = {out.get('stat', 'median')} of {out.get('rounds', 1)} rounds x "
          f"{out.get('steps', '?')} steps")
    for sweep in ('batch_sweep', 'input_sweep'):
        print(f"\n{sweep.replace('_', ' ')}")
        print(f"{'model':<22} {'px':>4} {'batch':>5} {'tokens':>6} {'step ms':>9} {'ms/img':>7} {'img/s':>6} "
              f"{'GFLOP/img':>9} {'GFLOP/s':>7} {'act MB':>7} {'peak MB (+step)':>15} {'flt/img':>7}  " + ' '.join(f'{ph:>8}' for ph in PHASES))
        for name, rows in out[sweep].items():
            for r in rows:
                pk = _peak(r)
                print(f"{name:<22} {r['input_size']:>4} {r['batch_size']:>5} {r['tokens']:>6} {r['step_ms']:>9.1f} "
                      f"{r['ms_per_img']:>7.1f} {r['img_per_s']:>6.2f} {r['gflop_fwd_per_img']:>9.2f} "
                      f"{r['gflop_per_s']:>7.1f} {r['activation_mb']:>7.1f} {pk:>15} {r.get('minflt_per_img', float('nan')):>7.0f}  "
                      + ' '.join(f"{r['phase_ms'][ph]:>8.0f}" for ph in PHASES))
    for s in out['skipped']:
        print(f"skipped: {s['model']} {s['input_size']}px batch {s['batch_size']} (predicted {s['predicted_s']:.0f}s)")
    for name, f in out['flags'].items():
        print(f"{name}: batch: {f['batch'] or 'no super-linear growth'}")
        for line in f['input'] or ['no super-linear growth with input size']:
            print(f"{name}: input: {line}")


if __name__ == '__main__':
    main()
