"""LocalMIM pre-training of a ViT, optionally with FreezeOut (progressive layer freezing).

    torchrun --nproc_per_node=8 run_pretrain.py --batch_size 256 --model MIM_vit_base_patch16 --hog_nbins 9 \
        --mask_ratio 0.75 --epochs 1600 --warmup_epochs 40 --blr 2e-4 --weight_decay 0.05 \
        --data_path /path/to/imagenet --output_dir out/ [--how_scale cubic --t_0 0.8]

``python run_pretrain.py --demo`` trains a tiny model on the built-in demo data in a few minutes on a CPU.
"""
import argparse
import json
import os

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay

import models_mim
from masking import check_mask_curriculum
from checkpoint_formats import adopt_reference_pretrain
from self_distill import add_self_distill_args
from engine_common import restore_training
from engine_pretrain import PretrainState, fit
from fixed_views import check_fixed_views, wrap_dataset
from prefix_cache import build_cache, cache_plan, check_prefix_cache
from prefix_target import MODES as PREFIX_MODES, check_prefix_target, prefix_extra_flops
from freezeout import (add_freeze_args, build_freezer, check_stage_weights, decided_saving, eval_mode_probe,
                       measure_unit_flops, projected_saving, resolve_freeze_args)
from util import distributed as du
from util.amp import fused_attention_report, make_amp, set_cuda_speed_flags
from util.args import (PROB, ArgumentParser, add_arch_args, add_common_args, add_optim_args, apply_demo_defaults,
                       check_output_dir, check_targets, explicit_flags, integer, real, resolve_device_flag, run_main)
from util.checkpoint import resolve_resume
from util.compile import check_toolchain
from util.datasets import build_dataset, build_loader, check_min_images, eval_transform, pretrain_transform
from util.errors import UserError
from util.log import TensorBoard
from util.rundir import claim_run, lock_output_dir
from util.lr_sched import WarmupCosine, absolute_lr, steps_per_epoch
from util.demo_data import DEMO_ARCH
from util.vis import fixed_batch, render_stages

