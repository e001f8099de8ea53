"""Evaluation wiring shared by ``run_finetune.py``, ``run_linprobe.py`` and ``run_knn.py``.

What the three evaluators have in common, so that each script is only its ``get_args_parser()`` and a short
``main(args)``: the evaluation flags (model shape, ``--finetune``, pooling, ``--nb_classes``/``--eval``/
``--dist_eval``), ``--demo`` set-up, process/seed set-up, the evaluation model built from a checkpoint's architecture,
train/val ImageFolders and their loaders, the LR schedule and resuming a run of the same script.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, SequentialSampler

import checkpoint_formats
import models_vit
from util import distributed as du
from util.args import (add_arch_args, apply_demo_defaults, check_output_dir, explicit_flags, integer, real,
                       resolve_device_flag)
from util.checkpoint import resolve_resume
from util.datasets import build_dataset, build_loader, check_min_images
from util.errors import UserError, check
from util.knn import ShardSampler
from util.lr_sched import WarmupCosine, absolute_lr, steps_per_epoch
from util.rundir import claim_run, lock_output_dir
from util import demo_data

# run_pretrain.py --demo's architecture (util.demo_data.DEMO_ARCH) as a ViT; the architecture recorded in a
# --finetune checkpoint still wins over it.
DEMO_ARCH = dict(model='vit_tiny_patch16', **demo_data.DEMO_ARCH)
DEFAULT_MODEL = 'vit_large_patch16'  # MAE's default when neither --model nor the checkpoint names one


def demo_defaults(name: str, training: bool = True, **over: Any) -> Dict[str, Any]:
    """``--demo`` defaults of an evaluator: the demo architecture, small batches, ``./output/demo_<name>``."""
    out = dict(DEMO_ARCH, batch_size=32, num_workers=2, output_dir=f'./output/demo_{name}', device='cpu')
    if training:
        out.update(epochs=10, warmup_epochs=1, save_freq=5)
    out.update(over)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Flags


def add_model_args(parser: argparse.ArgumentParser, drop_path: Optional[float], resumes: bool = True) -> None:
    """--model, --input_size and the architecture overrides of the evaluation model (+ --drop_path if it trains)."""
    g = parser.add_argument_group('model')
    add_arch_args(g, model_default=None, source="the checkpoint's, else the model's",
                  input_source="the checkpoint's (its args, else its position-embedding grid), else 224",
                  model_help=f"{', '.join(models_vit.MODEL_NAMES)} (default: the architecture recorded in the "
                             f"{'--finetune/--resume' if resumes else '--finetune'} checkpoint, else "
                             f"{DEFAULT_MODEL})")
    if drop_path is not None:
        g.add_argument('--drop_path', default=drop_path, type=float, metavar='PCT',
                       help=f'stochastic depth rate, linear over blocks (default: {drop_path})',
                       domain=real(0, 1, hi_open=True), defines_run=True)


def add_eval_args(parser: argparse.ArgumentParser, *, title: str, finetune_help: str, global_pool: bool,
                  pool_help: str, cls_help: str, dist_eval_help: str, trains: bool = True) -> argparse._ArgumentGroup:
    """--finetune, --global_pool/--cls_token and --dist_eval; with ``trains`` also --nb_classes and --eval."""
    g = parser.add_argument_group(title)
    g.add_argument('--finetune', default='', type=str, metavar='CKPT', help=finetune_help)
    g.add_argument('--global_pool', action='store_true', default=global_pool, help=pool_help)
    g.add_argument('--cls_token', action='store_false', dest='global_pool', help=cls_help)
    if trains:
        g.add_argument('--nb_classes', default=None, type=int,
                       help='classifier outputs (default: the number of class folders in train/)',
                       domain=integer(1), defines_run=True)
        g.add_argument('--eval', action='store_true',
                       help='only evaluate the weights from --resume / auto-resume (else --finetune) and exit')
    g.add_argument('--dist_eval', action='store_true', help=dist_eval_help)
    return g


# ---------------------------------------------------------------------------------------------------------------------
# Run set-up


def demo_data_root() -> Path:
    """The demo ImageFolder of ``util/demo_data.py``: reuse any complete set at the default root, else make one."""
    from util.demo_data import MARKER, default_demo_root, make_demo_dataset
    root = default_demo_root()
    if (root / MARKER).is_file():
        return root
    return make_demo_dataset(root)


def prepare_args(args: argparse.Namespace, demo: Dict[str, Any]) -> None:
    """--demo defaults (explicit flags win), CPU fallback for --device, and a writable --output_dir."""
    if args.demo:
        apply_demo_defaults(args, dict(demo, data_path=str(demo_data_root())), args.argv)
    resolve_device_flag(args, args.argv)
    if args.data_backend == 'dali':  # without DALI: the one-line install hint before any work
        from util.dali_loader import require_dali
        require_dali()
    check_output_dir(args.output_dir)
    if args.log_dir:
        check_output_dir(args.log_dir, '--log_dir')


def init_run(args: argparse.Namespace) -> torch.device:
    """Process group, seeds (seed + rank for torch, numpy, random) and the run header."""
    device = du.init_distributed_mode(args)
    if not getattr(args, 'eval', False):
        lock_output_dir(args.output_dir)  # held until exit: one run per folder at a time
    du.seed_process(args.seed)
    du.print0(f'job dir: {os.path.dirname(os.path.realpath(__file__))}')
    du.print0('command: ' + ' '.join([os.path.basename(sys.argv[0])] + list(args.argv)))
    du.print0('\n'.join(f'  {k}: {v}' for k, v in sorted(vars(args).items()) if k != 'argv'))
    return device


# ---------------------------------------------------------------------------------------------------------------------
# Model from a checkpoint


def adopt_checkpoint_arch(args: argparse.Namespace, ckpt: Optional[Dict[str, Any]], where: str = '',
                          path: Optional[str] = None) -> None:
    """Set --model, the shape flags and --input_size that were not typed from the checkpoint (its tensors, args or
    export recipe), else from the model preset, and print where each number came from.

    ``where`` (e.g. ``'--finetune PATH'``) prefixes the one-line error when the head count cannot be known.
    """
    typed_names = set(explicit_flags(args.argv))
    typed = {k: getattr(args, k) for k in checkpoint_formats.ARCH_FLAGS if k in typed_names}
    current = {k: getattr(args, k) for k in checkpoint_formats.ARCH_FLAGS if k not in typed_names}
    found = checkpoint_formats.checkpoint_arch(ckpt, path) if ckpt else {}
    values, sources = checkpoint_formats.resolve_arch(found, typed, current, where or 'checkpoint', DEFAULT_MODEL)
    for k, v in values.items():
        setattr(args, k, v)
    du.print0(checkpoint_formats.describe_arch(values, sources))


def build_model(args: argparse.Namespace, num_classes: int, global_pool: str,
                drop_path: float = 0.0) -> nn.Module:
    return models_vit.create_model(args.model, img_size=args.input_size, patch_size=args.patch_size,
                                   embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
                                   num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path)


# ---------------------------------------------------------------------------------------------------------------------
# Data


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


def build_loaders(args: argparse.Namespace, train: Any, val: Any,
                  train_kind: str = 'finetune') -> Tuple[DataLoader, DataLoader]:
    """``(train, val)`` loaders; ``--data_backend dali``: util.dali_loader's with ``train_kind`` (finetune or
    linprobe) augmentation and the eval transform's sizes, over the same file lists and shards."""
    world, rank = du.get_world_size(), du.get_rank()
    check_min_images(train, args.batch_size * world, '--batch_size')
    if args.data_backend == 'dali':
        from util.dali_loader import build_dali_loader
        dist_eval = bool(args.dist_eval and args.distributed)
        return (build_dali_loader(train, train_kind, args, world_size=world, rank=rank),
                build_dali_loader(val, 'eval', args, shuffle_shard=dist_eval, drop_last=False, world_size=world,
                                  rank=rank))
    train_loader = build_loader(train, args.batch_size, shuffle=True, drop_last=True, num_workers=args.num_workers,
                                pin_mem=args.pin_mem, seed=args.seed, distributed=args.distributed,
                                world_size=world, rank=rank)
    sampler = ShardSampler(len(val)) if args.dist_eval and args.distributed else SequentialSampler(val)
    val_loader = DataLoader(val, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                            pin_memory=bool(args.pin_mem and torch.cuda.is_available()), drop_last=False)
    return train_loader, val_loader


