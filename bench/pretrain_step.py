"""Training-step throughput and breakdown of LocalMIM pre-training (+ our HOG targets vs the reference design).

    python -m bench.pretrain_step --model MIM_vit_tiny_patch16 --input_size 224 --batch_size 32 --threads 2 \
        --steps 5 --compare_hog_reference --json out.json

One step = what ``engine_pretrain.train_one_epoch`` does per iteration, split into timed phases:

    data     copy of a pre-made CPU batch to the device (a no-op on CPU, pinned + non_blocking on CUDA)
    targets  ``model.compute_targets(imgs, active_stages)`` (the --target's values, no grad; HOG: fp32)
    encoder  ``model.forward_encoder(imgs, mask_ratio)``   (patch embed, masking, blocks, stage norms)
    decoders ``model.decode`` (the active stage decoders, masked tokens only where exact) + masked MSE per stage
             + weighted sum
    backward ``loss.backward()``
    optim    ``AdamW.step()`` + ``zero_grad(set_to_none=True)`` (timm param_groups_weight_decay, betas 0.9/0.95)

The phases reproduce ``LocalMIM.forward`` exactly (checked once at start-up: same loss for the same RNG state).
Each number is the median over ``--steps`` steps after ``--warmup`` steps. On CUDA every phase boundary is a
``torch.cuda.synchronize()`` (only there: on CPU the ops are synchronous anyway). Peak memory is the process's peak
RSS on CPU (``resource.getrusage``, includes the Python/torch runtime) and ``torch.cuda.max_memory_allocated`` on
CUDA.

``--compare_hog_reference``: a reference-style HOG (LocalMIM's ``HOGLayer`` design, written here and nowhere else:
per stage and per colour channel a reflect-padded Sobel conv2d, magnitude, atan2, floor-mod binning, a
full-resolution one-hot scatter [B, nb, H, W], ``AvgPool2d`` per stage, L2 normalisation, R/G/B concatenation) is
timed against ``model.hog`` in the same run, interleaved (A B A B ...), on the same batch; both timings, the ratio and
the max abs difference of the targets are reported.
"""
import argparse
import math
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence

if __name__ == '__main__' and not __package__:  # run as a file (python bench/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'bench.pretrain_step', *sys.argv[1:]])

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models_mim  # noqa: E402
import targets as targets_lib  # noqa: E402
from util.log import write_json  # noqa: E402

PHASES = ['data', 'targets', 'encoder', 'decoders', 'backward', 'optim']


# ---------------------------------------------------------------------------------------------------------------------
# helpers shared by the other bench scripts