# The demo shows FreezeOut with the seed's recipe, scaled cubic t_0 0.8 (ViTFreeze schedule): the embedding freezes
# at 56% of training and blocks 1-5 follow, with them 3 of the 4 stage decoders (plan: ~14% of the FLOPs saved).
# The tiny encoder's k-NN stays at chance until its loss leaves a plateau after ~200-250 optimizer steps, whatever
# the LR, mask ratio or depth (measured); so the recipe buys steps: batch 16 (25 steps/epoch, 500 in all) and 64-wide
# decoders (LocalMIM: 256 for a 768-wide ViT-B; a 64-wide step costs ~1/3 of a 256-wide one here), and the first
# freeze comes after the plateau. Measured: ~90 s on 2 idle cores, k-NN top-1 11% -> 44%. ``--demo --t_0 1`` is the
# plain LocalMIM demo (bit-identical to no FreezeOut). The encoder is the evaluators' --demo architecture.
DEMO_DEFAULTS = dict(model='MIM_vit_tiny_patch16', **DEMO_ARCH,
                     decoder_embed_dim=64, batch_size=16, epochs=20, warmup_epochs=2, blr=1e-2, num_workers=0,
                     save_freq=10,
                     how_scale='cubic', t_0=0.8, knn_eval_freq=10, knn_at_init=True, vis_freq=10,
                     output_dir='./output_dir/demo_pretrain', log_dir='./output_dir/demo_pretrain/tb',
                     device='cpu')


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser('LocalMIM pre-training (with optional FreezeOut)', add_help=True)
    g = add_optim_args(p, title='optimisation', batch_size=128, epochs=400, blr=1e-3, min_lr=1e-6, warmup_epochs=40,
                       weight_decay=0.05,
                       weight_decay_help='AdamW weight decay; none on biases, norms and other 1-D params',
                       blr_note='; LocalMIM ViT-B uses 2e-4',
                       min_lr_note="; with FreezeOut also where the global curve (--non_layerwise_lr, never-frozen "
                                   "units) ends. Under --freeze_schedule vitfreeze a freezing unit's own cosine ends "
                                   "at 0, as ViTFreeze's (\"min_lr is 0 based on freeze_out\"), unless --min_lr is "
                                   'typed: then every curve ends at it')
    g.add_argument('--lr_schedule', default='cosine', choices=['cosine', 'constant'],
                   help='after the linear warm-up: cosine = half-cosine to --min_lr (MAE/LocalMIM); constant = hold '
                        'the peak LR to the end. With FreezeOut a unit holds its peak and anneals to --min_lr over a '
                        'tail before its freeze step (--constant_tail) (default: cosine)', defines_run=True)
    g.add_argument('--constant_tail', default=0.1, type=float, metavar='FRAC',
                   help='with --lr_schedule constant and FreezeOut: fraction in [0, 1] of a unit\'s post-warm-up '
                        'span (warm-up end to freeze step) spent on a half-cosine from its peak to --min_lr, so no '
                        'unit is frozen at a high LR; never-frozen units hold to the end (default: 0.1)',
                   domain=PROB, defines_run=True)
    g = p.add_argument_group('model')
    add_arch_args(g, model_default='MIM_vit_base_patch16', source="the model's (patch 16, or 14 for ViT-H)",
                  model_help=f"model name: {', '.join(models_mim.MODEL_NAMES)} (default: MIM_vit_base_patch16)")
    g.add_argument('--decoder_embed_dim', default=256, type=int,
                   help='width of each stage decoder (LocalMIM: 256; --demo: 64, for a cheap step on its 96-wide '
                        'encoder) (default: 256)', domain=integer(1))
    g.add_argument('--mask_ratio', default=0.75, type=float,
                   help='fraction of patches removed from the encoder input, in (0, 1): the loss is computed on the '
                        'removed patches only, so 0 would train nothing (default: 0.75)',
                   domain=real(0, 1, lo_open=True, hi_open=True), defines_run=True)
    g.add_argument('--target', default='hog', type=str, metavar='NAME',
                   help='reconstruction target of every stage: hog (LocalMIM: per-cell gradient-orientation '
                        'histograms), pixel (MAE norm_pix: each cell\'s pixels normalised by their own mean and '
                        'variance), or module:Class, a targets.Target subclass importable from PYTHONPATH '
                        '(default: hog)', domain=check_targets, defines_run=True)
    g.add_argument('--stage_targets', default=None, type=str, metavar='T0,T1,..',
                   help='one target per stage, shallow to deep (e.g. hog,hog,pixel,pixel), each as for --target; '
                        'a single name applies to every stage; overrides --target (default: none, --target '
                        'everywhere)', domain=check_targets, defines_run=True)
    g.add_argument('--teacher', default=None, type=str, metavar='CKPT',
                   help='with the teacher target (--target teacher, or a teacher entry of --stage_targets): the '
                        'frozen encoder whose features are regressed, any checkpoint run_knn.py --finetune reads '
                        '(ours, MAE, LocalMIM, a tools/export.py timm export); run under no_grad with the run\'s '
                        'AMP on the full unmasked image, once per step for all its stages. Its SHA-256 goes into '
                        'the checkpoints, its weights do not: a resume re-reads this file and refuses a changed '
                        'one (default: none)', domain=_check_teacher_file, defines_run=True)
    g.add_argument('--teacher_layer', default=None, type=int, metavar='N',
                   help='with --teacher: the target is the output of teacher blocks 1..N (1 <= N <= the teacher\'s '
                        'depth; deeper blocks are not run), patch tokens LayerNorm\'ed without affine, average-'
                        'pooled (or repeated) onto each stage\'s cell grid (default: the last block)',
                   domain=integer(1), defines_run=True)
    g.add_argument('--mask_curriculum', default=None, type=str, metavar='START:END',
                   help='mask curriculum by token distance: block-wise masks (s x s blocks of patches, tokens of '
                        'the last visible block at random) whose difficulty = the mean Euclidean distance, in '
                        'patches, from a masked token to its nearest visible token moves linearly over the optimizer '
                        'steps from START (step 0) to END (reached at step T); each image draws its block side so '
                        'that the expected difficulty is the target (sides calibrated at model build for '
                        '--mask_ratio and the patch grid). min = the difficulty of random masking (~1.2 at ratio '
                        '0.75), max = the hardest block masks; e.g. min:2.5. Logged per epoch as mask_difficulty '
                        '(default: none: random masking)', domain=check_mask_curriculum, defines_run=True)
    g.add_argument('--hog_nbins', default=9, type=int, help='HOG orientation bins over 180 degrees (default: 9)',
                   domain=integer(1, 180), defines_run=True)
    g.add_argument('--hog_bias', action='store_true',
                   help='frozen random bias on the HOG gradients, as in the ViT-L recipe (default: off)',
                   defines_run=True)
    g.add_argument('--all_stages', action='store_true',
                   help='every block feeds a decoder instead of blocks [1, 3, depth-3, depth-1] (default: off)',
                   defines_run=True)
    g.add_argument('--stage_taps', default=None, type=str, metavar='all|B1,B2,..',
                   help=f'{models_mim.STAGE_TAPS_HELP}; each tap gets its own norm and decoder, and FreezeOut '
                        f'switches a stage off with the block feeding it. --stage_weights/--stage_targets lists '
                        f'then need one entry per tap (default: none: blocks 2, 4, depth-2, depth; --all_stages is '
                        f'--stage_taps all)', domain=models_mim.check_stage_taps, defines_run=True)
    g.add_argument('--stage_scales', default=None, type=str, metavar='S1,S2,..',
                   help='decoder scale per tap, shallow to deep: 0.5 or a power of two >= 1; the stage\'s HOG/pixel '
                        'cell is patch_size / scale px (whole pixels) (default: none: the rule of --stage_taps; '
                        'the default taps: 4,2,1,0.5, ViT-H/14: 2,2,1,0.5)',
                   domain=models_mim.check_stage_scales, defines_run=True)
    g.add_argument('--layer_drop', default=0.0, type=float, metavar='THETA',
                   help='progressive layer dropping (Zhang & He 2020): theta_bar in [0, 1], the floor of the keep '
                        'probability theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar, t = step / T; block l of '
                        'L is kept with p_l = 1 - l/L (1 - theta(t)), one draw per block per optimizer step, a '
                        'dropped block is not run, a kept one\'s residual branch is scaled by 1/p_l. FreezeOut-frozen '
                        'blocks are never dropped. Logged per epoch as layer_drop_theta; expected saving in '
                        '--plan_only. The paper: 0.5 (default: 0 = off)', domain=PROB, defines_run=True)
    g.add_argument('--layer_drop_gamma', default=100.0, type=float, metavar='GAMMA',
                   help='with --layer_drop: temporal decay rate of theta(t) per unit of training progress (the '
                        "paper's gamma = 100/T per step is 100: theta is within 1%% of theta_bar after 4.6%% of "
                        'training) (default: 100)', domain=real(0), defines_run=True)
    g.add_argument('--fixed_views', default=0, type=int, metavar='K',
                   help='each image gets K fixed (augmentation, mask) pairs drawn from --seed, a pure function of '
                        '(seed, image, view); epoch e uses pair e mod K (view v = the crop/flip epoch v of the '
                        'default run draws, plus its own mask). A recipe change in its own right, and what '
                        '--prefix_cache needs. pil loader, random masking only (default: 0 = off: a fresh view '
                        'and mask every epoch)', domain=integer(0), defines_run=True)
    g.add_argument('--prefix_target', default=None, choices=list(PREFIX_MODES),
                   help='with FreezeOut, once the embedding (and any blocks) are frozen: every active stage also '
                        "predicts, at masked tokens, the frozen prefix's features of the full unmasked image "
                        '(LayerNorm per token, no affine; no_grad) with a Linear head of its own. add: stage loss = '
                        'HOG + w * prefix term; replace: w * prefix term only (no HOG for those stages). Before the '
                        'first freeze nothing changes; the extra full-image prefix pass is in the FLOP plan '
                        '(default: none: off)', defines_run=True)
    g.add_argument('--prefix_target_weight', default=1.0, type=float, metavar='W',
                   help='with --prefix_target: the weight w of the prefix term in each active stage\'s loss, >= 0 '
                        '(default: 1)', domain=real(0), defines_run=True)
    g.add_argument('--prefix_cache', default=None, type=str, metavar='DIR',
                   help='with --fixed_views K and FreezeOut: store the frozen prefix\'s output per (image, view) in '
                        'memory-mapped fp32 files under DIR (the visible tokens\' output as computed from the visible '
                        'tokens only, and with --prefix_target the full-image features), written in the first epoch '
                        'of each view after a freeze and read instead of running the prefix afterwards; the loss is '
                        'bit-identical to the uncached run. A deeper freeze extends the stored rows (only the blocks '
                        'frozen since run on them). DIR is '
                        'checked against the run (data list, K, seed, mask ratio, shapes; the prefix weights at each '
                        'depth) and refused if foreign or if it would not fit the free disk space; --plan_only '
                        'prints its size and the compute it saves. docs/PREFIX_CACHE.md (default: none: no cache)')
    g.add_argument('--prefix_cache_dtype', default='float32', choices=['float32', 'float16', 'bfloat16'],
                   help='with --prefix_cache: the dtype of the stored rows. float32 is bit-identical to the uncached '
                        'run; float16 / bfloat16 halve the files and round every stored value (relative error '
                        '<= 2^-11 / 2^-8 per value), so a cached batch is close to, not equal to, the uncached one '
                        '(docs/PREFIX_CACHE.md gives the measured loss and k-NN difference) (default: float32)',
                   defines_run=True)
    g.add_argument('--stage_weights', default='equal', type=str,
                   help=f'per-stage loss weights, shallow->deep: {models_mim.STAGE_WEIGHTS_HELP} (default: equal)',
                   domain=models_mim.check_stage_weights, defines_run=True)
    g.add_argument('--stage_weights_end', default=None, type=str, metavar='W1',
                   help='stage-loss curriculum: every weight moves linearly over the optimizer steps from '
                        '--stage_weights (step 0) to this (reached at step T; preset or comma list, same rules); '
                        'logged per epoch (default: none, weights fixed)',
                   domain=models_mim.check_stage_weights, defines_run=True)
    add_self_distill_args(g)
    g = p.add_argument_group('FreezeOut (on when --t_0 or --how_scale is given, or any --freeze_policy but '
                             'schedule)')
    g.add_argument('--plan_only', action='store_true',
                   help='print the FreezeOut plan (and projected saving) and exit without training')
    g.add_argument('--freezeout_weight_decay', default=None, type=float, metavar='WD',
                   help='AdamW weight decay of the FreezeOut units\' matrices (biases, norms and other 1-D params '
                        'stay at 0), >= 0; the never-frozen embedding of --dont_freeze_pe keeps --weight_decay. '
                        'ViTFreeze\'s FreezeOut runs until 2024-01-26 used 1e-5 here (its param-group builder\'s '
                        'default) against 0.05 in its baseline: docs/SEED_RUNS.md (default: --weight_decay)',
                   domain=real(0.0), defines_run=True)
    add_freeze_args(g)
    g = p.add_argument_group('evaluation during pre-training')
    g.add_argument('--knn_eval_freq', default=0, type=int,
                   help='run weighted k-NN on the current encoder every N epochs and after the last (0 = off; '
                        '--demo: 20)', domain=integer(0))
    g.add_argument('--knn_at_init', action='store_true',
                   help='with --knn_eval_freq: also run the k-NN on the randomly initialised encoder before training '
                        '(the baseline the pre-training must beat; logged as knn_init_* in epoch 0) (default: off; '
                        '--demo: on)')
    g.add_argument('--knn_data_path', default=None, type=str,
                   help='ImageNet-style root with train/ and val/ for the online k-NN (default: --data_path)')
    g.add_argument('--vis_freq', default=20, type=int,
                   help='every N epochs write TensorBoard images of a fixed batch: input, mask, and target vs '
                        'prediction of each active stage (0 = off; needs --log_dir) (default: 20; --demo: 10)',
                   domain=integer(0))
    g.add_argument('--vis_images', default=4, type=int, help='images in the visualisation batch (default: 4)',
                   domain=integer(1))
    g = p.add_argument_group('speed')
    g.add_argument('--compile', action='store_true',
                   help='torch.compile each encoder block and stage decoder (LocalMIM.compile_regions; works with '
                        'FreezeOut: freeze events only switch blocks to no_grad, no recompiles). Checked before '
                        'training: fails in one line without a working compiler toolchain (default: off)')
    g.add_argument('--compile_backend', default='inductor', choices=['inductor', 'aot_eager', 'eager'],
                   help="torch.compile backend; 'aot_eager' traces graphs and autograd without generating kernels "
                        '(debugging, no C++ compiler needed) (default: inductor)')
    g.add_argument('--tf32', action='store_true', default=True,
                   help='CUDA: TF32 tensor cores for fp32 matmuls/convs on Ampere+ (set_float32_matmul_precision '
                        '"high") (default: on; --no_tf32 for full fp32)')
    g.add_argument('--no_tf32', action='store_false', dest='tf32', help='CUDA: full-precision fp32 matmuls')
    g.add_argument('--cudnn_benchmark', action='store_true', default=True,
                   help='CUDA: cudnn.benchmark picks the fastest conv algorithm per (fixed) shape (default: on)')
    g.add_argument('--no_cudnn_benchmark', action='store_false', dest='cudnn_benchmark',
                   help='CUDA: keep cuDNN heuristics (no autotuning)')
    g.add_argument('--prefetch_factor', default=None, type=int,
                   help="batches each loader worker prepares ahead (default: None = torch's 2; needs "
                        '--num_workers > 0)', domain=integer(1))
    g.add_argument('--compile_mode', default=None, choices=['default', 'reduce-overhead', 'max-autotune',
                                                            'max-autotune-no-cudagraphs'],
                   help="torch.compile mode for the inductor backend (default: None = torch's 'default')")
    add_common_args(p, output_dir='./output_dir', num_workers=10, save_freq=50)  # LocalMIM's period
    return p