# ---------------------------------------------------------------------------------------------------------------------
# Training: schedule, DDP, resuming


def lr_setup(args: argparse.Namespace, loader_len: int) -> Tuple[WarmupCosine, int]:
    """Absolute LR from --blr (printed with the effective batch) and the per-step warm-up + cosine schedule."""
    eff = absolute_lr(args, du.get_world_size())
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


MISMATCH = 'not a checkpoint of this model ({detail}); pre-training checkpoints go to --finetune'


def restore(resume: Tuple[str, Dict[str, Any]], model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
            scaler: Optional[torch.amp.GradScaler], args: argparse.Namespace, freezer: Any = None) -> float:
    """Load a training checkpoint of this script (weights only without ``optimizer``, for --eval); returns the best
    accuracy so far. Sets ``args.start_epoch`` when continuing training (engine_common.restore_training)."""
    from engine_common import load_weights, restore_training
    path, ckpt = resume
    if optimizer is None:
        load_weights(resume, model, MISMATCH)
    else:
        restore_training(resume, model, optimizer, scaler, freezer, args, MISMATCH)
    du.print0(f"resumed from {path} (epoch {ckpt.get('epoch')}); next epoch {args.start_epoch}")
    return float(ckpt.get('max_accuracy', 0.0))


def checkpoints_for(args: argparse.Namespace) -> Tuple[Optional[Tuple[str, Dict[str, Any]]], Optional[Dict]]:
    """``(resume, finetune checkpoint)``, with the architecture flags adopted from whichever will be loaded.

    A resumable checkpoint (``--resume``, or auto-resume in ``--output_dir``) makes ``--finetune`` moot; but
    auto-resume never silently replaces what the command asks for: a run in ``--output_dir`` that was started from
    another ``--finetune`` or with other typed architecture flags stops with one line.
    """
    resume = resolve_resume(args)
    if not args.eval:
        claim_run(args, resume)  # refuses to start over a folder holding another run's checkpoints
    if resume is not None:
        if not args.resume:
            _check_same_run(args, *resume)
        if args.finetune:
            du.print0(f'--finetune {args.finetune} not loaded: resuming from {resume[0]} instead')
        adopt_checkpoint_arch(args, resume[1], f'--resume {resume[0]}', resume[0])
        return resume, None
    pre = checkpoint_formats.read_checkpoint(args.finetune) if args.finetune else None
    adopt_checkpoint_arch(args, pre, f'--finetune {args.finetune}', args.finetune or None)
    return None, pre


