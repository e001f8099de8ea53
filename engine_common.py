"""What the pre-training and fine-tuning loops share: the LR/freeze step with its log lines, reading the pending
device losses (the one non-finite check), and restoring a training checkpoint (the one resume).

``ctl`` below is the run's LR control: a :class:`freezeout.FreezeOut` (any freeze policy) or the plain
``util.lr_sched.WarmupCosine``; both offer ``step(optimizer, step) -> changed`` and ``drain_events()``.
"""
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from freezeout import format_decision
from util import distributed as du
from util.checkpoint import restore_rank_rng, warn_changed_flags
from util.errors import UserError
from util.log import MetricLogger, TensorBoard
from util.signals import NonFiniteLoss


def set_lrs(ctl: Any, optimizer: torch.optim.Optimizer, step: int, epoch: int, frac: float,
            tb: Optional[TensorBoard], describe: Optional[Callable[[], str]] = None) -> bool:
    """This optimizer step's LRs and freeze events; one line per policy decision and per freeze (``describe()``
    adds what the model says about it), signals to TensorBoard at ``epoch_1000x``. True if the frozen set changed
    (the caller then re-wraps DDP)."""
    changed = ctl.step(optimizer, step)
    x = int((frac + epoch) * 1000)
    for ev in ctl.drain_events():
        if ev['kind'] == 'decision':
            du.print0(format_decision(ev, epoch))
            if tb:
                tb.scalar('freezeout/decided_unit', ev['index'], x)
        elif ev['kind'] == 'signal':
            if tb and ev.get('plasticity'):
                tb.scalars('freezeout/plasticity', ev['plasticity'], x)
        elif ev['kind'] == 'freeze':
            du.print0(f"FreezeOut: step {ev['step']} (epoch {epoch}): frozen units {ev['frozen_units']}"
                      + (f'; {describe()}' if describe else ''))
    return changed


def flush_losses(pending: List[Dict[str, Any]], logger: MetricLogger, epoch: int, n_micro: int,
                 tb: Optional[TensorBoard], loss_tag: str, names: Tuple[str, str, Optional[str]] = ('{}', '{}', None),
                 mean_over_ranks: bool = False, advice: str = 'lower --blr/--lr, or use --amp bf16 / --amp none') -> None:
    """Read the pending device losses in one transfer, stop on NaN/inf (every rank at the same flush), feed the
    meters and TensorBoard. ``pending``: ``{'i', 'loss': 0-d tensor, 'parts': {name: 0-d tensor}, 'lr', 'update'}``
    per micro-batch (optional ``'extra': {name: 0-d tensor}``: further loss terms, the meter ``name`` and the
    TensorBoard tag ``train_<name>``); a part ``k`` is the meter ``names[0].format(k)``, ``names[1].format(k)`` in the error line and
    the TensorBoard tag ``names[2].format(k)`` (None: not logged). ``mean_over_ranks``: TensorBoard gets the loss averaged over ranks (in the same collective as
    the NaN vote)."""
    if not pending:
        return
    dev = pending[0]['loss'].device
    keys = sorted({k for p in pending for k in p['parts']})
    extras = sorted({k for p in pending for k in p.get('extra', {})})
    zero = torch.zeros((), device=dev)
    rows = [torch.stack([p['loss'].float() for p in pending])]
    rows += [torch.stack([p['parts'][k].float() if k in p['parts'] else zero for p in pending]) for k in keys]
    rows += [torch.stack([p['extra'][k].float() if k in p.get('extra', {}) else zero for p in pending])
             for k in extras]
    host = torch.stack(rows).cpu()
    losses = host[0]
    tb_losses = losses
    if du.is_dist():
        # agree on "some rank saw NaN/inf" so all stop together instead of the healthy ranks waiting in the next
        # collective until the timeout
        vec = torch.cat([torch.tensor([float(not torch.isfinite(losses).all())]), losses if mean_over_ranks
                         else torch.zeros(0)]).to(du.collective_device())
        vec = du.all_reduce_tensor(vec).cpu()
        if vec[0].item() and torch.isfinite(losses).all():
            raise NonFiniteLoss(f'another rank saw a non-finite loss by epoch {epoch}, iteration {pending[-1]["i"]}/'
                                f'{n_micro}; stopping without writing a checkpoint (see that rank\'s message)')
        if mean_over_ranks:
            tb_losses = vec[1:] / du.get_world_size()
    for j, p in enumerate(pending):
        v = losses[j].item()
        parts = {k: host[1 + n][j].item() for n, k in enumerate(keys) if k in p['parts']}
        extra = {k: host[1 + len(keys) + n][j].item() for n, k in enumerate(extras) if k in p.get('extra', {})}
        if not math.isfinite(v):
            detail = ', '.join(f'{names[1].format(k)}={s:.4g}' for k, s in parts.items())
            raise NonFiniteLoss(f'loss is {v} at epoch {epoch}, iteration {p["i"]}/{n_micro}'
                                + (f' ({detail})' if detail else '') + '; stopping without writing a checkpoint '
                                f'(the last good one is kept). Try {advice}, or check the data')
        logger.update(loss=v, lr=p['lr'], **{names[0].format(k): s for k, s in parts.items()}, **extra)
        if tb and p['update']:
            x = int((p['i'] / n_micro + epoch) * 1000)
            tb.scalar(loss_tag, tb_losses[j].item(), x)
            tb.scalar('lr', p['lr'], x)
            for k, s in parts.items():
                if names[2]:
                    tb.scalar(names[2].format(k), s, x)
            for k, s in extra.items():
                tb.scalar(f'train_{k}', s, x)


