"""Learning-rate schedule: per-optimizer-step linear warm-up, then a half-cosine to ``min_lr`` (MAE/LocalMIM) or a
constant peak (``--lr_schedule constant``).

Positions are counted in optimizer steps (not micro-batches), so gradient accumulation and world size only change
how many steps there are, never the shape of the curve. FreezeOut (``freezeout.py``) uses the same functions with a
per-unit end point, which is why ``--t_0 1`` reproduces plain training bit-exactly.
"""
import math
from typing import Optional

import torch

LR_SCHEDULES = ('cosine', 'constant')


def absolute_lr(args, world_size: int) -> int:
    """Set ``args.lr`` from ``--blr`` (MAE: lr = blr * effective batch / 256) unless ``--lr`` was given; returns the
    effective batch, ``batch_size * accum_iter * world_size``."""
    eff = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        args.lr = args.blr * eff / 256
    return eff


def warmup_cosine(step: int, peak: float, min_lr: float, warmup_steps: int, end_step: int) -> float:
    """LR at optimizer step ``step``.

    ``step < warmup_steps``: ``peak * step / warmup_steps``; otherwise
    ``min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * (step - warmup_steps) / (end_step - warmup_steps)))``,
    clamped at ``min_lr`` past ``end_step``.
    """
    if step < warmup_steps:
        return peak * step / warmup_steps
    span = end_step - warmup_steps
    if span <= 0:
        return min_lr
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_constant(step: int, peak: float, warmup_steps: int) -> float:
    """``peak * step / warmup_steps`` during warm-up, then ``peak`` for the rest of training."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    return peak


def global_lr(step: int, peak: float, min_lr: float, warmup_steps: int, total_steps: int,
              shape: str = 'cosine') -> float:
    """The plain run's LR at ``step`` for ``--lr_schedule`` ``shape`` (``min_lr`` is unused by ``constant``)."""
    if shape == 'constant':
        return warmup_constant(step, peak, warmup_steps)
    return warmup_cosine(step, peak, min_lr, warmup_steps, total_steps)


class WarmupCosine:
    """The plain (non-FreezeOut) schedule: every param group follows one curve, times its ``lr_scale`` if present.

    ``shape='constant'`` holds the peak after warm-up instead of the cosine (``--lr_schedule constant``)."""

    def __init__(self, peak: float, min_lr: float, warmup_steps: int, total_steps: int, shape: str = 'cosine'):
        if shape not in LR_SCHEDULES:
            raise ValueError(f'lr schedule {shape!r}: choose one of {LR_SCHEDULES}')
        self.peak, self.min_lr, self.warmup_steps, self.total_steps = peak, min_lr, warmup_steps, total_steps
        self.shape = shape

    def lr_at(self, step: int) -> float:
        return global_lr(step, self.peak, self.min_lr, self.warmup_steps, self.total_steps, self.shape)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for g in optimizer.param_groups:
            g['lr'] = lr * g.get('lr_scale', 1.0)
        return lr

    # the LR-control interface the training loops call (freezeout.FreezeOut offers the same): nothing ever freezes
    def step(self, optimizer: torch.optim.Optimizer, step: int) -> bool:
        self.apply(optimizer, step)
        return False

    def drain_events(self) -> list:
        return []


def steps_per_epoch(loader_len: int, accum_iter: int, debug_iters: Optional[int] = None) -> int:
    """Optimizer steps in one epoch: the trailing micro-batches that do not fill an accumulation window are
    dropped (they would never be stepped), unlike MAE/LocalMIM which silently discards them next epoch."""
    n = loader_len if not debug_iters else min(loader_len, debug_iters)
    return n // accum_iter