def _same_file(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_same_run(args: argparse.Namespace, path: str, ckpt: Dict[str, Any]) -> None:
    saved = ckpt.get('args')
    if not isinstance(saved, dict):
        return
    typed = set(explicit_flags(args.argv)) | ({'global_pool'} if 'cls_token' in explicit_flags(args.argv) else set())
    differ = []
    if args.finetune and not _same_file(args.finetune, str(saved.get('finetune') or '')):
        differ.append(('finetune', args.finetune, saved.get('finetune') or "'' (random init)"))
    for k in checkpoint_formats.ARCH_FLAGS + ('global_pool',):
        if k in typed and k in saved and saved[k] is not None:
            now, then = getattr(args, k), saved[k]
            same = models_vit.vit_name(now) == models_vit.vit_name(then) if k == 'model' else now == then
            if not same:
                differ.append((k, now, then))
    if differ:
        asked = ' '.join(f'--{k} {now}' for k, now, _ in differ)
        had = ' '.join(f'--{k} {then}' for k, _, then in differ)
        raise UserError(f'--output_dir {args.output_dir} holds a run started with {had} ({path}, epoch '
                        f'{ckpt.get("epoch")}), but this command asks for {asked}; to continue that run pass '
                        f'--resume {path}, to start this one pass a new --output_dir (or --no_auto_resume --overwrite, which '
                        f'moves that run aside)')