def machine_info(device: torch.device, threads: int) -> Dict[str, object]:
    cpu = platform.processor() or ''
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    info = {'cpu': cpu, 'cpu_count': os.cpu_count(), 'threads': threads, 'torch': torch.__version__,
            'device': str(device), 'python': platform.python_version(), 'loadavg_at_start': loadavg()}
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def loadavg() -> Optional[List[float]]:
    """1/5/15-minute load averages (how busy the shared machine was), None where unavailable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == 'cuda':
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == 'darwin' else r / 1024.0


def build_model(args: argparse.Namespace) -> models_mim.LocalMIM:
    model = models_mim.create_model(args.model, img_size=args.input_size, patch_size=args.patch_size,
                                    embed_dim=getattr(args, 'embed_dim', None), depth=getattr(args, 'depth', None),
                                    num_heads=getattr(args, 'num_heads', None), hog_nbins=args.hog_nbins,
                                    decoder_embed_dim=getattr(args, 'decoder_embed_dim', None) or 256,
                                    target=getattr(args, 'target', None), target_options=vars(args))
    hog_only = [f for f, on in (('--hog_impl hypot', getattr(args, 'hog_impl', 'ours') == 'hypot'),
                                ('--compare_hog_reference', getattr(args, 'compare_hog_reference', False)),
                                ('--hog_profile', getattr(args, 'hog_profile', False))) if on]
    if hog_only and not isinstance(model.target, targets_lib.HOGTarget):
        from util.errors import UserError
        raise UserError(f'{hog_only[0]} measures the HOG target; drop it or use --target hog')
    if getattr(args, 'hog_impl', 'ours') == 'hypot':
        model.target.hog = hypot_hog_for(model)  # bench-only: measure the proposed fix in the whole step
    return model


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', default='MIM_vit_tiny_patch16', choices=models_mim.MODEL_NAMES)
    p.add_argument('--input_size', default=224, type=int)
    p.add_argument('--patch_size', default=None, type=int, help="default: the model's")
    p.add_argument('--depth', default=None, type=int, help="encoder depth override (default: the model's)")
    p.add_argument('--embed_dim', default=None, type=int, help="encoder width override (default: the model's)")
    p.add_argument('--num_heads', default=None, type=int, help="heads override (default: the model's)")
    p.add_argument('--hog_nbins', default=9, type=int)
    p.add_argument('--target', default='hog',
                   help='reconstruction target: a registered name (hog, pixel) or module:Class (default: hog)')
    p.add_argument('--mask_ratio', default=0.75, type=float)
    p.add_argument('--batch_size', default=32, type=int)
    p.add_argument('--threads', default=2, type=int, help='torch intra-op threads (default: 2)')
    p.add_argument('--seed', default=0, type=int)
    p.add_argument('--hog_impl', default='ours', choices=['ours', 'hypot'],
                   help="'hypot': swap model.hog for our HOGTargets with the proposed hypot-magnitude fix "
                        "(bench only; measures the fix's effect on the whole step) (default: ours)")


def add_alternating_args(p: argparse.ArgumentParser) -> None:
    """--steps/--warmup/--json of the benches that alternate two sides A B A B ... in one process."""
    p.add_argument('--steps', default=5, type=int, help='timed steps of each side (median) (default: 5)')
    p.add_argument('--warmup', default=1, type=int, help='untimed steps of each side first (default: 1)')
    p.add_argument('--json', default=None, help='also write the result to this JSON file')


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float('nan')


def make_batch(args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """A pre-made normalised-image-like CPU batch with real edges (smooth noise + stripes), pinned for CUDA."""
    g = torch.Generator().manual_seed(args.seed)
    b, s = args.batch_size, args.input_size
    x = torch.randn(b, 3, s // 8 or 1, s // 8 or 1, generator=g)
    x = F.interpolate(x, size=(s, s), mode='bilinear', align_corners=False)
    yy = torch.arange(s).view(1, 1, s, 1).float()
    x = x + torch.sin(yy * 0.7 + torch.arange(b).view(b, 1, 1, 1)) * 0.5
    x = x + 0.1 * torch.randn(b, 3, s, s, generator=g)
    x = x.contiguous()
    if device.type == 'cuda':
        x = x.pin_memory()
    return x


# ---------------------------------------------------------------------------------------------------------------------
# the reference-style HOG (LocalMIM's HOGLayer design), bench/test code only


class ReferenceStyleHOG(nn.Module):
    """LocalMIM's target design, literally: one HOG layer per stage, applied per colour channel.

    Per stage k (cell c_k) and channel: Conv2d(1, 2, 3, padding=1, padding_mode='reflect') with Sobel weights,
    magnitude = ||g||_2 over the 2 channels, phase = atan2(g0, g1), bin = floor(phase / pi * nb) mod nb, a zero
    [B, nb, H, W] float32 tensor scattered with the magnitude at each pixel's bin, AvgPool2d(c_k), F.normalize over
    the bins; R, G, B concatenated to [B, 3·nb, H/c, W/c] and flattened to [B, cells, 3·nb].
    """

    def __init__(self, nbins: int, cell_sizes: Sequence[int], biases: Optional[torch.Tensor] = None):
        super().__init__()
        self.nbins = nbins
        sobel = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
        self.convs = nn.ModuleList()
        self.pools = nn.ModuleList()
        for k, c in enumerate(cell_sizes):
            conv = nn.Conv2d(1, 2, kernel_size=3, stride=1, padding=1, padding_mode='reflect',
                             bias=biases is not None)
            conv.weight.data = torch.stack([sobel, sobel.t()]).unsqueeze(1)
            if biases is not None:
                conv.bias.data = biases[k].clone().float()
            conv.requires_grad_(False)
            self.convs.append(conv)
            self.pools.append(nn.AvgPool2d(c, stride=c, padding=0, ceil_mode=False, count_include_pad=True))

    def _layer(self, k: int, x: torch.Tensor) -> torch.Tensor:
        g = self.convs[k](x)                                   # [B, 2, H, W]
        mag = g.norm(dim=1)                                    # [B, H, W]
        phase = torch.atan2(g[:, 0, :, :], g[:, 1, :, :])
        phase_int = torch.floor(phase / math.pi * self.nbins)
        phase_int = phase_int.long() % self.nbins              # floor-mod: negative angles wrap
        b, _, h, w = x.shape
        out = torch.zeros((b, self.nbins, h, w), dtype=torch.float32, device=x.device)
        out.scatter_(1, phase_int.unsqueeze(1), mag.unsqueeze(1))
        out = self.pools[k](out)
        return F.normalize(out, p=2, dim=1)

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor, stages: Sequence[int]) -> Dict[int, torch.Tensor]:
        out = {}
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            imgs = imgs.float()
            for k in stages:
                feats = [self._layer(k, imgs[:, ch:ch + 1]) for ch in range(imgs.shape[1])]
                hog = torch.cat(feats, dim=1)                  # [B, 3·nb, h, w], R then G then B
                out[k] = hog.flatten(2).transpose(1, 2)        # [B, h·w, 3·nb]
        return out


class HypotHOG(models_mim.HOGTargets):
    """Our HOGTargets with one change, the proposed fix: magnitude by ``torch.hypot(g0, g1)`` instead of
    ``torch.linalg.vector_norm(gxy, dim=1)`` (a strided reduction over a size-2 dim that is ~50x slower on CPU)."""

    def _bins(self, gxy, bias):
        if bias is not None:
            gxy = gxy + bias.view(1, 2, 1, 1)
        mag = torch.hypot(gxy[:, 0], gxy[:, 1])
        phase = torch.atan2(gxy[:, 0], gxy[:, 1])
        bins = torch.floor(phase / math.pi * self.nbins).long().remainder_(self.nbins)
        return mag, bins


def hypot_hog_for(model: models_mim.LocalMIM) -> HypotHOG:
    h = HypotHOG(model.hog.nbins, model.hog.cell_sizes, bias=model.hog.bias is not None)
    if model.hog.bias is not None:
        h.bias.copy_(model.hog.bias)
    return h


def reference_hog_for(model: models_mim.LocalMIM) -> ReferenceStyleHOG:
    return ReferenceStyleHOG(model.hog.nbins, model.hog.cell_sizes, model.hog.bias)


def hog_max_abs_diff(a: Dict[int, torch.Tensor], b: Dict[int, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# the instrumented step


def make_optimizer(model: nn.Module, lr: float = 1.5e-4, weight_decay: float = 0.05,
                   impl: str = 'default') -> torch.optim.Optimizer:
    """AdamW as run_pretrain.py builds it (timm param_groups_weight_decay, betas 0.9/0.95); ``impl`` = default |
    foreach | fused selects torch's implementation (default = what run_pretrain.py gets: the per-tensor loop on CPU)."""
    from timm.optim import param_groups_weight_decay
    kw = {'foreach': {'foreach': True}, 'fused': {'fused': True}}.get(impl, {})
    return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay), lr=lr, betas=(0.9, 0.95), **kw)