def _check_teacher_file(flag: str, value: str):
    return None if os.path.isfile(value) else f'--teacher {value}: ' + (
        'is a directory, not a checkpoint file' if os.path.isdir(value) else 'file not found')


def prepare_args(args: argparse.Namespace) -> None:
    argv = getattr(args, 'argv', [])
    if args.demo:
        from util.demo_data import default_demo_root, make_demo_dataset
        defaults = dict(DEMO_DEFAULTS, data_path=str(default_demo_root()))
        if args.output_dir != DEMO_DEFAULTS['output_dir'] and 'output_dir' in explicit_flags(argv):
            defaults['log_dir'] = os.path.join(args.output_dir, 'tb')  # keep a custom demo run's files together
        apply_demo_defaults(args, defaults, argv)
        if args.data_path == str(default_demo_root()):
            make_demo_dataset(args.data_path)
    resolve_device_flag(args, argv)
    resolve_freeze_args(args, argv)
    check_fixed_views(args)
    check_prefix_target(args)
    check_prefix_cache(args)
    if args.data_backend == 'dali':  # without DALI: the one-line install hint before any work
        from util.dali_loader import require_dali
        require_dali()
    if args.compile and args.freezeout and args.compile_mode in ('reduce-overhead', 'max-autotune'):
        # CUDA graphs replay recorded kernels: a freeze changes which backward runs, and that path is unchecked
        raise UserError(f'--compile_mode {args.compile_mode}: uses CUDA graphs, not yet checked with FreezeOut '
                        f'(bench/gpu_check.py does not cover it); use --compile_mode default or '
                        f'max-autotune-no-cudagraphs')
    if args.prefetch_factor is not None and (args.prefetch_factor < 1 or args.num_workers < 1):
        raise UserError(f'--prefetch_factor {args.prefetch_factor}: needs a value >= 1 and --num_workers >= 1')


