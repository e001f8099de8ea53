"""The GPU check: everything CUDA-specific, in one run of under 5 minutes, into one JSON.

    python -m bench.gpu_check --json gpu_check.json          # on a machine with a CUDA GPU

Parts (each a subprocess with its own time limit; a failing part is recorded, the others still run):

    tests        the tests that exercise CUDA paths when a GPU is present (AMP, k-NN device code, bench smoke)
    amp_bf16     one bench/pretrain_step.py step at --amp bf16 (ViT-Ti/16 224 px, batch 32)
    amp_fp16     the same at --amp fp16 (GradScaler)
    ddp_nccl     torchrun --nproc_per_node=1 run_pretrain.py --dist_backend nccl on generated demo data with
                 FreezeOut set so that units freeze during the run; passes when it exits 0, logged freeze events
    step_eager   bench/pretrain_step.py ViT-B/16 224 px batch 64, eager: img/s, peak memory
    step_compile the same with --compile (inductor): img/s, peak memory, compile time of the first step

Without CUDA it writes ``{"cuda": false, ...}`` with every part marked skipped and exits 0 (so CI can run it).
``--quick`` shrinks every part to the tiny 32 px config (a smoke run of the check itself, also on CPU with
``--allow_cpu``).
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


TIMEOUT_SCALE = [1.0]  # --timeout_scale (a CPU smoke run of the check is far slower than the GPU it is sized for)


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


def _step(name, args, timeout, device, quick, tmp) -> Dict[str, object]:
    out = os.path.join(tmp, f'{name}.json')
    size = TINY + ['--batch_size', '4'] if quick else args
    r = _run(name, [PY, '-m', 'bench.pretrain_step', '--device', device, '--steps', '3', '--warmup', '1', *size,
                    '--json', out] + (['--amp', name.split('_')[1]] if name.startswith('amp_') else [])
             + (['--compile'] if name == 'step_compile' else []), timeout)
    if r['ok'] and os.path.isfile(out):
        res = json.load(open(out))
        r.update({k: res.get(k) for k in ('model', 'batch_size', 'amp', 'img_per_s', 'step_ms', 'peak_mem_mb',
                                          'compile_first_step_s', 'compile_graphs')})
    return r


def _ddp(r: Dict[str, object]) -> Dict[str, object]:
    """A DDP run passes when it exits 0 *and* crossed at least one freeze event (DDP re-wrapped)."""
    r['freeze_events'] = r.pop('freeze_lines') if r['ok'] else 0
    r['ok'] = bool(r['ok'] and r['freeze_events'] > 0)
    return r


def plan(args, tmp: str, device: str) -> List:
    q = args.quick
    vit_ti = ['--model', 'MIM_vit_tiny_patch16', '--input_size', '224', '--batch_size', '32']
    vit_b = ['--model', 'MIM_vit_base_patch16', '--input_size', '224', '--batch_size', '64']
    demo = os.path.join(tmp, 'demo')
    ddp = [PY, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', 'run_pretrain.py', '--dist_backend',
           'nccl' if device == 'cuda' else 'gloo', '--device', device, '--demo', '--epochs', '2', '--t_0', '0.3',
           '--how_scale', 'linear', '--knn_eval_freq', '0', '--vis_freq', '0', '--output_dir',
           os.path.join(tmp, 'ddp'), '--log_dir', os.path.join(tmp, 'ddp', 'tb')]
    return [
        ('tests', lambda: _run('tests', [PY, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider',
                                         'tests/test_masked_decode.py', 'tests/test_compile.py', '-m',
                                         'not slow'], 90)),
        ('amp_bf16', lambda: _step('amp_bf16', vit_ti, 45, device, q, tmp)),
        ('amp_fp16', lambda: _step('amp_fp16', vit_ti, 45, device, q, tmp)),
        ('ddp_nccl', lambda: _ddp(_run('ddp_nccl', ddp, 75, env={'VITFREEZE_DEMO_DIR': demo}))),
        ('step_eager', lambda: _step('step_eager', vit_b, 45, device, q, tmp)),
        ('step_compile', lambda: _step('step_compile', vit_b, 180, device, q, tmp)),
    ]


def main(argv=None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--json', default='gpu_check.json', help='output file (default: gpu_check.json)')
    p.add_argument('--parts', default=None, help='comma list of parts to run (default: all)')
    p.add_argument('--quick', action='store_true', help='tiny 32 px configs everywhere (smoke run of the check)')
    p.add_argument('--allow_cpu', action='store_true', help='run the parts on CPU when there is no GPU (with --quick)')
    p.add_argument('--timeout_scale', default=1.0, type=float,
                   help='multiply every part\'s time limit (default: 1; e.g. 10 for a --quick --allow_cpu smoke run)')
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
            if not cuda and (not args.allow_cpu or name == 'amp_fp16'):
                res['parts'].append({'part': name, 'skipped': 'no CUDA device'})
                continue
            r = fn()
            res['parts'].append(r)
            print(f"{name:<13} {'ok' if r['ok'] else 'FAILED (rc ' + str(r['rc']) + ')'}  {r['seconds']:.0f} s"
                  + (f"  {r['img_per_s']:.1f} img/s, peak {r['peak_mem_mb']:.0f} MiB" if r.get('img_per_s') else ''))
    res['seconds'] = sum(r.get('seconds', 0) for r in res['parts'])
    res['all_ok'] = all(r.get('ok', False) for r in res['parts'] if 'skipped' not in r)
    with open(args.json, 'w') as f:
        json.dump(res, f, indent=1)
    if not cuda:
        print(('no CUDA device: ran on CPU (--allow_cpu), amp_fp16 skipped' if args.allow_cpu else
               'no CUDA device: every part skipped') + f'; wrote {args.json}')
    return res


if __name__ == '__main__':
    main()
