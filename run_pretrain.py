"""LocalMIM pre-training of a ViT, optionally with FreezeOut (progressive layer freezing).

    torchrun --nproc_per_node=8 run_pretrain.py --batch_size 256 --model MIM_vit_base_patch16 --hog_nbins 9 \
        --mask_ratio 0.75 --epochs 1600 --warmup_epochs 40 --blr 2e-4 --weight_decay 0.05 \
        --data_path /path/to/imagenet --output_dir out/ [--how_scale cubic --t_0 0.8]

``python run_pretrain.py --demo`` trains a tiny model on the built-in demo data in a few minutes on a CPU.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay

import models_mim
from engine_pretrain import NonFiniteLoss, PretrainState, train_one_epoch
from freezeout import (AdaptiveFreezeOut, FreezeOut, FreezeOutSchedule, add_policy_args, add_schedule_args,
                       bounds_from_args, decided_saving, eval_mode_probe, format_adaptive_plan, format_plan,
                       measure_unit_flops, projected_saving, resolve_freeze_args)
from util import distributed as du
from util.amp import fused_attention_report, make_amp, set_cuda_speed_flags
from util.args import (add_arch_args, add_common_args, add_optim_args, apply_demo_defaults, check_output_dir,
                       explicit_flags, resolve_device_flag, run_main)
from util.checkpoint import resolve_resume, restore_rng_state, resume_hint, save_checkpoint, warn_changed_flags
from util.compile import check_toolchain, eager as compile_eager, stats as compile_stats
from util.datasets import (build_dataset, build_loader, check_min_images, eval_transform, pretrain_transform,
                           seed_loader_epoch)
from util.errors import UserError
from util.log import TensorBoard, epoch_record, trim_json_log
from util.rundir import claim_run, lock_output_dir
from util.signals import GracefulStop
from util.lr_sched import WarmupCosine, absolute_lr, steps_per_epoch
from util.vis import fixed_batch, render_stages

# The demo shows FreezeOut with the seed's recipe, scaled cubic t_0 0.8 (ViTFreeze schedule): the embedding freezes
# at 56% of training and blocks 1-5 follow, with them 3 of the 4 stage decoders (plan: ~14% of the FLOPs saved).
# The tiny encoder's k-NN stays at chance until its loss leaves a plateau after ~200-250 optimizer steps, whatever
# the LR, mask ratio or depth (measured); so the recipe buys steps: batch 16 (25 steps/epoch, 500 in all) and 64-wide
# decoders (LocalMIM: 256 for a 768-wide ViT-B; a 64-wide step costs ~1/3 of a 256-wide one here), and the first
# freeze comes after the plateau. Measured: ~90 s on 2 idle cores, k-NN top-1 11% -> 44%. ``--demo --t_0 1`` is the
# plain LocalMIM demo (bit-identical to no FreezeOut). The encoder is the evaluators' --demo architecture.
DEMO_DEFAULTS = dict(model='MIM_vit_tiny_patch16', input_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3,
                     decoder_embed_dim=64, batch_size=16, epochs=20, warmup_epochs=2, blr=1e-2, num_workers=0,
                     save_freq=10,
                     how_scale='cubic', t_0=0.8, knn_eval_freq=10, knn_at_init=True, vis_freq=10,
                     output_dir='./output_dir/demo_pretrain', log_dir='./output_dir/demo_pretrain/tb',
                     device='cpu')


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('LocalMIM pre-training (with optional FreezeOut)', add_help=True)
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
                        'the peak LR to the end. With FreezeOut a unit holds its peak and anneals to its LR floor '
                        'over a tail before its freeze step (--constant_tail) (default: cosine)')
    g.add_argument('--constant_tail', default=0.1, type=float, metavar='FRAC',
                   help='with --lr_schedule constant and FreezeOut: fraction in [0, 1] of a unit\'s post-warm-up '
                        'span (warm-up end to freeze step) spent on a half-cosine from its peak to its LR floor, so no '
                        'unit is frozen at a high LR; never-frozen units hold to the end (default: 0.1)')
    g = p.add_argument_group('model')
    add_arch_args(g, model_default='MIM_vit_base_patch16', source="the model's (patch 16, or 14 for ViT-H)",
                  model_help=f"model name: {', '.join(models_mim.MODEL_NAMES)} (default: MIM_vit_base_patch16)")
    g.add_argument('--decoder_embed_dim', default=256, type=int,
                   help='width of each stage decoder (LocalMIM: 256; --demo: 64, for a cheap step on its 96-wide '
                        'encoder) (default: 256)')
    g.add_argument('--mask_ratio', default=0.75, type=float,
                   help='fraction of patches removed from the encoder input, in [0, 1) (default: 0.75)')
    g.add_argument('--hog_nbins', default=9, type=int, help='HOG orientation bins over 180 degrees (default: 9)')
    g.add_argument('--hog_bias', action='store_true',
                   help='frozen random bias on the HOG gradients, as in the ViT-L recipe (default: off)')
    g.add_argument('--all_stages', action='store_true',
                   help='every block feeds a decoder instead of blocks [1, 3, depth-3, depth-1] (default: off)')
    g.add_argument('--stage_weights', default='equal', type=str,
                   help=f'per-stage loss weights, shallow->deep: {models_mim.STAGE_WEIGHTS_HELP} (default: equal)')
    g.add_argument('--stage_weights_end', default=None, type=str, metavar='W1',
                   help='stage-loss curriculum: every weight moves linearly over the optimizer steps from '
                        '--stage_weights (step 0) to this (reached at step T; preset or comma list, same rules); '
                        'logged per epoch (default: none, weights fixed)')
    g = p.add_argument_group('FreezeOut (on when --t_0 or --how_scale is given, or --freeze_policy adaptive)')
    add_schedule_args(g)
    g.add_argument('--freezeout_weight_decay', default=None, type=float, metavar='WD',
                   help='AdamW weight decay of the FreezeOut units\' matrices (biases, norms and other 1-D params '
                        'stay at 0), >= 0; the never-frozen embedding of --dont_freeze_pe keeps --weight_decay. '
                        'ViTFreeze\'s FreezeOut runs until 2024-01-26 used 1e-5 here (its param-group builder\'s '
                        'default) against 0.05 in its baseline: docs/SEED_RUNS.md (default: --weight_decay)')
    g.add_argument('--plan_only', action='store_true',
                   help='print the FreezeOut plan (and projected saving) and exit without training')
    add_policy_args(g)
    g = p.add_argument_group('evaluation during pre-training')
    g.add_argument('--knn_eval_freq', default=0, type=int,
                   help='run weighted k-NN on the current encoder every N epochs and after the last (0 = off; '
                        '--demo: 20)')
    g.add_argument('--knn_at_init', action='store_true',
                   help='with --knn_eval_freq: also run the k-NN on the randomly initialised encoder before training '
                        '(the baseline the pre-training must beat; logged as knn_init_* in epoch 0) (default: off; '
                        '--demo: on)')
    g.add_argument('--knn_data_path', default=None, type=str,
                   help='ImageNet-style root with train/ and val/ for the online k-NN (default: --data_path)')
    g.add_argument('--vis_freq', default=20, type=int,
                   help='every N epochs write TensorBoard images of a fixed batch: input, mask, and HOG target vs '
                        'prediction of each active stage (0 = off; needs --log_dir) (default: 20; --demo: 10)')
    g.add_argument('--vis_images', default=4, type=int, help='images in the visualisation batch (default: 4)')
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
                        '--num_workers > 0)')
    g.add_argument('--compile_mode', default=None, choices=['default', 'reduce-overhead', 'max-autotune',
                                                            'max-autotune-no-cudagraphs'],
                   help="torch.compile mode for the inductor backend (default: None = torch's 'default')")
    add_common_args(p, output_dir='./output_dir', num_workers=10, save_freq=50)  # LocalMIM's period
    return p


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
    if args.prefetch_factor is not None and (args.prefetch_factor < 1 or args.num_workers < 1):
        raise UserError(f'--prefetch_factor {args.prefetch_factor}: needs a value >= 1 and --num_workers >= 1')


def build_model(args: argparse.Namespace) -> models_mim.LocalMIM:
    return models_mim.create_model(
        args.model, img_size=args.input_size, patch_size=args.patch_size, embed_dim=args.embed_dim,
        depth=args.depth, num_heads=args.num_heads, hog_nbins=args.hog_nbins, hog_bias=args.hog_bias,
        all_stages=args.all_stages, stage_weights=args.stage_weights, hog_bias_seed=args.seed,
        stage_weights_end=args.stage_weights_end, decoder_embed_dim=args.decoder_embed_dim)


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
    check_min_images(dataset, args.batch_size * du.get_world_size(), '--batch_size')
    loader = build_loader(dataset, args.batch_size, shuffle=True, drop_last=True, num_workers=args.num_workers,
                          pin_mem=args.pin_mem, seed=args.seed, distributed=args.distributed,
                          world_size=du.get_world_size(), rank=du.get_rank(), prefetch_factor=args.prefetch_factor)
    knn = _knn_setup(args, device) if args.knn_eval_freq > 0 and not args.plan_only else None  # data checked now
    spe = steps_per_epoch(len(loader), args.accum_iter, 5 if args.debug else None)
    if spe < 1:
        raise UserError(f'--accum_iter {args.accum_iter}: an epoch has only {len(loader)} batches of '
                        f'{args.batch_size}; lower --accum_iter or --batch_size')
    total_steps, warmup_steps = spe * args.epochs, spe * args.warmup_epochs

    model.to(device)
    eff_batch = absolute_lr(args, du.get_world_size())
    du.print0(f'{dataset.root}: {len(dataset)} images, {len(loader)} iterations/epoch, {spe} optimizer steps/epoch')
    du.print0(f'base lr: {args.lr * 256 / eff_batch:.2e}  actual lr: {args.lr:.2e}  accumulate grad iterations: '
              f'{args.accum_iter}  effective batch size: {eff_batch} ({args.batch_size} x {args.accum_iter} x '
              f'{du.get_world_size()} processes)')
    du.print0(f'model {args.model}: {args.input_size}px, patch {model.patch_size}, {model.depth} blocks, stages '
              f'(block, scale, cell px): {list(zip(model.stage_blocks, model.stage_scales, model.cell_sizes))}, '
              f'stage weights {model.stage_weights}' + _curriculum_note(args, model))
    if cuda_flags:
        du.print0(f'CUDA: {cuda_flags}, fused AdamW, pinned memory {args.pin_mem} + non_blocking copies')
    note = fused_attention_report(model)
    if note:
        du.print0(note)

    freezer, flops = None, None
    if args.freezeout and args.freeze_policy == 'adaptive':
        freezer = AdaptiveFreezeOut(
            model, total_steps, warmup_steps, WarmupCosine(args.lr, args.min_lr, warmup_steps, total_steps).lr_at,
            bounds_from_args(args, total_steps), args.freeze_signal, probe=_probe(args, model, device),
            sync=du.broadcast_from_rank0 if args.distributed else None, dont_freeze_pe=args.dont_freeze_pe,
            per_lr=args.freeze_per_lr)
        flops = measure_unit_flops(model, args.input_size, args.mask_ratio, device, args.dont_freeze_pe)
        du.print0(format_adaptive_plan(freezer, spe, flops))
        param_groups = _freezeout_param_groups(freezer, args)
    elif args.freezeout:
        schedule = FreezeOutSchedule(FreezeOut.unit_names(model, args.dont_freeze_pe), total_steps, warmup_steps,
                                     args.lr, args.min_lr, args.t_0, args.how_scale, scale_lr=not args.not_scale_lr,
                                     layerwise_lr=not args.non_layerwise_lr, freeze_schedule=args.freeze_schedule,
                                     lr_schedule=args.lr_schedule, constant_tail=args.constant_tail,
                                     unit_min_lr=args.unit_min_lr)
        freezer = FreezeOut(model, schedule, args.dont_freeze_pe)
        flops = measure_unit_flops(model, args.input_size, args.mask_ratio, device, args.dont_freeze_pe)
        du.print0(format_plan(schedule, spe, flops, args.dont_freeze_pe))
        param_groups = _freezeout_param_groups(freezer, args)
    else:
        param_groups = param_groups_weight_decay(model, args.weight_decay)
    du.print0(param_group_summary(param_groups))
    if args.plan_only:
        if not args.freezeout:
            du.print0(f'no FreezeOut (--t_0/--how_scale not given): plain warm-up + {args.lr_schedule}, nothing '
                      f'freezes; T={total_steps} steps, W={warmup_steps}')
        du.cleanup()
        return

    # fused: one kernel for all parameters (CPU and CUDA); 3-4x faster optimizer step than the per-tensor loop
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), fused=True)
    amp = make_amp(device, args.amp)
    lr_control = freezer if freezer is not None else WarmupCosine(args.lr, args.min_lr, warmup_steps, total_steps,
                                                                  shape=args.lr_schedule)

    def rewrap() -> nn.Module:
        # A fresh DDP reducer only registers parameters that still require grad, so frozen ones stop being
        # all-reduced and no find_unused_parameters traversal is needed.
        if not args.distributed:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)

    state = PretrainState(model=model, model_without_ddp=model, optimizer=optimizer, amp=amp,
                          lr_control=lr_control, steps_per_epoch=spe, total_steps=total_steps, rewrap=rewrap)
    resumed = resolve_resume(args)
    claim_run(args, resumed)  # before anything is written: refuses to mix runs in one folder
    if resumed:
        path, ckpt = resumed
        warn_changed_flags(ckpt.get('args', {}), args)
        saved = ckpt.get('args', {})
        if (freezer is not None and saved.get('freezeout') and 'freeze_schedule' not in saved
                and args.freeze_schedule != 'freezeout'):
            du.print0(f'warning: {path} predates --freeze_schedule and was trained with the freezeout schedule; '
                      f'continuing it with --freeze_schedule {args.freeze_schedule} changes the run (pass '
                      f'--freeze_schedule freezeout to continue it unchanged)')
        if freezer is not None:
            freezer.load_state_dict(ckpt.get('freezeout', {}), optimizer)  # before the optimizer: groups must match
        elif ckpt.get('freezeout', {}).get('num_frozen', 0):
            raise UserError(f'--resume {path}: the checkpoint has frozen FreezeOut units; resume with the same '
                            f'--t_0/--how_scale flags')
        try:
            model.load_state_dict(ckpt['model'])
        except RuntimeError as e:
            detail = '; '.join(l.strip() for l in str(e).splitlines()[1:3]) or str(e).splitlines()[0]
            raise UserError(f'--resume {path}: checkpoint does not match --model {args.model} with these flags '
                            f'({detail[:300]})') from None
        if 'optimizer' in ckpt:
            try:
                optimizer.load_state_dict(ckpt['optimizer'])
            except ValueError as e:  # e.g. saved without FreezeOut, resumed with --t_0/--how_scale (other groups)
                raise UserError(f'--resume {path}: optimizer state does not match these flags ({e}); resume with the '
                                f'FreezeOut flags (--t_0/--how_scale/--dont_freeze_pe) the run was started with') from None
        if amp.scaler is not None and ckpt.get('scaler'):
            amp.scaler.load_state_dict(ckpt['scaler'])
        args.start_epoch = int(ckpt['epoch']) + 1
        state.global_step = int(ckpt.get('step', args.start_epoch * spe))
        restore_rng_state(ckpt.get('rng'))
        du.print0(f'Resumed from {path}: epoch {ckpt["epoch"]} done, optimizer step {state.global_step}')
    if args.compile:
        opts = {'backend': args.compile_backend}
        if args.compile_mode and args.compile_backend == 'inductor':
            opts['mode'] = args.compile_mode
        limit = model.compile_regions(**opts)
        du.print0(f'compile: {model.depth} encoder blocks and {len(model.decoder)} stage decoders compiled '
                  f'({args.compile_backend}); at most {limit} variants per region, a hit is an error')
    state.model = rewrap() if args.distributed else state.model

    log_writer = TensorBoard(args.log_dir)
    vis_batch = _vis_batch(args, device) if (log_writer and args.vis_freq > 0) else None
    init_knn = {}
    if knn is not None and args.knn_at_init and args.start_epoch == 0:
        du.print0('k-NN of the randomly initialised encoder (the baseline):')
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):  # the run is unchanged
            init_knn = {k.replace('knn_', 'knn_init_', 1): v for k, v in knn(model).items()}
    du.print0(f'Start training for {args.epochs} epochs (from epoch {args.start_epoch})')
    start = time.time()
    saving = {'base_step_time': None, 'time': 0.0, 'steps': 0}
    trim_json_log(args.output_dir, args.start_epoch - 1, run_id=args.run_id)  # epochs redone now (logged, not saved)
    warned_data_bound = False  # the data-bound note is printed once per run
    stop = GracefulStop().start()  # SIGINT/SIGTERM: stop at a micro-batch boundary, keep checkpoint-last as is
    for epoch in range(args.start_epoch, args.epochs):
        seed_loader_epoch(loader, args.seed, epoch, du.get_rank())
        stats = train_one_epoch(state, loader, epoch, args, log_writer, stop=stop)
        record = {**{f'train_{k}': v for k, v in stats.items()}, 'epoch': epoch, 'step': state.global_step,
                  'stage_weights': model.current_stage_weights()}
        if epoch == 0:
            record.update(init_knn)
        if freezer is not None:
            record.update(frozen_units=freezer.num_frozen, active_stages=model.active_stages(),
                          unit_lr=freezer.lr_by_unit(state.global_step))
            record.update(_saving_so_far(saving, stats, epoch, args, freezer, flops, spe))
            if args.freeze_policy == 'adaptive':
                record.update(freeze_plasticity=freezer.plasticity,
                              freeze_decisions=[d for d in freezer.decisions
                                                if epoch * spe <= d['step'] < (epoch + 1) * spe])
        if args.compile:
            record.update({f'compile_{k}': v for k, v in compile_stats().items()})
        if knn is not None and ((epoch + 1) % args.knn_eval_freq == 0 or epoch + 1 == args.epochs):
            record.update(knn(model))
        if vis_batch is not None and ((epoch + 1) % args.vis_freq == 0 or epoch + 1 == args.epochs):
            with compile_eager():  # another batch size and the full decode: not worth compiled variants
                pics = render_stages(model, vis_batch, args.mask_ratio, seed=args.seed)
            for tag, img in pics.items():
                log_writer.image(tag, img, (epoch + 1) * 1000)
        _log_epoch(log_writer, record, epoch, freezer)
        note = data_bound_note(stats, epoch, args) if (epoch > args.start_epoch and not warned_data_bound) else None
        if note:
            du.print0(note)
            warned_data_bound = True
        numbered = (epoch % args.save_freq == 0) or (epoch + 1 == args.epochs)
        with epoch_record(args.output_dir, record, args.run_id):  # a failed save takes its record back out
            save_checkpoint(args.output_dir, epoch, {
                'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'scaler': amp.scaler.state_dict() if amp.scaler is not None else None, 'step': state.global_step,
                'freezeout': freezer.state_dict() if freezer is not None else {},
            }, args, numbered=numbered)
        lrs = [g['lr'] for g in optimizer.param_groups]
        du.print0(f'epoch {epoch}: loss {stats["loss"]:.4f}  lr {min(lrs):.2e}..{max(lrs):.2e}  '
                  f'frozen units {freezer.num_frozen if freezer else 0}  {stats["img_per_s"]:.1f} img/s  '
                  f'time left {_eta(start, epoch - args.start_epoch + 1, args.epochs - epoch - 1)}')
    log_writer.close()
    du.print0(f'Training time {time.strftime("%H:%M:%S", time.gmtime(time.time() - start))}')
    if args.demo and du.is_main_process():
        print(demo_summary(args, freezer, flops, spe), flush=True)
    stop.close()
    du.cleanup()


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
    kinds = {}
    for g in groups:
        u = g.get('unit')
        kind = 'all parameters' if u is None else 'FreezeOut units' if u >= 0 else 'never-frozen embedding'
        kinds.setdefault(kind, {}).setdefault(g['weight_decay'], 0)
        kinds[kind][g['weight_decay']] += len(g['params'])
    parts = [f'{kind}: ' + ', '.join(f'{wd:g} on {n} tensors' for wd, n in sorted(c.items(), reverse=True))
             for kind, c in kinds.items()]
    return (f'AdamW weight decay ({len(groups)} param groups; biases, norms and other 1-D tensors get 0): '
            + '; '.join(parts))


def _saving_so_far(acc: dict, stats: dict, epoch: int, args, freezer, flops, spe: int) -> dict:
    """Planned saving of the run so far (FLOP model over optimizer steps [0, end of this epoch)) and the measured
    saving over the epochs this process ran: compute time actually spent vs the step time of the latest epoch with
    nothing frozen (after the first, whose warm-up is noisy), for the same number of steps."""
    if freezer.num_frozen == 0 and (epoch > args.start_epoch or acc['base_step_time'] is None):
        acc['base_step_time'] = stats['step_time']
    acc['time'] += stats['compute_time']
    acc['steps'] += spe
    # adaptive: the decisions taken so far (a decided unit's freeze step may lie in the future: it is counted
    # only from that step on, and only within [0, done))
    key = 'decided_saving_so_far' if args.freeze_policy == 'adaptive' else 'planned_saving_so_far'
    out = {key: decided_saving(freezer, flops, (epoch + 1) * spe, args.dont_freeze_pe)}
    if acc['base_step_time']:
        out['measured_saving_so_far'] = 1.0 - acc['time'] / (acc['base_step_time'] * acc['steps'])
    return out


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
    if freezer is not None and getattr(freezer, 'schedule', None) is None:  # adaptive: decisions, no fixed plan
        lines.append(f'FreezeOut: adaptive policy; frozen by the end: {freezer.num_frozen} units; decided saving '
                     f'{100 * last.get("decided_saving_so_far", 0.0):.1f}% (FLOP model), measured '
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


DATA_BOUND_SHARE = 0.10


def data_bound_note(stats: dict, epoch: int, args) -> str:
    """One line when the epoch spent more than 10% of its wall time waiting for data ('' otherwise). Call after
    the first epoch of a process (worker start-up and compilation make the first one unrepresentative)."""
    share = stats.get('data_wait_share', 0.0)
    if share <= DATA_BOUND_SHARE:
        return ''
    return (f'note: data-bound: epoch {epoch} waited for data {100 * share:.0f}% of its wall time (> '
            f'{100 * DATA_BOUND_SHARE:.0f}%); steps wait for the loader, so faster steps (FreezeOut freezing '
            f'layers, --compile) save less wall time than planned. Raise --num_workers (now {args.num_workers}; '
            f'see bench/data_pipeline.py), read from faster local storage, or pre-resize the images '
            f'(e.g. shorter side 256-320 px)')


def _eta(start: float, done: int, left: int) -> str:
    per = (time.time() - start) / max(1, done)
    return time.strftime('%H:%M:%S', time.gmtime(per * left))


def _log_epoch(tb: TensorBoard, record: dict, epoch: int, freezer) -> None:
    if not tb:
        return
    x = (epoch + 1) * 1000
    for k in ('train_img_per_s', 'train_step_time', 'train_epoch_time', 'train_data_time', 'train_data_wait_share',
              'train_max_mem_mb'):
        if k in record:
            tb.scalar(f'perf/{k[6:]}', record[k], x)
    for k, w in enumerate(record.get('stage_weights', [])):
        tb.scalar(f'stage_weight/stage{k}', w, x)
    if freezer is not None:  # (the per-unit LR goes to TensorBoard from the training loop, per optimizer step)
        tb.scalar('freezeout/frozen_units', record['frozen_units'], x)
        tb.scalar('freezeout/active_stages', len(record['active_stages']), x)
        for k in ('planned_saving_so_far', 'decided_saving_so_far', 'measured_saving_so_far'):
            if k in record:
                tb.scalar(f'freezeout/{k}', record[k], x)
    for k, v in record.items():
        if k.startswith('knn_'):
            tb.scalar(f'knn/{k[4:]}', v, x)
    tb.flush()


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
    from models_vit import encoder_features, encoder_from_mim_model
    from util.knn import DEFAULT_KS, build_knn_loaders, format_knn, knn_evaluate
    data_path = args.knn_data_path or args.data_path
    train_loader, val_loader = build_knn_loaders(data_path, args.input_size, args.batch_size, args.num_workers,
                                                 shard=args.distributed, pin_mem=args.pin_mem,
                                                 bad_images=args.bad_images,
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
    def _main(args):
        try:
            main(args)
        except NonFiniteLoss as e:
            print(f'error: {e}. {resume_hint(args)}', file=sys.stderr, flush=True)
            sys.exit(3)
    run_main(_main, get_args_parser())
