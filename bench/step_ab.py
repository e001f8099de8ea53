"""One-run ratios of the training step: the masked-only decode vs the full decode, and eager vs compiled regions.

    python -m bench.step_ab --model MIM_vit_tiny_patch16 --input_size 224 --batch_size 32 --threads 2 --steps 5
    python -m bench.step_ab --vs compile --model MIM_vit_tiny_patch16 --input_size 224 --batch_size 32 --steps 5

Separate processes on a shared VM drift by 10-20% in speed from one to the next (phases a change does not touch
move that much between two ``bench/pretrain_step.py`` runs), which is more than these effects; so here A and B train
in one process, alternating steps A B A B ... after ``--warmup`` steps of each (forward + backward + AdamW as
run_pretrain.py builds it). A = ``LocalMIM.forward`` as training runs it (eager, masked-only decode). B:

* ``--vs full_decode``: the same model with ``full_decode=True`` (every cell, the visualisation's path); also the
  FLOP ratio of the two (``torch.utils.flop_counter``).
* ``--vs compile``: a copy of the model after ``LocalMIM.compile_regions(backend=...)`` (what ``run_pretrain.py
  --compile`` does), with its own optimizer; the first compiled step's seconds are reported as the compile time.
"""
import argparse
import copy
import os
import statistics
import sys
import time

if __name__ == '__main__' and not __package__:  # run as a file (python bench/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'bench.step_ab', *sys.argv[1:]])

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.pretrain_step import (add_alternating_args, add_model_args, build_model, loadavg,  # noqa: E402
                                 machine_info, make_batch, make_optimizer)
from util.log import write_json  # noqa: E402


def train_step(model, opt, x, mask_ratio: float, full: bool) -> float:
    """One optimizer step; returns its wall seconds."""
    t = time.perf_counter()
    loss = model(x, mask_ratio=mask_ratio, full_decode=full)['loss']
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def flops(model, x, mask_ratio: float, full: bool) -> int:
    with FlopCounterMode(display=False) as fc:
        model(x, mask_ratio=mask_ratio, full_decode=full)['loss'].backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_model_args(p)
    p.add_argument('--vs', default='full_decode', choices=['full_decode', 'compile'],
                   help='what B is: the full decode, or the compiled regions (default: full_decode)')
    p.add_argument('--compile_backend', default='inductor', help='with --vs compile (default: inductor)')
    p.add_argument('--decoder_embed_dim', default=256, type=int, help='stage decoder width (default: 256)')
    add_alternating_args(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device('cpu')
    model_a = build_model(args).train()
    x = make_batch(args, device)
    res = {'machine': machine_info(device, args.threads), 'args': vars(args)}
    if args.vs == 'compile':
        model_b = copy.deepcopy(model_a)
        model_b.compile_regions(backend=args.compile_backend)
        full_b = False
    else:
        model_b, full_b = model_a, True
        res['flop_ratio'] = flops(model_a, x, args.mask_ratio, True) / flops(model_a, x, args.mask_ratio, False)
    opt_a = make_optimizer(model_a)  # as run_pretrain.py builds it
    opt_b = opt_a if model_b is model_a else make_optimizer(model_b)
    if args.vs == 'compile':
        res['compile_first_step_s'] = train_step(model_b, opt_b, x, args.mask_ratio, full_b)
    times = {'a': [], 'b': []}
    for i in range(args.warmup + args.steps):
        for side, model, opt, full in (('a', model_a, opt_a, False), ('b', model_b, opt_b, full_b)):
            dt = train_step(model, opt, x, args.mask_ratio, full)
            if i >= args.warmup:
                times[side].append(dt)
    a, b = statistics.median(times['a']), statistics.median(times['b'])
    # speedup: of the training path over the full decode, or of the compiled regions over eager
    speedup = b / a if args.vs == 'full_decode' else a / b
    res.update(a_step_s=a, b_step_s=b, speedup=speedup, a_steps_s=times['a'], b_steps_s=times['b'],
               loadavg_at_end=loadavg())
    na, nb = (('masked-only', 'full decode') if args.vs == 'full_decode'
              else ('eager', f'compiled ({args.compile_backend})'))
    faster = na if args.vs == 'full_decode' else nb
    line = (f"{args.model} {args.input_size}px batch {args.batch_size}, {args.threads} threads, median of "
            f"{args.steps} alternating steps: {na} {args.batch_size / a:.2f} img/s, {nb} {args.batch_size / b:.2f} "
            f"img/s -> {faster}: {speedup:.3f}x")
    if 'flop_ratio' in res:
        line += f" (FLOP ratio {res['flop_ratio']:.3f}x)"
    if 'compile_first_step_s' in res:
        line += f"; first compiled step {res['compile_first_step_s']:.1f} s"
    print(line)
    write_json(args.json, res)
    return res


if __name__ == '__main__':
    main()