def phased_forward(model: models_mim.LocalMIM, imgs: torch.Tensor, mask_ratio: float, amp,
                   clock: Optional[Callable[[str], None]] = None, full_decode: bool = False) -> torch.Tensor:
    """``LocalMIM.forward`` split into targets / encoder / decoders (its own methods, same order, same RNG use)."""
    tick = clock or (lambda name: None)
    with amp.autocast():
        targets = model.compute_targets(imgs, model.active_stages())
    tick('targets')
    with amp.autocast():
        latents, mask, ids_restore = model.forward_encoder(imgs, mask_ratio)
    tick('encoder')
    with amp.autocast():
        losses, _ = model.decode(latents, mask, ids_restore, targets, mask_ratio, full_decode)
        loss = model.total_loss(losses, imgs)
    tick('decoders')
    return loss


def timed_step(model, optimizer, cpu_batch, device, amp, mask_ratio, sync, full_decode: bool = False
               ) -> Dict[str, float]:
    times: Dict[str, float] = {}
    last = [time.perf_counter()]
    last_cpu = [time.process_time()]

    def tick(name: str) -> None:
        sync()
        now, now_cpu = time.perf_counter(), time.process_time()
        times[name] = (now - last[0]) * 1e3
        times['cpu_' + name] = (now_cpu - last_cpu[0]) * 1e3
        last[0], last_cpu[0] = now, now_cpu

    sync()
    flt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu0 = last_cpu[0] = time.process_time()
    start = last[0] = time.perf_counter()
    imgs = cpu_batch.to(device, non_blocking=True)
    tick('data')
    loss = phased_forward(model, imgs, mask_ratio, amp, tick, full_decode)
    if amp.scaler is not None:
        amp.scaler.scale(loss).backward()
    else:
        loss.backward()
    tick('backward')
    if amp.scaler is not None:
        amp.scaler.step(optimizer)
        amp.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tick('optim')
    times['step'] = (last[0] - start) * 1e3
    times['cpu'] = (time.process_time() - cpu0) * 1e3  # CPU time of the whole process (all threads)
    # minor page faults: fresh pages the allocator had to map (glibc hands big blocks back to the kernel on free)
    times['minflt'] = float(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt0)
    return times