def build_model(args: argparse.Namespace) -> models_mim.LocalMIM:
    model = models_mim.create_model(
        args.model, img_size=args.input_size, patch_size=args.patch_size, embed_dim=args.embed_dim,
        depth=args.depth, num_heads=args.num_heads, hog_nbins=args.hog_nbins, hog_bias=args.hog_bias,
        all_stages=args.all_stages, stage_weights=args.stage_weights, hog_bias_seed=args.seed,
        stage_weights_end=args.stage_weights_end, decoder_embed_dim=args.decoder_embed_dim,
        target=args.target, stage_targets=args.stage_targets, target_options=vars(args),
        mask_curriculum=args.mask_curriculum, mask_ratio=args.mask_ratio, stage_taps=args.stage_taps,
        tap_scales=args.stage_scales, layer_drop=args.layer_drop, layer_drop_gamma=args.layer_drop_gamma,
        layer_drop_seed=args.seed, prefix_target=args.prefix_target,
        prefix_target_weight=args.prefix_target_weight, self_distill=args.self_distill, distill_ema=args.distill_ema)
    if getattr(args, 'teacher', None) is not None or getattr(args, 'teacher_layer', None) is not None:
        from target_teacher import check_teacher_flags
        check_teacher_flags(args, model.target)  # flags no stage reads would be ignored silently
    return model


