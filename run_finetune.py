"""Fine-tune a pre-trained encoder for image classification (MAE / LocalMIM recipe, LOCALMIM.md §3).

    torchrun --nproc_per_node=8 run_finetune.py --batch_size 128 --model vit_base_patch16 \\
        --finetune PRETRAIN/checkpoint-99.pth --epochs 100 --warmup_epochs 20 --lr 4e-3 --min_lr 1e-6 \\
        --layer_decay 0.75 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 \\
        --dist_eval --data_path /path/to/imagenet --output_dir OUT --log_dir OUT
    python run_finetune.py --demo --finetune DEMO_PRETRAIN/checkpoint-N.pth     # tiny CPU run on the demo data

The helpers below (data, model architecture, resume) are shared with ``run_linprobe.py`` and ``run_knn.py``.
"""
import argparse
import os
import random
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader, SequentialSampler

import models_vit
from engine_finetune import evaluate, fit
from util import distributed as du
from util.amp import make_amp
from util.args import add_common_args, apply_demo_defaults, check_output_dir, explicit_flags, resolve_device_flag, \
    run_main
from util.checkpoint import resolve_resume, restore_rng_state, warn_changed_flags
from util.datasets import build_dataset, build_loader, check_min_images, finetune_transform
from util.errors import UserError, check
from util.knn import ShardSampler
from util.log import TensorBoard
from util.rundir import claim_run, lock_output_dir
from util.lr_sched import WarmupCosine, steps_per_epoch

# Tiny CPU defaults matching run_pretrain.py --demo (input 32, patch 4, width 96, depth 6, 3 heads); the architecture
# recorded in a --finetune checkpoint still wins over them.
DEMO_ARCH = dict(model='vit_tiny_patch16', input_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3)
DEMO_DEFAULTS = dict(DEMO_ARCH, batch_size=32, epochs=10, warmup_epochs=1, num_workers=2, save_freq=5,
                     output_dir='./output/demo_finetune', device='cpu')
DEFAULT_MODEL = 'vit_large_patch16'  # MAE's default when neither --model nor the checkpoint names one


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('MAE/LocalMIM fine-tuning for image classification', add_help=False)
    parser.add_argument('--batch_size', default=64, type=int,
                        help='images per GPU/process; effective batch = batch_size * accum_iter * world size '
                             '(default: 64)')
    parser.add_argument('--epochs', default=50, type=int, help='training epochs (default: 50)')
    parser.add_argument('--accum_iter', default=1, type=int,
                        help='micro-batches per optimizer step, to reach a large effective batch on few GPUs '
                             '(default: 1)')
    add_model_args(parser, drop_path=0.1)

    g = parser.add_argument_group('optimizer and schedule')
    g.add_argument('--clip_grad', default=None, type=float, metavar='NORM',
                   help='clip the global gradient norm to NORM (default: None = no clipping)')
    g.add_argument('--weight_decay', default=0.05, type=float,
                   help='AdamW weight decay; none for 1-D params, pos_embed and cls_token (default: 0.05)')
    g.add_argument('--lr', default=None, type=float, metavar='LR',
                   help='absolute peak learning rate; overrides --blr (default: None)')
    g.add_argument('--blr', default=1e-3, type=float, metavar='LR',
                   help='base learning rate: lr = blr * effective batch / 256 (default: 1e-3)')
    g.add_argument('--layer_decay', default=0.75, type=float,
                   help='layer-wise lr decay: block i (1-based) gets decay^(depth+1-i), the embeddings '
                        'decay^(depth+1), norm/head 1 (default: 0.75)')
    g.add_argument('--min_lr', default=1e-6, type=float, metavar='LR',
                   help='final learning rate of the cosine schedule (default: 1e-6)')
    g.add_argument('--warmup_epochs', default=5, type=int, metavar='N',
                   help='epochs of linear warm-up from 0, counted in optimizer steps (default: 5)')

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

    g = parser.add_argument_group('initialisation and evaluation')
    g.add_argument('--finetune', default='', type=str, metavar='CKPT',
                   help='pre-training checkpoint (ours incl. FreezeOut, MAE, LocalMIM) whose encoder initialises '
                        'the model; checkpoints in --output_dir (auto-resume) take precedence')
    g.add_argument('--global_pool', action='store_true', default=True,
                   help='classify the mean patch token through a fresh fc_norm (MAE default: on)')
    g.add_argument('--cls_token', action='store_false', dest='global_pool',
                   help='classify the cls token after the final norm (LocalMIM: the last stage norm)')
    g.add_argument('--nb_classes', default=None, type=int,
                   help='classifier outputs (default: the number of class folders in train/)')
    g.add_argument('--eval', action='store_true',
                   help='only evaluate the weights from --resume / auto-resume (else --finetune) and exit')
    g.add_argument('--dist_eval', action='store_true',
                   help='split the val set over processes without padding (exact, faster); otherwise every '
                        'process evaluates all of it')
    add_common_args(parser, output_dir='./output/finetune', num_workers=10)
    parser.set_defaults(save_freq=20)
    return parser