def check_decomposition(model, imgs, mask_ratio, amp, full_decode: bool = False) -> float:
    """|loss(phased) - loss(model.forward)| for the same RNG state (must be 0)."""
    with torch.no_grad():
        with torch.random.fork_rng(devices=[imgs.device] if imgs.device.type == 'cuda' else []):
            torch.manual_seed(1234)
            a = phased_forward(model, imgs, mask_ratio, amp, full_decode=full_decode)
        with torch.random.fork_rng(devices=[imgs.device] if imgs.device.type == 'cuda' else []):
            torch.manual_seed(1234)
            with amp.autocast():
                b = model(imgs, mask_ratio=mask_ratio, full_decode=full_decode)['loss']
    return float((a.float() - b.float()).abs())


def compare_hog(model, imgs, steps: int, warmup: int, sync) -> Dict[str, object]:
    """Reference-style vs our HOG (and ours + the hypot fix) on the same batch, interleaved A B C A B C ...;
    medians in ms, ratios, max abs differences against the reference."""
    ref = reference_hog_for(model).to(imgs.device)
    fast = hypot_hog_for(model).to(imgs.device)
    stages = list(range(len(model.hog.cell_sizes)))
    acc: Dict[str, List[float]] = {'ref': [], 'ours': [], 'hypot': []}
    fns = {'ref': ref, 'ours': model.hog, 'hypot': fast}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn(imgs, stages)
            sync()
            if i >= warmup:
                acc[name].append((time.perf_counter() - t) * 1e3)
    r_out = ref(imgs, stages)
    o, r, h = median(acc['ours']), median(acc['ref']), median(acc['hypot'])
    return {'hog_ours_ms': o, 'hog_ref_ms': r, 'hog_speedup': r / o if o > 0 else float('nan'),
            'hog_max_abs_diff': hog_max_abs_diff(model.hog(imgs, stages), r_out),
            'hog_hypot_ms': h, 'hog_hypot_speedup': r / h if h > 0 else float('nan'),
            'hog_hypot_max_abs_diff': hog_max_abs_diff(fast(imgs, stages), r_out),
            'hog_ours_all_ms': acc['ours'], 'hog_ref_all_ms': acc['ref'], 'hog_hypot_all_ms': acc['hypot'],
            'hog_stages': stages}


def hog_profile(model, imgs, reps: int = 2, top: int = 8) -> List[Dict[str, object]]:
    """torch.profiler's top ops (self CPU time) of ``model.hog`` on ``imgs``."""
    from torch.profiler import ProfilerActivity, profile
    stages = list(range(len(model.hog.cell_sizes)))
    model.hog(imgs, stages)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            model.hog(imgs, stages)
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev) or 1.0
    return [{'op': e.key, 'self_ms_per_call_of_hog': e.self_cpu_time_total / 1e3 / reps,
             'share': e.self_cpu_time_total / total} for e in ev[:top]]