def main(args: argparse.Namespace) -> None:
    prepare_args(args)
    torch.manual_seed(args.seed)  # the init must be a function of --seed (same on every rank), not of the clock
    model = build_model(args)  # before any process group: bad model flags fail fast and identically everywhere
    device = du.init_distributed_mode(args)
    if args.output_dir and not args.plan_only:
        check_output_dir(args.output_dir)
        lock_output_dir(args.output_dir)  # held until exit: one run per folder at a time
    cuda_flags = set_cuda_speed_flags(device, args.tf32, args.cudnn_benchmark)
    if args.compile and not args.plan_only:
        check_toolchain(args.compile_backend, device)  # one line now, not a traceback after the first batch
    du.seed_process(args.seed)

    dataset = build_dataset(args.data_path, 'train', pretrain_transform(args.input_size), allow_root=True,
                            bad_images=args.bad_images, seed=args.seed)  # per-sample seeds: same augmentation for any world size
    dataset = wrap_dataset(dataset, args, model.num_patches)  # --fixed_views K: view e mod K of every image
    cache = build_cache(args, model, dataset)  # --prefix_cache DIR
    if cache is not None and not args.plan_only:
        cache.open()  # a foreign cache, or one that would not fit the disk, is refused here
        dataset.cache = model.prefix_cache = cache
    check_min_images(dataset, args.batch_size * du.get_world_size(), '--batch_size')
    if args.data_backend == 'dali':  # the same file list, sharded by the reader; imported only when chosen
        from util.dali_loader import build_dali_loader
        loader = build_dali_loader(dataset, 'pretrain', args, world_size=du.get_world_size(), rank=du.get_rank(),
                                   device=device)
    else:
        loader = build_loader(dataset, args.batch_size, shuffle=True, drop_last=True, num_workers=args.num_workers,
                              pin_mem=args.pin_mem, seed=args.seed, distributed=args.distributed,
                              world_size=du.get_world_size(), rank=du.get_rank(),
                              prefetch_factor=args.prefetch_factor)
    knn = _knn_setup(args, device) if args.knn_eval_freq > 0 and not args.plan_only else None  # data checked now
    model.to(device)
    schedule, spe = make_schedule(args, len(loader), du.get_world_size())
    _print_setup(args, dataset, loader, spe, model, cuda_flags)
    freezer, flops = None, None
    if args.freezeout:
        freezer = build_freezer(args, model, schedule, make_probe=lambda: _probe(args, model, device),
                                sync=du.broadcast_from_rank0 if args.distributed else None)
        flops = measure_unit_flops(model, args.input_size, args.mask_ratio, device, args.dont_freeze_pe)
        if model.prefix is not None:
            without = decided_saving(freezer, flops, schedule.total_steps)
            flops.update(prefix_extra_flops(model, args.input_size, args.mask_ratio, device))
        du.print0(freezer.format_plan(spe, flops))
        if model.prefix is not None:
            du.print0(f'prefix target ({args.prefix_target}): the full-image pass of the frozen prefix and the '
                      f'prefix heads are counted above; FLOP-model saving '
                      f'{100 * decided_saving(freezer, flops, schedule.total_steps):.1f}% vs no freezing '
                      f'(FreezeOut alone: {100 * without:.1f}%); the HOG work --prefix_target replace skips is not '
                      f'subtracted')
        if cache is not None:
            du.print0(cache_plan(cache, freezer, flops, spe, args.epochs, args.fixed_views))
    if model.layer_drop is not None:
        if flops is None:
            flops = measure_unit_flops(model, args.input_size, args.mask_ratio, device, args.dont_freeze_pe)
        du.print0(layer_drop_plan(model, freezer, flops, schedule.total_steps, args.dont_freeze_pe))
    if target_plan_lines(model, None):  # a target with its own compute (the teacher): its share of the FLOPs
        if flops is None:
            flops = measure_unit_flops(model, args.input_size, args.mask_ratio, device, args.dont_freeze_pe)
        for line in target_plan_lines(model, flops, args.dont_freeze_pe):
            du.print0(line)
    if model.self_distill is not None:  # its teacher pass is in the FLOP plan (step_cost): say how much
        if flops is None:
            flops = measure_unit_flops(model, args.input_size, args.mask_ratio, device, args.dont_freeze_pe)
        du.print0(model.self_distill.describe(flops))
    check_stage_weights(model, freezer, schedule.total_steps, spe)  # a zero loss after a freeze: refused now
    groups = _freezeout_param_groups(freezer, args) if freezer else param_groups_weight_decay(model, args.weight_decay)
    du.print0(param_group_summary(groups))
    if args.plan_only:
        if not args.freezeout:
            du.print0(f'no FreezeOut (--t_0/--how_scale not given): plain warm-up + {args.lr_schedule}, nothing '
                      f'freezes; T={schedule.total_steps} steps, W={schedule.warmup_steps}')
        du.cleanup()
        return

    # fused: one kernel for all parameters (CPU and CUDA); 3-4x faster optimizer step than the per-tensor loop
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=True)
    amp = make_amp(device, args.amp)
    # a fresh DDP reducer registers only parameters that still require grad: after a freeze, frozen ones stop
    # being all-reduced and no find_unused_parameters traversal is needed
    # layer dropping: a dropped block's parameters get no gradient that step (the same blocks on every rank)
    rewrap = (lambda: nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False,
        # the prefix-target heads (and, with replace, the HOG heads) of a stage get gradients only in some states
        find_unused_parameters=model.layer_drop is not None or model.prefix is not None)) \
        if args.distributed else (lambda: model)
    state = PretrainState(model=model, model_without_ddp=model, optimizer=optimizer, amp=amp, schedule=schedule,
                          freezer=freezer, steps_per_epoch=spe, total_steps=schedule.total_steps, rewrap=rewrap)
    resumed = resolve_resume(args)
    claim_run(args, resumed)  # before anything is written: refuses to mix runs in one folder
    if resumed:
        # a LocalMIM/ViTFreeze pre-training checkpoint is first rewritten into this layout (or refused in one line)
        resumed = (resumed[0], adopt_reference_pretrain(*resumed, model, optimizer, freezer, spe))
        ckpt = restore_training(resumed, model, optimizer, amp.scaler, freezer, args,
                                f'checkpoint does not match --model {args.model} with these flags ({{detail}})')
        model.load_checkpoint_extras(ckpt, f'--resume {resumed[0]}')  # the EMA teacher (exact resume)
        state.global_step = int(ckpt.get('step', args.start_epoch * spe))
        du.print0(f'Resumed from {resumed[0]}: epoch {ckpt["epoch"]} done, optimizer step {state.global_step}')
    if args.compile:
        opts = {'backend': args.compile_backend}
        if args.compile_mode and args.compile_backend == 'inductor':
            opts['mode'] = args.compile_mode
        limit = model.compile_regions(**opts)
        du.print0(f'compile: {model.depth} encoder blocks and {len(model.decoder)} stage decoders compiled '
                  f'({args.compile_backend}); at most {limit} variants per region, a hit is an error')
    if cache is not None and model.embed_frozen:  # resumed with a frozen prefix: the first epoch reads the cache
        cache.set_depth(model, model.num_frozen_blocks)
    state.model = rewrap()

    log_writer = TensorBoard(args.log_dir)
    pictures = None
    if log_writer and args.vis_freq > 0:
        vis_batch = _vis_batch(args, device)
        pictures = lambda m: render_stages(m, vis_batch, args.mask_ratio, seed=args.seed)  # noqa: E731
    init_knn = {}
    if knn is not None and args.knn_at_init and args.start_epoch == 0:
        du.print0('k-NN of the randomly initialised encoder (the baseline):')
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):  # the run is unchanged
            init_knn = {k.replace('knn_', 'knn_init_', 1): v for k, v in knn(model).items()}
    fit(state, loader, args, log_writer, flops=flops, knn=knn, init_record=init_knn, pictures=pictures)
    log_writer.close()
    if args.demo and du.is_main_process():
        print(demo_summary(args, freezer, flops, spe), flush=True)
    du.cleanup()


