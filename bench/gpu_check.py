"""The GPU check: what will break first on a GPU, in one run of under 5 minutes on one GPU, into one JSON.

    python -m bench.gpu_check --json gpu_check.json                     # on a machine with a CUDA GPU
    python -m bench.gpu_check --quick --allow_cpu --timeout_scale 10   # CPU dry run of the check itself (a test)

Parts (each a subprocess with its own time limit; a failing part is recorded, the others still run). Every
pre-training part trains the demo data with ``--warmup_epochs 0 --t_0 0.3 --how_scale linear`` so units freeze
inside the run:

    ddp          torchrun, 2 processes (NCCL; 1 process when the machine has one GPU), 3 epochs with freeze
                 events; then the same run resumed from its epoch-0 checkpoint: passes when both exit 0, freezes
                 happened, and the resumed run's final weights and optimizer step equal the uninterrupted run's
    amp_bf16     one process, --amp bf16, across the freeze events; per-epoch peak memory logged and not growing
                 once units are frozen (it is reset every epoch)
    amp_fp16     the same with --amp fp16 (GradScaler)
    compile      --compile (inductor; aot_eager on CPU) across the freeze events; the number of compiled graphs
                 (log.txt compile_graphs) must stay within a bound
    finetune     one fine-tune epoch of the ddp run's encoder with --amp fp16, --clip_grad 1 and FreezeOut
    prefix_cache --fixed_views 1 --prefix_target add --amp bf16, 2 loader workers, with and without --prefix_cache
                 (docs/PREFIX_CACHE.md): passes when the cached run reads its rows and its per-epoch losses and
                 final weights equal the uncached run's (the fp32 residual stream under AMP, same kernels)
    flops        the FLOP plan of ViT-Ti/16 224 px measured on CPU and on the GPU: equal (attention once)
    step_eager   bench.pretrain_step ViT-B/16 224 px batch 64, eager: img/s, peak memory
    step_compile the same with --compile (inductor): img/s, peak memory, compile time of the first step
    supply_demand bench.supply_demand ViT-B/16 224 px batch 64: loader supply per backend (pil, pil_prepared, and
                 dali_cpu / dali_gpu where DALI is installed) vs demand per freeze state of cubic t_0 0.8 on the
                 GPU, the predicted 1/2/4/8-GPU savings at the machine's cores per GPU (docs/PERFORMANCE.md 8.7)

Without CUDA it writes ``{"cuda": false, ...}`` with every part marked skipped and exits 0, unless
``--allow_cpu``: then the parts run on CPU (``--quick``: tiny step configs; fp16 parts run in fp32 there).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TINY = ['--input_size', '32', '--patch_size', '4', '--depth', '4', '--embed_dim', '48', '--num_heads', '3']
FREEZING = ['--demo', '--epochs', '3', '--warmup_epochs', '0', '--t_0', '0.3', '--how_scale', 'linear',
            '--knn_eval_freq', '0', '--vis_freq', '0', '--save_freq', '1']
GRAPH_BOUND = 16  # compiled graphs over a whole FreezeOut demo (measured: 8 on CPU; a hit means recompiles)
TIMEOUT_SCALE = [1.0]  # --timeout_scale (a CPU dry run of the check is far slower than the GPU it is sized for)


def _run(name: str, cmd: List[str], timeout: int, env=None) -> Dict[str, object]:
    timeout = int(timeout * TIMEOUT_SCALE[0])
    t = time.time()
    e = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=e)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as ex:
        rc, out, err = 'timeout', (ex.stdout or b'').decode() if isinstance(ex.stdout, bytes) else (ex.stdout or ''), ''
    return {'part': name, 'cmd': ' '.join(cmd), 'rc': rc, 'ok': rc == 0, 'seconds': round(time.time() - t, 1),
            'stdout_tail': out[-1500:], 'stderr_tail': err[-1500:], 'freeze_lines': out.count('FreezeOut: step')}


def _records(out_dir: str) -> List[dict]:
    path = os.path.join(out_dir, 'log.txt')
    return [json.loads(l) for l in open(path) if l.strip()] if os.path.isfile(path) else []


def _fail(r: Dict[str, object], why: str) -> Dict[str, object]:
    r['ok'], r['why'] = False, why
    return r


def _pretrain(name: str, out: str, device: str, extra: List[str], timeout: int, nproc: int = 0,
              env=None) -> Dict[str, object]:
    launch = [PY, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] if nproc else [PY]
    r = _run(name, [*launch, 'run_pretrain.py', *FREEZING, '--device', device, '--output_dir', out,
                    '--log_dir', os.path.join(out, 'tb'), *extra], timeout, env)
    if r['ok'] and r['freeze_lines'] == 0:
        return _fail(r, 'no freeze event happened')
    return r


def _ddp(tmp: str, device: str, demo_env) -> Dict[str, object]:
    import torch
    nproc = 2 if device == 'cpu' or torch.cuda.device_count() >= 2 else 1  # NCCL: one rank per GPU
    backend = ['--dist_backend', 'nccl' if device == 'cuda' else 'gloo']
    ref, res = os.path.join(tmp, 'ddp'), os.path.join(tmp, 'ddp_resumed')
    r = _pretrain('ddp', ref, device, backend, 120, nproc, demo_env)
    r['processes'] = nproc
    if not r['ok']:
        return r
    r2 = _pretrain('ddp_resume', res, device, backend + ['--resume', os.path.join(ref, 'checkpoint-0.pth')], 120,
                   nproc, demo_env)
    r['seconds'] += r2['seconds']
    if not r2['ok']:
        return _fail(r, f"resumed run failed: {r2['stderr_tail'][-500:]}")
    a, b = (torch.load(os.path.join(d, 'checkpoint-last.pth'), map_location='cpu', weights_only=True)
            for d in (ref, res))
    same = a['step'] == b['step'] and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    r['resume_exact'] = same
    return r if same else _fail(r, 'the resumed run differs from the uninterrupted one')


def _amp(name: str, tmp: str, device: str, demo_env) -> Dict[str, object]:
    out = os.path.join(tmp, name)
    r = _pretrain(name, out, device, ['--amp', name.split('_')[1] if device == 'cuda' else 'none'], 60,
                  env=demo_env)
    recs = _records(out)
    r['peak_mem_mb'] = [rec.get('train_max_mem_mb') for rec in recs]
    r['frozen_units'] = [rec.get('frozen_units') for rec in recs]
    if r['ok'] and (len(recs) != 3 or None in r['peak_mem_mb']):
        return _fail(r, 'log.txt lacks the per-epoch peak memory')
    if r['ok'] and device == 'cuda' and r['peak_mem_mb'][-1] > r['peak_mem_mb'][0] * 1.05:
        return _fail(r, 'peak memory grew although units froze (not reset per epoch, or freezing frees nothing)')
    return r


def _compile(tmp: str, device: str, demo_env) -> Dict[str, object]:
    out = os.path.join(tmp, 'compile')
    backend = 'inductor' if device == 'cuda' else 'aot_eager'
    r = _pretrain('compile', out, device, ['--compile', '--compile_backend', backend], 180, env=demo_env)
    graphs = [rec.get('compile_graphs') for rec in _records(out)]
    r['compile_graphs'] = graphs
    if r['ok'] and (not graphs or graphs[-1] is None or graphs[-1] > GRAPH_BOUND):
        return _fail(r, f'compiled graphs {graphs}: more than {GRAPH_BOUND} (recompiles at freeze events?)')
    return r


def _finetune(tmp: str, device: str, demo_env) -> Dict[str, object]:
    ck = os.path.join(tmp, 'ddp', 'checkpoint-last.pth')
    if not os.path.isfile(ck):
        return {'part': 'finetune', 'ok': False, 'why': 'needs the ddp part\'s checkpoint', 'seconds': 0}
    r = _run('finetune', [PY, 'run_finetune.py', '--demo', '--finetune', ck, '--epochs', '1', '--warmup_epochs', '0',
                          '--device', device, '--amp', 'fp16' if device == 'cuda' else 'none', '--clip_grad', '1.0',
                          '--t_0', '0.3', '--how_scale', 'linear', '--output_dir', os.path.join(tmp, 'ft')], 90,
             demo_env)
    if r['ok'] and r['freeze_lines'] == 0:
        return _fail(r, 'no freeze event in the fine-tune epoch')
    return r


FLOPS_SNIPPET = '''
import json, sys, torch
from freezeout import measure_unit_flops
from models_mim import create_model
out = {}
for dev in ['cpu'] + (['cuda'] if torch.cuda.is_available() else []):
    torch.manual_seed(0)
    m = create_model('MIM_vit_tiny_patch16', img_size=224).to(dev)
    f = measure_unit_flops(m, 224, 0.75, torch.device(dev), time_targets=False)
    out[dev] = f['total_fwd']
print(json.dumps(out))
'''


def _prefix_cache(tmp: str, device: str, demo_env) -> Dict[str, object]:
    import torch
    flags = ['--fixed_views', '1', '--prefix_target', 'add', '--num_workers', '2',
             '--amp', 'bf16' if device == 'cuda' else 'none']
    ref, cached = os.path.join(tmp, 'pc_ref'), os.path.join(tmp, 'pc_cached')
    r = _pretrain('prefix_cache', ref, device, flags, 90, env=demo_env)
    if not r['ok']:
        return r
    r2 = _pretrain('prefix_cache_cached', cached, device, flags + ['--prefix_cache', os.path.join(tmp, 'pc_dir')],
                   90, env=demo_env)
    r['seconds'] += r2['seconds']
    if not r2['ok']:
        return _fail(r, f"cached run failed: {r2['stderr_tail'][-500:]}")
    a, b = _records(ref), _records(cached)
    r['losses'] = [[x.get('train_loss') for x in a], [x.get('train_loss') for x in b]]
    r['served_share'] = [x.get('prefix_cache_hit_share', 0) + x.get('prefix_cache_extend_share', 0) for x in b]
    wa, wb = (torch.load(os.path.join(d, 'checkpoint-last.pth'), map_location='cpu', weights_only=True)['model']
              for d in (ref, cached))
    r['bit_identical'] = r['losses'][0] == r['losses'][1] and all(torch.equal(wa[k], wb[k]) for k in wa)
    if not r['served_share'] or r['served_share'][-1] <= 0:
        return _fail(r, f"the cached run read no rows in its last epoch (served {r['served_share']})")
    return r if r['bit_identical'] else _fail(r, 'the cached run differs from the uncached one')


def _flops() -> Dict[str, object]:
    r = _run('flops', [PY, '-c', FLOPS_SNIPPET], 60)
    if r['ok']:
        vals = json.loads(r['stdout_tail'].strip().splitlines()[-1])
        r['total_fwd'] = vals
        if 'cuda' in vals and abs(vals['cuda'] - vals['cpu']) > 1e-6 * vals['cpu']:
            return _fail(r, f'CPU and CUDA FLOP plans differ: {vals}')
    return r


def _step(name, args, timeout, device, quick, tmp) -> Dict[str, object]:
    out = os.path.join(tmp, f'{name}.json')
    size = TINY + ['--batch_size', '4'] if quick else args
    r = _run(name, [PY, '-m', 'bench.pretrain_step', '--device', device, '--steps', '3', '--warmup', '1', *size,
                    '--json', out] + (['--compile'] if name == 'step_compile' else []), timeout)
    if r['ok'] and os.path.isfile(out):
        res = json.load(open(out))
        r.update({k: res.get(k) for k in ('model', 'batch_size', 'amp', 'img_per_s', 'step_ms', 'peak_mem_mb',
                                          'compile_first_step_s', 'compile_graphs')})
    return r


def _supply_demand(device: str, quick: bool, tmp: str) -> Dict[str, object]:
    import torch
    out = os.path.join(tmp, 'supply_demand.json')
    backends = ['pil', 'pil_prepared']
    try:
        import nvidia.dali  # noqa: F401
        backends += ['dali_cpu'] + (['dali_gpu'] if device == 'cuda' else [])
    except ImportError:
        pass
    cores = max(1, (os.cpu_count() or 1) // max(1, torch.cuda.device_count() if device == 'cuda' else 1))
    size = (TINY + ['--batch_size', '4', '--images', '8', '--supply_batches', '2', '--max_side', '64', '--steps', '1',
                    '--warmup', '0', '--rounds', '1', '--epochs', '2', '--warmup_epochs', '0', '--steps_per_epoch', '4']
            if quick else ['--model', 'MIM_vit_base_patch16', '--input_size', '224', '--batch_size', '64',
                           '--images', '512', '--supply_batches', '6', '--supply_cores', '1'])
    r = _run('supply_demand', [PY, '-m', 'bench.supply_demand', '--device', device, '--backends', ','.join(backends),
                               '--cores_per_gpu', str(cores), '--dir', os.path.join(tmp, 'supply'), '--json', out,
                               *size], 240)
    if r['ok'] and os.path.isfile(out):
        res = json.load(open(out))
        r.update({k: res.get(k) for k in ('supply', 'demand_step_ms', 'steps_in_state', 'flop_saving', 'table')})
    return r


def plan(args, tmp: str, device: str) -> List:
    q = args.quick
    vit_b = ['--model', 'MIM_vit_base_patch16', '--input_size', '224', '--batch_size', '64']
    demo_env = {'VITFREEZE_DEMO_DIR': os.path.join(tmp, 'demo')}
    return [
        ('ddp', lambda: _ddp(tmp, device, demo_env)),
        ('amp_bf16', lambda: _amp('amp_bf16', tmp, device, demo_env)),
        ('amp_fp16', lambda: _amp('amp_fp16', tmp, device, demo_env)),
        ('compile', lambda: _compile(tmp, device, demo_env)),
        ('finetune', lambda: _finetune(tmp, device, demo_env)),
        ('prefix_cache', lambda: _prefix_cache(tmp, device, demo_env)),
        ('flops', _flops),
        ('step_eager', lambda: _step('step_eager', vit_b, 45, device, q, tmp)),
        ('step_compile', lambda: _step('step_compile', vit_b, 180, device, q or device == 'cpu', tmp)),
        ('supply_demand', lambda: _supply_demand(device, q, tmp)),
    ]


def main(argv=None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False)
    p.add_argument('--json', default='gpu_check.json', help='output file (default: gpu_check.json)')
    p.add_argument('--parts', default=None, help='comma list of parts to run (default: all)')
    p.add_argument('--quick', action='store_true', help='tiny 32 px configs for the step parts (smoke run)')
    p.add_argument('--allow_cpu', action='store_true', help='run the parts on CPU when there is no GPU')
    p.add_argument('--timeout_scale', default=1.0, type=float,
                   help='multiply every part\'s time limit (default: 1; e.g. 10 for a --quick --allow_cpu dry run)')
    args = p.parse_args(argv)
    TIMEOUT_SCALE[0] = args.timeout_scale
    import torch
    cuda = torch.cuda.is_available()
    res: Dict[str, object] = {'cuda': cuda, 'torch': torch.__version__, 'started': time.strftime('%F %T'),
                              'gpu': torch.cuda.get_device_name(0) if cuda else None, 'parts': []}
    with tempfile.TemporaryDirectory() as tmp:
        parts = plan(args, tmp, 'cuda' if cuda else 'cpu')
        want = set(args.parts.split(',')) if args.parts else {n for n, _ in parts}
        unknown = want - {n for n, _ in parts}
        if unknown:
            print(f'error: --parts {",".join(sorted(unknown))}: choose from {",".join(n for n, _ in parts)}',
                  file=sys.stderr)
            sys.exit(2)
        for name, fn in parts:
            if name not in want:
                continue
            if not cuda and not args.allow_cpu:
                res['parts'].append({'part': name, 'skipped': 'no CUDA device'})
                continue
            r = fn()
            res['parts'].append(r)
            print(f"{name:<13} {'ok' if r['ok'] else 'FAILED (' + str(r.get('why') or 'rc ' + str(r.get('rc'))) + ')'}"
                  f"  {r['seconds']:.0f} s"
                  + (f"  {r['img_per_s']:.1f} img/s, peak {r['peak_mem_mb']:.0f} MiB" if r.get('img_per_s') else ''),
                  flush=True)
    res['seconds'] = sum(r.get('seconds', 0) for r in res['parts'])
    res['all_ok'] = all(r.get('ok', False) for r in res['parts'] if 'skipped' not in r)
    with open(args.json, 'w') as f:
        json.dump(res, f, indent=1)
    if not cuda:
        print(('no CUDA device: ran on CPU (--allow_cpu; fp16/bf16 run in fp32 there)' if args.allow_cpu else
               'no CUDA device: every part skipped') + f'; wrote {args.json}')
    return res


if __name__ == '__main__':
    main()