def run(args: argparse.Namespace) -> Dict[str, object]:
    from util.amp import make_amp
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    sync = sync_fn(device)
    model = build_model(args).to(device)
    model.train(True)
    optimizer = make_optimizer(model, impl=args.adamw)
    amp = make_amp(device, args.amp)
    cpu_batch = make_batch(args, device)
    rss_model_mb = peak_rss_mb()
    decomposition_err = check_decomposition(model, cpu_batch.to(device), args.mask_ratio, amp, args.full_decode)
    compile_info: Dict[str, object] = {}
    if args.compile or args.compile_hog:
        from util import compile as uc
        uc.check_toolchain(args.compile_backend, device)
        before = uc.stats()
        if args.compile:
            model.compile_regions(backend=args.compile_backend, targets=args.compile_hog)
        else:
            model.target.compile_regions(backend=args.compile_backend)
        t = time.perf_counter()
        timed_step(model, optimizer, cpu_batch, device, amp, args.mask_ratio, sync, args.full_decode)
        after = uc.stats()
        compile_info = {'compile_first_step_s': time.perf_counter() - t,
                        'compile_graphs': after['graphs'] - before['graphs'],
                        'compile_dynamo_s': after['seconds'] - before['seconds']}
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    samples: List[Dict[str, float]] = []
    for i in range(args.warmup + args.steps):
        t = timed_step(model, optimizer, cpu_batch, device, amp, args.mask_ratio, sync, args.full_decode)
        if i >= args.warmup:
            samples.append(t)
    res: Dict[str, object] = {
        'hog_impl': args.hog_impl, 'adamw': args.adamw, 'full_decode': args.full_decode, 'model': args.model, 'input_size': args.input_size, 'patch_size': model.patch_size, 'depth': model.depth,
        'embed_dim': model.embed_dim, 'batch_size': args.batch_size, 'threads': args.threads,
        'steps': args.steps, 'warmup': args.warmup, 'amp': amp.name, 'mask_ratio': args.mask_ratio,
        'target': targets_lib.target_name(model.target), 'cells': model.cell_sizes, 'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
        'machine': machine_info(device, args.threads), 'decomposition_abs_err': decomposition_err,
        'compile': args.compile, 'compile_hog': args.compile_hog, 'compile_backend': args.compile_backend,
        **compile_info}
    for ph in PHASES + ['step', 'cpu', 'minflt'] + [f'cpu_{x}' for x in PHASES]:
        res[f'{ph}_ms'] = median([s[ph] for s in samples])
        res[f'{ph}_all_ms'] = [s[ph] for s in samples]
    res['img_per_s'] = args.batch_size / (res['step_ms'] / 1e3)
    if device.type == 'cuda':
        res['peak_mem_mb'] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        res['peak_mem_kind'] = 'cuda max_memory_allocated'
    else:
        res['peak_mem_mb'] = peak_rss_mb()
        res['peak_mem_kind'] = 'peak RSS of the process'
        res['rss_after_model_mb'] = rss_model_mb
    if args.compare_hog_reference:
        res.update(compare_hog(model, cpu_batch.to(device), args.hog_steps or args.steps, 1, sync))
    if args.hog_profile:
        res['hog_profile'] = hog_profile(model, cpu_batch.to(device))
    res['loadavg_at_end'] = loadavg()
    return res