def make_schedule(args: argparse.Namespace, loader_len: int, world_size: int):
    """``(global LR schedule, optimizer steps per epoch)`` from the real loader length, accumulation and world size;
    sets ``args.lr`` from ``--blr`` (and ``args.eff_batch``)."""
    spe = steps_per_epoch(loader_len, args.accum_iter, 5 if args.debug else None)
    if spe < 1:
        raise UserError(f'--accum_iter {args.accum_iter}: an epoch has only {loader_len} batches of '
                        f'{args.batch_size}; lower --accum_iter or --batch_size')
    args.eff_batch = absolute_lr(args, world_size)
    return WarmupCosine(args.lr, args.min_lr, spe * args.warmup_epochs, spe * args.epochs,
                        shape=args.lr_schedule), spe


def plan(args: argparse.Namespace, world_size: int = 1):
    """``(freezer or None, schedule, steps_per_epoch)`` of this command line on ``world_size`` processes, without
    training or a process group: what ``--plan_only`` prints (tools/plot_schedule.py)."""
    prepare_args(args)
    torch.manual_seed(args.seed)
    model = build_model(args)
    dataset = build_dataset(args.data_path, 'train', pretrain_transform(args.input_size), allow_root=True,
                            bad_images=args.bad_images, seed=args.seed)
    loader = build_loader(dataset, args.batch_size, shuffle=True, drop_last=True, num_workers=0, pin_mem=False,
                          seed=args.seed, distributed=world_size > 1, world_size=world_size, rank=0)
    schedule, spe = make_schedule(args, len(loader), world_size)
    return (build_freezer(args, model, schedule) if args.freezeout else None), schedule, spe


def layer_drop_plan(model, freezer, flops, total_steps: int, dont_freeze_pe: bool) -> str:
    """--plan_only lines of --layer_drop: the schedule and its expected FLOP-model saving (vs the same run without
    dropping; with FreezeOut also the combined saving vs neither), frozen blocks never dropped."""
    from freezeout import step_cost
    ld = model.layer_drop
    if freezer is None:
        saving = ld.expected_saving(flops, total_steps, lambda step: 0)
        ld.expected_saving_total = saving
        return f'{ld.describe()}\nlayer drop: expected saving of training FLOPs (FLOP model): {100 * saving:.1f}%'
    pe = freezer.dont_freeze_pe

    def blocks_at(step: int) -> int:
        n = freezer.num_frozen_at(step)
        return n if pe else max(0, n - 1)
    bounds = freezer.state_boundaries()
    saving = ld.expected_saving(flops, total_steps, blocks_at, bounds,
                                base_cost=lambda step: step_cost(flops, freezer.num_frozen_at(step), pe))
    ld.expected_saving_total = saving
    fo = decided_saving(freezer, flops, total_steps)
    both = 1.0 - (1.0 - fo) * (1.0 - saving)
    return (f'{ld.describe()}\nlayer drop: expected saving of training FLOPs (FLOP model) {100 * saving:.1f}% of the '
            f'FreezeOut run; with FreezeOut {100 * both:.1f}% vs neither')