def add_model_args(parser: argparse.ArgumentParser, drop_path: Optional[float]) -> None:
    """--model, --input_size and the architecture overrides shared by the three evaluation scripts."""
    g = parser.add_argument_group('model')
    g.add_argument('--model', default=None, type=str, metavar='NAME',
                   help=f"{', '.join(models_vit.MODEL_NAMES)} (default: the architecture recorded in the "
                        f"--finetune/--resume checkpoint, else {DEFAULT_MODEL})")
    g.add_argument('--input_size', default=224, type=int, help='image side in pixels (default: 224)')
    g.add_argument('--patch_size', default=None, type=int,
                   help="patch side in pixels (default: the model's, or the checkpoint's)")
    g.add_argument('--embed_dim', default=None, type=int, help="encoder width (default: the model's / checkpoint's)")
    g.add_argument('--depth', default=None, type=int, help="encoder blocks (default: the model's / checkpoint's)")
    g.add_argument('--num_heads', default=None, type=int,
                   help="attention heads (default: the model's / checkpoint's)")
    if drop_path is not None:
        g.add_argument('--drop_path', default=drop_path, type=float, metavar='PCT',
                       help=f'stochastic depth rate, linear over blocks (default: {drop_path})')


# ---------------------------------------------------------------------------------------------------------------------
# Setup shared by the evaluation scripts


def demo_data_root() -> Path:
    """The demo ImageFolder of ``util/demo_data.py``: reuse any complete set at the default root, else make one."""
    from util.demo_data import MARKER, default_demo_root, make_demo_dataset
    root = default_demo_root()
    if (root / MARKER).is_file():
        return root
    return make_demo_dataset(root)


def prepare_args(args: argparse.Namespace, demo_defaults: Dict[str, Any]) -> None:
    """--demo defaults (explicit flags win), CPU fallback for --device, and a writable --output_dir."""
    if args.demo:
        apply_demo_defaults(args, dict(demo_defaults, data_path=str(demo_data_root())), args.argv)
    resolve_device_flag(args, args.argv)
    check_output_dir(args.output_dir)
    if args.log_dir:
        check_output_dir(args.log_dir, '--log_dir')


def init_run(args: argparse.Namespace) -> torch.device:
    """Process group, seeds (seed + rank for torch, numpy, random) and the run header."""
    device = du.init_distributed_mode(args)
    if not getattr(args, 'eval', False):
        lock_output_dir(args.output_dir)  # held until exit: one run per folder at a time
    seed = args.seed + du.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    du.print0(f'job dir: {os.path.dirname(os.path.realpath(__file__))}')
    du.print0('command: ' + ' '.join([os.path.basename(sys.argv[0])] + list(args.argv)))
    du.print0('\n'.join(f'  {k}: {v}' for k, v in sorted(vars(args).items()) if k != 'argv'))
    return device


def adopt_checkpoint_arch(args: argparse.Namespace, ckpt: Optional[Dict[str, Any]]) -> None:
    """Fill --model/--patch_size/--embed_dim/--depth/--num_heads that were not typed from the checkpoint's args."""
    typed = set(explicit_flags(args.argv))
    arch = models_vit.arch_from_checkpoint(ckpt) if ckpt else {}
    if arch and 'model' in typed and models_vit.vit_name(args.model) != arch['model']:
        arch = {}  # another model family was asked for explicitly: keep its own defaults (mismatch is reported)
    taken = []
    for k in ('model',) + models_vit.ARCH_KEYS:
        if k not in typed and arch.get(k) is not None and getattr(args, k) != arch[k]:
            setattr(args, k, arch[k])
            taken.append(f'--{k} {arch[k]}')
    if taken:
        du.print0(f"architecture from the checkpoint's args: {' '.join(taken)}")
    if args.model is None:
        args.model = DEFAULT_MODEL


def build_model(args: argparse.Namespace, num_classes: int, global_pool: str,
                drop_path: float = 0.0) -> nn.Module:
    return models_vit.create_model(args.model, img_size=args.input_size, patch_size=args.patch_size,
                                   embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
                                   num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path)


def build_datasets(args: argparse.Namespace, train_tf: Any, val_tf: Any) -> Tuple[Any, Any, int]:
    """``(train, val, nb_classes)``; val must have the same class folders as train (labels are folder indices)."""
    train = build_dataset(args.data_path, 'train', train_tf, bad_images=args.bad_images, seed=args.seed)
    val = build_dataset(args.data_path, 'val', val_tf, bad_images=args.bad_images)
    check(val.classes == train.classes,
          f'--data_path {args.data_path}: val/ class folders differ from train/ ({len(val.classes)} vs '
          f'{len(train.classes)}); labels are folder indices, so both splits need the same class folders')
    folders = len(train.classes)
    if args.nb_classes is None:
        args.nb_classes = folders
    check(args.nb_classes >= folders,
          f'--nb_classes {args.nb_classes} is smaller than the {folders} class folders in {train.root}; '
          f'omit it to use the folder count')
    du.print0(f'data: {len(train)} train / {len(val)} val images, {folders} classes, {args.nb_classes} outputs')
    return train, val, args.nb_classes