def print_table(r: Dict[str, object]) -> None:
    m = r['machine']
    print(f"{r['model']} {r['input_size']}px patch {r['patch_size']} depth {r['depth']}  batch {r['batch_size']}  "
          f"{r['threads']} threads  {r['amp']}  on {m['device']} ({m['cpu']}, {m['cpu_count']} cores)  "
          f"median of {r['steps']} steps after {r['warmup']} warm-up; decode "
          f"{'full (every cell)' if r.get('full_decode') else 'masked tokens only'}")
    print(f"{'phase':<10} {'wall ms':>10} {'share':>7} {'CPU ms':>10} {'share':>7}")
    for ph in PHASES:
        print(f"{ph:<10} {r[ph + '_ms']:>10.1f} {100 * r[ph + '_ms'] / r['step_ms']:>6.1f}% "
              f"{r['cpu_' + ph + '_ms']:>10.1f} {100 * r['cpu_' + ph + '_ms'] / r['cpu_ms']:>6.1f}%")
    print(f"{'step':<10} {r['step_ms']:>10.1f}   ({r['img_per_s']:.2f} img/s; phase medians need not add up; "
          f"process CPU time {r['cpu_ms']:.0f} ms)")
    print(f"minor page faults per step: {r['minflt_ms']:.0f} ({r['minflt_ms'] / r['batch_size']:.0f} per image)")
    print(f"peak memory: {r['peak_mem_mb']:.0f} MiB ({r['peak_mem_kind']}); load average at start/end "
          f"{m.get('loadavg_at_start')} / {r.get('loadavg_at_end')} on {m['cpu_count']} cores")
    print(f"decomposition check |loss(phased) - loss(forward)| = {r['decomposition_abs_err']:.3g}")
    if 'compile_graphs' in r:
        what = 'blocks + decoders' + (' + HOG' if r['compile_hog'] else '') if r['compile'] else 'HOG only'
        print(f"compiled ({r['compile_backend']}, {what}): first step {r['compile_first_step_s']:.1f} s, "
              f"{r['compile_graphs']} graphs, dynamo {r['compile_dynamo_s']:.1f} s")
    if 'hog_ref_ms' in r:
        print(f"HOG targets, all {len(r['hog_stages'])} stages (cells {r['cells']} px), batch {r['batch_size']}:")
        print(f"  reference-style design : {r['hog_ref_ms']:>9.1f} ms")
        print(f"  ours (model.hog)       : {r['hog_ours_ms']:>9.1f} ms"
              + ('   (--hog_impl hypot: model.hog is the hypot variant)' if r.get('hog_impl') == 'hypot' else ''))
        print(f"  speed-up               : {r['hog_speedup']:>9.2f}x   max abs diff {r['hog_max_abs_diff']:.2e}")
        print(f"  ours + hypot magnitude : {r['hog_hypot_ms']:>9.1f} ms  speed-up {r['hog_hypot_speedup']:.2f}x vs "
              f"reference, {r['hog_ours_ms'] / r['hog_hypot_ms']:.2f}x vs ours; max abs diff "
              f"{r['hog_hypot_max_abs_diff']:.2e}")
    if 'hog_profile' in r:
        print('HOG profile (torch.profiler, self CPU time per model.hog call):')
        for e in r['hog_profile']:
            print(f"  {e['op']:<32} {e['self_ms_per_call_of_hog']:>9.1f} ms  {100 * e['share']:>5.1f}%")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_model_args(p)
    p.add_argument('--decoder_embed_dim', default=256, type=int,
                   help='width of each stage decoder (LocalMIM: 256; the --demo run: 64) (default: 256)')
    p.add_argument('--steps', default=5, type=int, help='timed steps (median) (default: 5)')
    p.add_argument('--warmup', default=1, type=int, help='untimed steps first (default: 1)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', default='auto', help='auto | bf16 | fp16 | none (auto = fp32 on CPU, bf16 on CUDA)')
    p.add_argument('--compare_hog_reference', action='store_true',
                   help='also time the reference-style HOG against ours (interleaved) and check they agree')
    p.add_argument('--hog_steps', default=None, type=int, help='timed HOG repetitions (default: --steps)')
    p.add_argument('--hog_profile', action='store_true', help="print torch.profiler's top ops of model.hog")
    p.add_argument('--adamw', default='default', choices=['default', 'foreach', 'fused'],
                   help="torch AdamW implementation (default: torch's default, as run_pretrain.py)")
    p.add_argument('--compile', action='store_true',
                   help='LocalMIM.compile_regions (every block and decoder) before timing; the first step (with '
                        'the compilation) is reported apart as compile_first_step_s (default: off)')
    p.add_argument('--compile_hog', action='store_true',
                   help='also compile the targets (Target.compile_regions; alone without --compile), to measure '
                        'whether they gain')
    p.add_argument('--compile_backend', default='inductor', choices=['inductor', 'aot_eager', 'eager'],
                   help='torch.compile backend (default: inductor)')
    p.add_argument('--full_decode', action='store_true',
                   help='decode every cell of every stage (the pre-masked-only path, what main 775680a and the '
                        'reference do) instead of the training path (default: off = masked tokens only)')
    p.add_argument('--json', default=None, help='write the results here')
    return p


def main(argv=None) -> Dict[str, object]:
    args = get_parser().parse_args(argv)
    from util.errors import UserError
    try:
        res = run(args)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print_table(res)
    write_json(args.json, res)
    return res


if __name__ == '__main__':
    main()