def target_plan_lines(model, flops, dont_freeze_pe: bool = False) -> list:
    """The FLOP-plan lines of the targets that print one (``Target.plan_line``: the teacher's forward and share of
    a step); without ``flops`` they are asked with no numbers (an empty list: nothing to measure for)."""
    from freezeout import step_cost
    from targets import target_parts
    names = {id(m): n for n, m in model.named_modules()}
    step = step_cost(flops, 0, dont_freeze_pe) if flops is not None else None
    lines = []
    for part, stages in target_parts(model.target, model.stages):
        fwd = _subtree_flops(flops.get('module_fwd', {}), names[id(part)]) if flops is not None else None
        line = part.plan_line(stages, fwd, step)
        if line:
            lines.append(line)
    return lines


def _subtree_flops(counts: dict, name: str) -> float:
    """Counted FLOPs of module ``name`` and everything under it. A module called through a method rather than
    ``__call__`` (a target's ``forward_stages``) has no count of its own, so its topmost counted descendants are
    summed (disjoint subtrees: nothing counted twice)."""
    if name in counts:
        return counts[name]
    under = [k for k in counts if k.startswith(name + '.')]
    top = [k for k in under if not any(k.startswith(a + '.') for a in under)]
    return float(sum(counts[k] for k in top))


def _freezeout_param_groups(freezer, args) -> list:
    """The FreezeOut units' groups with --freezeout_weight_decay (default --weight_decay) on their matrices; the
    never-frozen embedding's groups (unit -1, --dont_freeze_pe) keep --weight_decay."""
    wd = args.weight_decay if args.freezeout_weight_decay is None else args.freezeout_weight_decay
    groups = freezer.param_groups(wd)
    if wd != args.weight_decay:
        base = freezer.param_groups(args.weight_decay)  # same layout, group for group
        groups = [b if b['unit'] < 0 else g for g, b in zip(groups, base)]
    return groups


def param_group_summary(groups: list) -> str:
    """One line: the AdamW weight decay of the parameter groups, counted in tensors, per kind of group."""
    kinds: dict = {}
    for g in groups:
        u = g.get('unit')
        kind = 'all parameters' if u is None else 'FreezeOut units' if u >= 0 else 'never-frozen embedding'
        kinds.setdefault(kind, {}).setdefault(g['weight_decay'], 0)
        kinds[kind][g['weight_decay']] += len(g['params'])
    parts = [f'{kind}: ' + ', '.join(f'{wd:g} on {n} tensors' for wd, n in sorted(c.items(), reverse=True))
             for kind, c in kinds.items()]
    return (f'AdamW weight decay ({len(groups)} param groups; biases, norms and other 1-D tensors get 0): '
            + '; '.join(parts))


def _print_setup(args, dataset, loader, spe: int, model, cuda_flags) -> None:
    eff_batch = args.eff_batch
    du.print0(f'{dataset.root}: {len(dataset)} images, {len(loader)} iterations/epoch, {spe} optimizer steps/epoch')
    du.print0(f'base lr: {args.lr * 256 / eff_batch:.2e}  actual lr: {args.lr:.2e}  accumulate grad iterations: '
              f'{args.accum_iter}  effective batch size: {eff_batch} ({args.batch_size} x {args.accum_iter} x '
              f'{du.get_world_size()} processes)')
    du.print0(f'model {args.model}: {args.input_size}px, patch {model.patch_size}, {model.depth} blocks, stages '
              f'(block, scale, cell px): {list(zip(model.stage_blocks, model.stage_scales, model.cell_sizes))}, '
              f'stage weights {model.stage_weights}' + _curriculum_note(args, model))
    if model.masking is not None:
        du.print0(model.masking.describe())
    if cuda_flags:
        du.print0(f'CUDA: {cuda_flags}, fused AdamW, pinned memory {args.pin_mem} + non_blocking copies')
    note = fused_attention_report(model)
    if note:
        du.print0(note)