def build_loaders(args: argparse.Namespace, train: Any, val: Any) -> Tuple[DataLoader, DataLoader]:
    world, rank = du.get_world_size(), du.get_rank()
    check_min_images(train, args.batch_size * world, '--batch_size')
    train_loader = build_loader(train, args.batch_size, shuffle=True, drop_last=True, num_workers=args.num_workers,
                                pin_mem=args.pin_mem, seed=args.seed, distributed=args.distributed,
                                world_size=world, rank=rank)
    sampler = ShardSampler(len(val)) if args.dist_eval and args.distributed else SequentialSampler(val)
    val_loader = DataLoader(val, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                            pin_memory=bool(args.pin_mem and torch.cuda.is_available()), drop_last=False)
    return train_loader, val_loader


def lr_setup(args: argparse.Namespace, loader_len: int) -> Tuple[WarmupCosine, int]:
    """Absolute LR from --blr (printed with the effective batch) and the per-step warm-up + cosine schedule."""
    eff = args.batch_size * args.accum_iter * du.get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff / 256
    du.print0(f'base lr: {args.lr * 256 / eff:.2e}')
    du.print0(f'actual lr: {args.lr:.2e}')
    du.print0(f'accumulate grad iterations: {args.accum_iter}')
    du.print0(f'effective batch size: {eff}')
    spe = steps_per_epoch(loader_len, args.accum_iter, 5 if args.debug else None)
    check(spe > 0, f'--accum_iter {args.accum_iter}: the train loader has only {loader_len} batches per process, '
                   f'fewer than one optimizer step; lower --accum_iter or --batch_size')
    return WarmupCosine(args.lr, args.min_lr, args.warmup_epochs * spe, args.epochs * spe), spe


def wrap_ddp(model: nn.Module, args: argparse.Namespace, device: torch.device) -> nn.Module:
    if not args.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda'
                                                     else None)


def restore(resume: Tuple[str, Dict[str, Any]], model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
            scaler: Optional[torch.amp.GradScaler], args: argparse.Namespace) -> float:
    """Load a training checkpoint of this script; returns the best accuracy so far. Sets ``args.start_epoch``."""
    path, ckpt = resume
    try:
        model.load_state_dict(ckpt['model'])
    except (RuntimeError, KeyError) as e:
        lines = [l.strip() for l in str(e).strip().splitlines()]
        first = '; '.join(lines[1:3] or lines[:1])[:300]  # line 0 is only 'Error(s) in loading state_dict for ...'
        raise UserError(f'--resume {path}: not a checkpoint of this model ({first}); pre-training checkpoints go to '
                        f'--finetune') from None
    if optimizer is not None and 'optimizer' in ckpt:
        optimizer.load_state_dict(ckpt['optimizer'])
        if scaler is not None and 'scaler' in ckpt:
            scaler.load_state_dict(ckpt['scaler'])
        args.start_epoch = int(ckpt['epoch']) + 1
        restore_rng_state(ckpt.get('rng'))
        warn_changed_flags(ckpt.get('args', {}), args)
    du.print0(f"resumed from {path} (epoch {ckpt.get('epoch')}); next epoch {args.start_epoch}")
    return float(ckpt.get('max_accuracy', 0.0))


def checkpoints_for(args: argparse.Namespace) -> Tuple[Optional[Tuple[str, Dict[str, Any]]], Optional[Dict]]:
    """(resume, finetune checkpoint): a resumable checkpoint (--resume or auto-resume) makes --finetune moot."""
    resume = resolve_resume(args)
    if not args.eval:
        claim_run(args, resume)  # refuses to start over a folder holding another run's checkpoints
    if resume is not None:
        if args.finetune:
            du.print0(f'--finetune {args.finetune} not loaded: resuming from {resume[0]} instead')
        return resume, None
    return None, (models_vit.read_checkpoint(args.finetune) if args.finetune else None)


# ---------------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> None:
    prepare_args(args, DEMO_DEFAULTS)
    device = init_run(args)
    train_set, val_set, nb_classes = build_datasets(args, finetune_transform(True, args),
                                                    finetune_transform(False, args))
    resume, pre = checkpoints_for(args)
    adopt_checkpoint_arch(args, resume[1] if resume else pre)
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

    model_ddp = wrap_ddp(model, args, device)
    schedule, spe = lr_setup(args, len(train_loader))
    groups = models_vit.layer_decay_param_groups(model, args.weight_decay, args.layer_decay, verbose=True)
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    max_acc = restore(resume, model, optimizer, amp.scaler, args) if resume else 0.0
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
    fit(model_ddp, model, criterion, optimizer, amp, schedule, spe, train_loader, val_loader, device, args, tb,
        mixup_fn, max_acc, n_parameters)
    tb.close()
    du.cleanup()


if __name__ == '__main__':
    run_main(main, argparse.ArgumentParser('MAE/LocalMIM fine-tuning', parents=[get_args_parser()]))
