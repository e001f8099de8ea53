"""Fine-tune a pre-trained encoder for image classification (MAE / LocalMIM recipe, LOCALMIM.md §3).

    torchrun --nproc_per_node=8 run_finetune.py --batch_size 128 --model vit_base_patch16 \\
        --finetune PRETRAIN/checkpoint-99.pth --epochs 100 --warmup_epochs 20 --lr 4e-3 --min_lr 1e-6 \\
        --layer_decay 0.75 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 \\
        --dist_eval --data_path /path/to/imagenet --output_dir OUT --log_dir OUT
    python run_finetune.py --demo --finetune DEMO_PRETRAIN/checkpoint-N.pth     # tiny CPU run on the demo data

The wiring shared with ``run_linprobe.py`` and ``run_knn.py`` (model from a checkpoint, data, resume) lives in
``eval_common.py``.
"""
import argparse
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_vit
from engine_finetune import evaluate, fit
from freezeout import (AdaptiveFreezeOut, FreezeOut, FreezeOutSchedule, add_policy_args, add_schedule_args,
                       bounds_from_args, decided_saving, eval_mode_probe, format_adaptive_plan, format_plan,
                       measure_unit_flops, resolve_freeze_args, tag_param_groups)
from eval_common import add_eval_args, add_model_args, build_datasets, build_loaders, \
    build_model, checkpoints_for, demo_defaults, init_run, lr_setup, prepare_args, restore, wrap_ddp
from util import distributed as du
from util.amp import make_amp
from util.args import add_common_args, add_optim_args, run_main
from util.datasets import finetune_transform
from util.errors import UserError, check
from util.log import TensorBoard

DEMO_DEFAULTS = demo_defaults('finetune')


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('MAE/LocalMIM fine-tuning for image classification', add_help=False)
    g = add_optim_args(parser, title='optimizer (AdamW) and schedule', batch_size=64, epochs=50, blr=1e-3,
                       min_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
                       weight_decay_help='AdamW weight decay; none for 1-D params, pos_embed and cls_token')
    g.add_argument('--clip_grad', default=None, type=float, metavar='NORM',
                   help='clip the global gradient norm to NORM (default: None = no clipping)')
    g.add_argument('--layer_decay', default=0.75, type=float,
                   help='layer-wise lr decay: block i (1-based) gets decay^(depth+1-i), the embeddings '
                        'decay^(depth+1), norm/head 1 (default: 0.75)')
    add_model_args(parser, drop_path=0.1)

    g = parser.add_argument_group('augmentation and regularisation (timm create_transform / Mixup)')
    g.add_argument('--color_jitter', default=None, type=float, metavar='PCT',
                   help='colour jitter strength; ignored when --aa is set, as in timm (default: None)')
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', type=str, metavar='NAME',
                   help="timm auto-augment policy; 'none' disables (default: rand-m9-mstd0.5-inc1)")
    g.add_argument('--smoothing', default=0.1, type=float, help='label smoothing (default: 0.1)')
    g.add_argument('--reprob', default=0.25, type=float, metavar='PCT', help='random erasing probability '
                   '(default: 0.25)')
    g.add_argument('--remode', default='pixel', type=str, help="random erasing fill: pixel | rand | const "
                   "(default: pixel)")
    g.add_argument('--recount', default=1, type=int, help='random erasing boxes per image (default: 1)')
    g.add_argument('--resplit', action='store_true', default=False,
                   help='accepted for MAE compatibility; has no effect without augmentation splits (as in MAE)')
    g.add_argument('--mixup', default=0, type=float, help='mixup alpha; active if > 0 (default: 0)')
    g.add_argument('--cutmix', default=0, type=float, help='cutmix alpha; active if > 0 (default: 0)')
    g.add_argument('--cutmix_minmax', default=None, type=float, nargs='+', metavar='F',
                   help='cutmix min/max box ratio; overrides --cutmix alpha when set (default: None)')
    g.add_argument('--mixup_prob', default=1.0, type=float,
                   help='probability of applying mixup or cutmix to a batch (default: 1.0)')
    g.add_argument('--mixup_switch_prob', default=0.5, type=float,
                   help='probability of cutmix instead of mixup when both are on (default: 0.5)')
    g.add_argument('--mixup_mode', default='batch', type=str,
                   help='how to apply mixup/cutmix params: batch | pair | elem (default: batch)')

    g = parser.add_argument_group('FreezeOut in fine-tuning (on when --t_0 or --how_scale is given, or '
                                  '--freeze_policy adaptive): units = embedding, then one per block; fc_norm/head '
                                  'never freeze; the unit LR multiplies the layer-decay scale')
    add_schedule_args(g, embed='patch embedding, cls token and pos embed')
    g.add_argument('--plan_only', action='store_true',
                   help='print the FreezeOut plan (or adaptive policy) with its FLOP saving and exit')
    add_policy_args(g)

    add_eval_args(parser, title='initialisation and evaluation',
                  finetune_help='pre-training checkpoint (ours incl. FreezeOut, MAE, LocalMIM) whose encoder '
                                'initialises the model; checkpoints in --output_dir (auto-resume) take precedence',
                  global_pool=True,
                  pool_help='classify the mean patch token through a fresh fc_norm (MAE default: on)',
                  cls_help='classify the cls token after the final norm (LocalMIM: the last stage norm)',
                  dist_eval_help='split the val set over processes without padding (exact, faster); otherwise '
                                 'every process evaluates all of it')
    add_common_args(parser, output_dir='./output/finetune', num_workers=10, save_freq=20)
    return parser


# ---------------------------------------------------------------------------------------------------------------------