def demo_summary(args, freezer, flops, spe: int) -> str:
    """The end-of-demo block: freeze events, measured vs planned saving, k-NN lift, where the files are, what next.
    Read from log.txt, so a resumed demo reports the whole run."""
    recs = []
    path = os.path.join(args.output_dir, 'log.txt') if args.output_dir else ''
    if path and os.path.isfile(path):
        with open(path) as f:
            recs = [json.loads(l) for l in f if l.strip()]
    last = recs[-1] if recs else {}
    lines = ['', '=' * 30 + ' ViTFreeze demo: summary ' + '=' * 30]
    if freezer is not None and freezer.schedule is None:  # a policy without a per-unit schedule (adaptive, plugins)
        key = 'planned_saving_so_far' if freezer.policy.plans_ahead else 'decided_saving_so_far'
        lines.append(f'FreezeOut: {freezer.policy.name} policy; frozen by the end: {freezer.num_frozen} units; '
                     f'{key.split("_")[0]} saving {100 * last.get(key, 0.0):.1f}% (FLOP model), measured '
                     f'{100 * last.get("measured_saving_so_far", 0.0):.1f}%')
    elif freezer is not None:
        s = freezer.schedule
        lines.append(f'FreezeOut: {s.how_scale} t_0={s.t_0:g}, --freeze_schedule {s.freeze_schedule}, '
                     f'T={s.total_steps} steps; frozen by the end: {freezer.num_frozen} of {len(s.units)} units')
        for u in s.units:
            if u.freeze_step is not None and u.freeze_step < s.total_steps:
                lines.append(f'  {u.name:<8} frozen at step {u.freeze_step} (epoch {u.freeze_step / spe:.2f})')
        planned = projected_saving(s, flops, args.dont_freeze_pe)
        meas = last.get('measured_saving_so_far')
        lines.append(f'saving: planned {100 * planned:.1f}% of training FLOPs (FLOP model); measured '
                     + (f'{100 * meas:.1f}% of training-loop compute time (vs the step time before anything froze)'
                        if meas is not None else 'n/a (no epoch ran before the first freeze)'))
    else:
        lines.append('FreezeOut: off')
    k = 20
    init = next((r[f'knn_init_k{k}_top1'] for r in recs if f'knn_init_k{k}_top1' in r), None)
    final = next((r[f'knn_k{k}_top1'] for r in reversed(recs) if f'knn_k{k}_top1' in r), None)
    if final is not None:
        chance = 100.0 / max(1, len(_class_dirs(args.knn_data_path or args.data_path)))
        lines.append(f'k-NN top-1 (k={k}, val split): random init '
                     + (f'{init:.1f}%' if init is not None else 'n/a') + f' -> pre-trained {final:.1f}% '
                     f'(chance {chance:.0f}%)')
    out = args.output_dir or '.'
    ck = os.path.join(out, 'checkpoint-last.pth')
    lines += [f'files: checkpoints {out}/checkpoint-*.pth, per-epoch log {os.path.join(out, "log.txt")}'
              + (f', TensorBoard: tensorboard --logdir {args.log_dir}' if args.log_dir else ''),
              'next:',
              f'  python run_knn.py --demo --finetune {ck}         # k-NN of the pre-trained encoder',
              f'  python run_linprobe.py --demo --finetune {ck}    # linear probe',
              f'  python run_finetune.py --demo --finetune {ck}    # fine-tune',
              '  python run_pretrain.py --demo --plan_only          # the freeze plan alone',
              '  python run_pretrain.py --demo --t_0 1 --output_dir output_dir/demo_plain   # plain LocalMIM',
              '=' * 85]
    return '\n'.join(lines)


def _class_dirs(root: str) -> list:
    for sub in ('val', 'train', ''):
        d = os.path.join(root, sub)
        if os.path.isdir(d):
            dirs = [e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e))]
            if dirs:
                return dirs
    return []


def _curriculum_note(args, model) -> str:
    if not args.stage_weights_end:
        return ''
    end = models_mim.stage_weights_for(args.stage_weights_end, len(model.stage_blocks))
    return f' -> {end} at step T (linear in the optimizer step)'


PROBE_IMAGES = 16  # the output signal's probe batch: 16 fixed images


def _probe(args, model, device):
    """The adaptive policy's probe for --freeze_signal output: every unit's output on a fixed batch (no RNG, fp32,
    eval mode; identical on every rank)."""
    if args.freeze_signal != 'output':
        return None
    return eval_mode_probe(model, model.unit_features, _vis_batch(args, device, PROBE_IMAGES))


def _vis_batch(args, device, n=None):
    """A fixed, un-augmented batch (val split if there is one) for the TensorBoard pictures."""
    try:
        ds = build_dataset(args.data_path, 'val', eval_transform(args.input_size), allow_root=False)
    except UserError:
        ds = build_dataset(args.data_path, 'train', eval_transform(args.input_size), allow_root=True)
    return fixed_batch(ds, n or args.vis_images, device)


def _knn_setup(args, device):
    """Online weighted k-NN (the same code as run_knn.py) on the current encoder; call on every rank."""
    from checkpoint_formats import encoder_from_mim_model
    from models_vit import encoder_features
    from util.knn import DEFAULT_KS, build_knn_loaders, format_knn, knn_evaluate
    data_path = args.knn_data_path or args.data_path
    train_loader, val_loader = build_knn_loaders(data_path, args.input_size, args.batch_size, args.num_workers,
                                                 shard=args.distributed, pin_mem=args.pin_mem,
                                                 bad_images=args.bad_images, backend=args.data_backend,
                                                 seed=args.seed, device=device,
                                                 flag='--knn_data_path' if args.knn_data_path else '--data_path')
    ks = [k for k in DEFAULT_KS if k <= len(train_loader.dataset)] or [len(train_loader.dataset)]

    def run(mim_model) -> dict:
        encoder = encoder_from_mim_model(mim_model).eval()
        with torch.no_grad():
            res = knn_evaluate(lambda x: encoder_features(encoder, x, 'token'), train_loader, val_loader, device,
                               ks=ks)
        for line in format_knn(res, ks):
            du.print0(line)
        return res
    return run


if __name__ == '__main__':
    run_main(main, get_args_parser())
