"""Checkpoint save and load time at a real size: a LocalMIM pre-training checkpoint (model + AdamW state).

    python bench/checkpoint_io.py --json ckpt_io.json                      # MIM_vit_base_patch16, 224 px
    python bench/checkpoint_io.py --model MIM_vit_large_patch16 --dir /local/ssd/tmp

Builds the model, fills AdamW's state with one step (exp_avg / exp_avg_sq: a training checkpoint is ~3x the
weights), then times each of these ``--repeat`` times in one process and reports the median (seconds):

    digest_legacy_s  ``state_digest(ckpt, 'sha256')``: the version-2 checksum, one sequential pass on one core
    digest_s         ``state_digest(ckpt)``: the tree checksum (16 MiB pieces hashed by a thread pool)
    save_s           ``util.checkpoint.save_checkpoint`` of one file: RNG gather, finite check, copy to the CPU,
                     checksum, ``torch.save`` + fsync, rename
    read_s           ``torch.load(weights_only=True)`` alone
    load_s           ``util.checkpoint.load_checkpoint``: the read + checksum + finite-weights check (in a process
                     group only rank 0 verifies; the other ranks' load is ``read_s`` plus one small collective)

plus the file size (MB) and the digest throughput (GB/s). The saved file is loaded back and compared bit for bit
(``roundtrip_ok``). Page cache: the file was just written, so ``read_s`` is usually a cache read; pass ``--dir`` on
the file system the checkpoints go to.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

if __name__ == '__main__' and not __package__:  # run as a file (python bench/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'bench.checkpoint_io', *sys.argv[1:]])

import torch  # noqa: E402

import models_mim  # noqa: E402
from util.args import ArgumentParser  # noqa: E402
from util.checkpoint import LAST_NAME, load_checkpoint, save_checkpoint, state_digest  # noqa: E402
from util.log import write_json  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser('checkpoint save/load time', add_help=True)
    p.add_argument('--model', default='MIM_vit_base_patch16', choices=models_mim.MODEL_NAMES,
                   help='pre-training model whose checkpoint is timed (default: MIM_vit_base_patch16)')
    p.add_argument('--input_size', default=224, type=int, help='image size in pixels (default: 224)')
    p.add_argument('--patch_size', default=None, type=int, help="patch size in pixels (default: the model's)")
    p.add_argument('--embed_dim', default=None, type=int, help="encoder width (default: the model's)")
    p.add_argument('--depth', default=None, type=int, help="encoder blocks (default: the model's)")
    p.add_argument('--num_heads', default=None, type=int, help="attention heads (default: the model's)")
    p.add_argument('--decoder_embed_dim', default=256, type=int, help='stage decoder width (default: 256)')
    p.add_argument('--repeat', default=3, type=int, help='timed repetitions of each operation (default: 3)')
    p.add_argument('--dir', default=None, type=str,
                   help='folder to write the checkpoint in (default: a temporary folder, removed afterwards)')
    p.add_argument('--json', default=None, type=str, help='write the results to this JSON file (default: none)')
    return p


def training_state(args: argparse.Namespace) -> Dict[str, Any]:
    """What run_pretrain.py hands save_checkpoint: model and AdamW state after one step, scaler, step, freezeout."""
    torch.manual_seed(0)
    model = models_mim.create_model(args.model, img_size=args.input_size, patch_size=args.patch_size,
                                    embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
                                    decoder_embed_dim=args.decoder_embed_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    return {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'scaler': None, 'step': 1,
            'freezeout': {}}


def timed(fn: Callable[[], Any], repeat: int) -> List[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def bench(args: argparse.Namespace, folder: str) -> Dict[str, Any]:
    state = training_state(args)
    run_args = argparse.Namespace(output_dir=folder, run_id='bench', keep_last=0, model=args.model, seed=0)
    path = os.path.join(folder, LAST_NAME)
    save_s = timed(lambda: save_checkpoint(folder, 0, state, run_args, numbered=False), args.repeat)
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    read_s = timed(lambda: torch.load(path, map_location='cpu', weights_only=True), args.repeat)
    load_s = timed(lambda: load_checkpoint(path), args.repeat)
    digest_s = timed(lambda: state_digest(ckpt), args.repeat)
    legacy_s = timed(lambda: state_digest(ckpt, 'sha256'), args.repeat)
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(ckpt))
    med = statistics.median
    return {
        'model': args.model, 'input_size': args.input_size,
        'params_m': sum(t.numel() for t in state['model'].values()) / 1e6,
        'file_mb': os.path.getsize(path) / 2 ** 20, 'tensor_mb': nbytes / 2 ** 20,
        'save_s': med(save_s), 'read_s': med(read_s), 'load_s': med(load_s), 'digest_s': med(digest_s),
        'digest_legacy_s': med(legacy_s), 'digest_gb_per_s': nbytes / 1e9 / max(med(digest_s), 1e-9),
        'digest_legacy_gb_per_s': nbytes / 1e9 / max(med(legacy_s), 1e-9),
        'roundtrip_ok': same(ckpt['model'], state['model']) and same(ckpt['optimizer'], state['optimizer']),
        'repeat': args.repeat, 'cpus': os.cpu_count(), 'all': {'save_s': save_s, 'read_s': read_s,
                                                                'load_s': load_s, 'digest_s': digest_s,
                                                                'digest_legacy_s': legacy_s},
    }


def _tensors(x: Any) -> List[torch.Tensor]:
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def main(args: argparse.Namespace) -> Dict[str, Any]:
    if args.repeat < 1:
        raise SystemExit(f'error: --repeat {args.repeat}: must be >= 1')
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
        res = bench(args, args.dir)
    else:
        with tempfile.TemporaryDirectory(prefix='ckpt_io_') as d:
            res = bench(args, d)
    print(f"{res['model']} ({res['params_m']:.1f} M weights): checkpoint {res['file_mb']:.0f} MB; "
          f"save {res['save_s']:.2f} s, load {res['load_s']:.2f} s (read alone {res['read_s']:.2f} s); checksum "
          f"{res['digest_s']:.2f} s ({res['digest_gb_per_s']:.2f} GB/s, tree) vs {res['digest_legacy_s']:.2f} s "
          f"({res['digest_legacy_gb_per_s']:.2f} GB/s, sequential); round trip "
          f"{'bit-exact' if res['roundtrip_ok'] else 'DIFFERS'}", flush=True)
    if args.json:
        write_json(args.json, res)
    return res


if __name__ == '__main__':
    main(get_args_parser().parse_args())