def load_weights(resumed: Tuple[str, Dict[str, Any]], model: nn.Module, mismatch: str) -> None:
    """The checkpoint's weights into ``model``; ``mismatch`` (with ``{detail}``) words the error for another model."""
    path, ckpt = resumed
    try:
        model.load_state_dict(ckpt['model'])
    except (RuntimeError, KeyError) as e:
        lines = [l.strip() for l in str(e).strip().splitlines()]
        detail = '; '.join(lines[1:3] or lines[:1])[:300]  # line 0 is only 'Error(s) in loading state_dict for ...'
        raise UserError(f'--resume {path}: ' + mismatch.format(detail=detail)) from None


def restore_training(resumed: Tuple[str, Dict[str, Any]], model: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: Optional[torch.amp.GradScaler], freezer: Any, args: Any, mismatch: str) -> Dict[str, Any]:
    """Continue a run from its checkpoint (the one resume of every training script): weights, then the freezer's
    state (before the optimizer: group layouts must match; a frozen checkpoint without a freezer is refused), the
    optimizer, loss scaler and RNG. Sets ``args.start_epoch``; returns the checkpoint. ``mismatch`` words the error
    for weights of another model (with ``{detail}``)."""
    path, ckpt = resumed
    load_weights(resumed, model, mismatch)
    warn_changed_flags(ckpt.get('args', {}), args)
    saved = ckpt.get('freezeout') or {}
    if freezer is not None:
        try:
            freezer.load_state_dict(saved, optimizer)
        except UserError as e:
            raise UserError(str(e).replace('--resume:', f'--resume {path}:', 1)) from None
    elif saved.get('num_frozen', 0):
        raise UserError(f'--resume {path}: the checkpoint has frozen FreezeOut units; resume with the same '
                        f'FreezeOut flags (--t_0/--how_scale/--freeze_policy)')
    if 'optimizer' in ckpt:
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except ValueError as e:  # e.g. saved without FreezeOut, resumed with --t_0/--how_scale (other groups)
            raise UserError(f'--resume {path}: optimizer state does not match these flags ({e}); resume with the '
                            f'FreezeOut flags (--t_0/--how_scale/--freeze_policy/--dont_freeze_pe) the run was '
                            f'started with') from None
    if scaler is not None and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    args.start_epoch = int(ckpt['epoch']) + 1
    restore_rank_rng(ckpt, args.seed, f'--resume {path}')  # each rank its own stream
    return ckpt
