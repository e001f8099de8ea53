"""One-run ratio: our LocalMIM training step vs the public LocalMIM code's, same shape, same batch, same process.

    git clone https://github.com/Haoqing-Wang/LocalMIM /tmp/LocalMIM     # or huawei-noah/Efficient-Computing
    python -m bench.vs_reference --reference_dir /tmp/LocalMIM/ViT --model MIM_vit_tiny_patch16 \
        --input_size 224 --batch_size 32 --threads 2 --steps 5 --json vs_ref.json

The reference code is imported from ``--reference_dir`` (its ``models_mim.py`` and its own ``util/pos_embed.py``,
loaded under private module names so our ``util`` package is untouched), never copied into this repository. Its
``MaskedAutoencoderViT`` is built with our model's encoder shape (it has no ViT-Ti factory; its decoders are
256-wide, 1 block, 8 heads as in its factories). One step on each side = forward (the reference returns its loss;
ours is ``LocalMIM.forward``, i.e. the masked-only decode) + backward + AdamW(0.9, 0.95) step (fused on both sides,
as run_pretrain.py builds it). Steps alternate A B A B … after ``--warmup`` steps each; medians and the ratio are
reported, with the process CPU time per step.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
import types
from functools import partial

if __name__ == '__main__' and not __package__:  # run as a file (python bench/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'bench.vs_reference', *sys.argv[1:]])

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench.pretrain_step import (add_alternating_args, add_model_args, build_model, loadavg,  # noqa: E402
                                 machine_info, make_batch)
from util.log import write_json  # noqa: E402


def load_reference(ref_dir: str) -> types.ModuleType:
    """Import ``<ref_dir>/models_mim.py`` with its ``from util.pos_embed import ...`` served by ``<ref_dir>/util``,
    then put our ``util`` modules back."""
    path = os.path.join(ref_dir, 'models_mim.py')
    pos = os.path.join(ref_dir, 'util', 'pos_embed.py')
    if not (os.path.isfile(path) and os.path.isfile(pos)):
        print(f'error: --reference_dir {ref_dir}: needs models_mim.py and util/pos_embed.py (the ViT/ folder of '
              f'Haoqing-Wang/LocalMIM)', file=sys.stderr)
        sys.exit(2)
    saved = {k: sys.modules.get(k) for k in ('util', 'util.pos_embed')}
    try:
        pkg = types.ModuleType('util')
        pkg.__path__ = [os.path.join(ref_dir, 'util')]
        spec = importlib.util.spec_from_file_location('util.pos_embed', pos)
        pe = importlib.util.module_from_spec(spec)
        sys.modules['util'], sys.modules['util.pos_embed'] = pkg, pe
        spec.loader.exec_module(pe)
        pkg.pos_embed = pe
        spec = importlib.util.spec_from_file_location('reference_models_mim', path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _NumpyAliases:
    """The reference's pos_embed uses ``np.float`` (removed in NumPy 1.24): alias it while the reference builds."""

    def __enter__(self):
        import numpy as np
        self.np, self.had = np, 'float' in np.__dict__
        if not self.had:
            np.float = float
        return self

    def __exit__(self, *exc):
        if not self.had:
            del self.np.float


def build_reference(mod, ours) -> nn.Module:
    """Its HOG cells are hard-coded 4/8/16/32 px, so only patch 16 and input sizes divisible by 32 work."""
    if ours.patch_size != 16 or ours.img_size % 32:
        print(f'error: the reference code needs --patch_size 16 and --input_size divisible by 32 (its HOG cells are '
              f'fixed at 4/8/16/32 px); got {ours.patch_size} / {ours.img_size}', file=sys.stderr)
        sys.exit(2)
    with _NumpyAliases():
        return _build_reference(mod, ours)


def _build_reference(mod, ours) -> nn.Module:
    return mod.MaskedAutoencoderViT(
        img_size=ours.img_size, patch_size=ours.patch_size, embed_dim=ours.embed_dim, depth=ours.depth,
        num_heads=ours.blocks[0].attn.num_heads, decoder_embed_dim=256, decoder_depth=1, decoder_num_heads=8,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), hog_nbins=ours.hog.nbins)


def step_fn(model, opt, imgs, mask_ratio, ours: bool):
    def step():
        out = model(imgs, mask_ratio=mask_ratio)
        loss = out['loss'] if ours else (out[0] if isinstance(out, (tuple, list)) else out)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_model_args(p)
    p.add_argument('--reference_dir', required=True, help='the ViT/ folder of a LocalMIM checkout')
    add_alternating_args(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ref_mod = load_reference(args.reference_dir)
    ours = build_model(args).train()
    ref = build_reference(ref_mod, ours).train()
    imgs = make_batch(args, torch.device('cpu'))
    sides = {}
    for name, m in (('ours', ours), ('reference', ref)):
        opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                                fused=True)
        sides[name] = step_fn(m, opt, imgs, args.mask_ratio, name == 'ours')
    wall = {k: [] for k in sides}
    cpu = {k: [] for k in sides}
    losses = {k: [] for k in sides}
    for i in range(args.warmup + args.steps):
        for k, fn in (sides.items() if i % 2 == 0 else reversed(list(sides.items()))):
            t, c = time.perf_counter(), time.process_time()
            losses[k].append(fn())
            if i >= args.warmup:
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    res = {'model': args.model, 'input_size': args.input_size, 'batch_size': args.batch_size,
           'threads': args.threads, 'steps': args.steps, 'machine': machine_info(torch.device('cpu'), args.threads),
           'ours_step_s': med['ours'], 'reference_step_s': med['reference'],
           'ours_img_per_s': args.batch_size / med['ours'], 'reference_img_per_s': args.batch_size / med['reference'],
           'speedup': med['reference'] / med['ours'],
           'cpu_speedup': statistics.median(cpu['reference']) / statistics.median(cpu['ours']),
           'ours_all_s': wall['ours'], 'reference_all_s': wall['reference'], 'losses': losses,
           'loadavg_at_end': loadavg()}
    print(f"{args.model} {args.input_size}px batch {args.batch_size}, {args.threads} threads, median of "
          f"{args.steps} alternating steps: ours {res['ours_img_per_s']:.2f} img/s, reference "
          f"{res['reference_img_per_s']:.2f} img/s -> {res['speedup']:.2f}x (CPU time {res['cpu_speedup']:.2f}x)")
    write_json(args.json, res)
    return res


if __name__ == '__main__':
    main()