def setup_freezeout(args: argparse.Namespace, model: nn.Module, schedule, spe: int, device: torch.device,
                    val_set) -> Tuple[Any, Dict[str, Any]]:
    """The freezer (scheduled or adaptive) over the ViT's units, its FLOP model, and the printed plan."""
    seam = models_vit.ViTUnits(model)
    total, warm = schedule.total_steps, schedule.warmup_steps
    flops = measure_unit_flops(model, args.input_size, 0.0, device, args.dont_freeze_pe, time_targets=False,
                               forward=model, units=seam.units())
    if args.freeze_policy == 'adaptive':
        probe = None
        if args.freeze_signal == 'output':
            from util.vis import fixed_batch
            imgs = fixed_batch(val_set, 16, device)  # val transform: deterministic, the same on every rank
            probe = eval_mode_probe(model, seam.unit_features, imgs)
        freezer = AdaptiveFreezeOut(seam, total, warm, schedule.lr_at, bounds_from_args(args, total),
                                    args.freeze_signal, probe=probe,
                                    sync=du.broadcast_from_rank0 if args.distributed else None,
                                    dont_freeze_pe=args.dont_freeze_pe, per_lr=args.freeze_per_lr)
        du.print0(format_adaptive_plan(freezer, spe, flops))
    else:
        names = FreezeOut.unit_names(seam, args.dont_freeze_pe)
        plan = FreezeOutSchedule(names, total, warm, args.lr, args.min_lr, args.t_0, args.how_scale,
                                 scale_lr=not args.not_scale_lr, layerwise_lr=not args.non_layerwise_lr,
                                 freeze_schedule=args.freeze_schedule, unit_min_lr=args.unit_min_lr)
        freezer = FreezeOut(seam, plan, args.dont_freeze_pe)
        du.print0(format_plan(plan, spe, flops, args.dont_freeze_pe))
    return freezer, flops


def main(args: argparse.Namespace) -> None:
    prepare_args(args, DEMO_DEFAULTS)
    resolve_freeze_args(args, args.argv)
    device = init_run(args)
    resume, pre = checkpoints_for(args)  # first: the checkpoint may set --input_size
    train_set, val_set, nb_classes = build_datasets(args, finetune_transform(True, args),
                                                    finetune_transform(False, args))
    model = build_model(args, nb_classes, 'avg' if args.global_pool else 'token', args.drop_path)
    if pre is not None:
        models_vit.load_pretrained(model, args.finetune, head_init_std=2e-5, ckpt=pre)
    model.to(device)
    amp = make_amp(device, args.amp)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    du.print0(f'model {args.model}: {n_parameters / 1e6:.2f} M trainable parameters; precision {amp.name}')
    train_loader, val_loader = build_loaders(args, train_set, val_set)
    if args.eval:
        check(resume is not None or pre is not None,
              '--eval needs weights: pass --resume CKPT (or --finetune CKPT), or an --output_dir with checkpoints')
        if resume is not None:
            restore(resume, model, None, None, args)
        evaluate(model, val_loader, device, amp)
        return

    schedule, spe = lr_setup(args, len(train_loader))
    groups = models_vit.layer_decay_param_groups(model, args.weight_decay, args.layer_decay, verbose=True)
    freezer, flops = None, None
    if args.freezeout:
        freezer, flops = setup_freezeout(args, model, schedule, spe, device, val_set)
        groups = tag_param_groups(groups, freezer.model.units(), args.dont_freeze_pe)
    if args.plan_only:
        du.cleanup()
        return
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    if resume:
        saved = resume[1].get('freezeout') or {}
        if freezer is not None:
            freezer.load_state_dict(saved, optimizer)  # before the optimizer: its groups must match
        elif saved.get('num_frozen', 0) and set(resume[1].get('model') or {}) == set(model.state_dict()):
            # (a checkpoint of another model, e.g. a pre-training one, is refused by restore() with its own line)
            raise UserError(f'--resume {resume[0]}: the checkpoint has frozen FreezeOut units; resume with the '
                            f'same FreezeOut flags (--t_0/--how_scale/--freeze_policy)')
    max_acc = restore(resume, model, optimizer, amp.scaler, args) if resume else 0.0
    model_ddp = wrap_ddp(model, args, device)  # after a resumed freeze: frozen parameters are not registered
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        check(args.batch_size % 2 == 0, f'--batch_size {args.batch_size}: mixup/cutmix need an even batch size')
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=nb_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    du.print0(f'criterion: {criterion.__class__.__name__}; mixup: {mixup_fn is not None}')
    tb = TensorBoard(args.log_dir)
    epoch_record = None
    if freezer is not None:
        def epoch_record(epoch: int) -> Dict[str, Any]:
            done = (epoch + 1) * spe
            key = 'decided_saving_so_far' if args.freeze_policy == 'adaptive' else 'planned_saving_so_far'
            rec = {'frozen_units': freezer.num_frozen, 'unit_lr': freezer.lr_by_unit(done),
                   key: decided_saving(freezer, flops, done, args.dont_freeze_pe)}
            if args.freeze_policy == 'adaptive':
                rec.update(freeze_plasticity=freezer.plasticity,
                           freeze_decisions=[d for d in freezer.decisions if epoch * spe <= d['step'] < done])
            return rec
    fit(model_ddp, model, criterion, optimizer, amp, freezer or schedule, spe, train_loader, val_loader, device,
        args, tb, mixup_fn, max_acc, n_parameters, rewrap=lambda: wrap_ddp(model, args, device),
        epoch_record=epoch_record)
    tb.close()
    du.cleanup()


if __name__ == '__main__':
    run_main(main, argparse.ArgumentParser('MAE/LocalMIM fine-tuning', parents=[get_args_parser()]))
