"""One pre-training epoch: forward / backward / optimizer step, per-step LR and freeze events, meters.

The loop never syncs the host per step: losses stay on the device and are read (and checked for NaN/inf) every
``print_freq`` iterations and at the end of the epoch, where they also go to TensorBoard at their own x
(``epoch_1000x``). A non-finite loss raises :class:`NonFiniteLoss` before any checkpoint of that epoch is written.
"""
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from freezeout import format_decision
from util import distributed as du
from util.amp import Amp
from util.log import MetricLogger, SmoothedValue, TensorBoard
from util.signals import NO_STOP, TrainingStopped


class NonFiniteLoss(TrainingStopped, RuntimeError):
    """Training produced a NaN/inf loss; the message names epoch, step and the stage losses."""
    exit_code = 3


@dataclass
class PretrainState:
    """Everything the loop mutates across epochs."""
    model: nn.Module                      # possibly DDP-wrapped
    model_without_ddp: nn.Module
    optimizer: torch.optim.Optimizer
    amp: Amp
    lr_control: Any                       # WarmupCosine-like (.apply) or FreezeOut (.step)
    steps_per_epoch: int
    total_steps: int
    rewrap: Callable[[], nn.Module]       # re-wraps DDP after a freeze event; identity when not distributed
    global_step: int = 0
    freeze_events: List[Dict[str, Any]] = field(default_factory=list)


def set_lr(state: PretrainState, step: int) -> bool:
    """Set this optimizer step's LRs (and apply FreezeOut events). True if the frozen set changed."""
    ctl = state.lr_control
    if hasattr(ctl, 'step'):
        return ctl.step(state.optimizer, step)
    ctl.apply(state.optimizer, step)
    return False


def train_one_epoch(state: PretrainState, loader, epoch: int, args, log_writer: Optional[TensorBoard] = None,
                    print_freq: int = 50, stop=NO_STOP) -> Dict[str, float]:
    """``stop`` (a util.signals.GracefulStop) is checked before every micro-batch: Interrupted, nothing written."""
    model = state.model
    model.train(True)
    device = next(state.model_without_ddp.parameters()).device
    accum = args.accum_iter
    n_micro = state.steps_per_epoch * accum  # a trailing partial accumulation window is never stepped: skip it
    if args.debug:
        print_freq = 1
    metric_logger = MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = f'Epoch: [{epoch}]'
    remaining = (args.epochs - epoch - 1) * n_micro
    opt, scaler = state.optimizer, state.amp.scaler
    opt.zero_grad(set_to_none=True)
    pending: List[Dict[str, Any]] = []
    drain = getattr(state.lr_control, 'drain_events', None)  # adaptive policy: its evaluations and decisions
    epoch_start, compute_time, images = time.time(), 0.0, 0
    data_wait, ready = 0.0, epoch_start  # host time blocked in the loader, between iterations

    for i, (samples, _) in enumerate(metric_logger.log_every(islice(loader, n_micro), print_freq, header,
                                                             remaining_after=remaining, total=n_micro)):
        t0 = time.time()
        data_wait += t0 - ready
        stop.check(epoch, i)
        if i % accum == 0:
            changed = set_lr(state, state.global_step)
            if drain is not None:
                _policy_events(drain(), epoch, i / n_micro, log_writer)
            if changed:
                model = state.model = state.rewrap()
                model.train(True)
                fo_state = state.lr_control.state_dict()  # (the adaptive policy's also holds its snapshot)
                ev = {'step': state.global_step, 'epoch': epoch, 'num_frozen': fo_state['num_frozen'],
                      'frozen_units': fo_state['frozen_units'],
                      'active_stages': state.model_without_ddp.active_stages()}
                state.freeze_events.append(ev)
                du.print0(f'FreezeOut: step {state.global_step} (epoch {epoch}): frozen units '
                          f'{ev["frozen_units"]}; active stages {ev["active_stages"]}')
            step_lr = max(g['lr'] for g in opt.param_groups)  # LRs change only here, once per optimizer step
        samples = samples.to(device, non_blocking=True)
        update = (i + 1) % accum == 0
        sync_ctx = model.no_sync() if (isinstance(model, nn.parallel.DistributedDataParallel) and not update) \
            else nullcontext()
        with sync_ctx:
            with state.amp.autocast():
                out = model(samples, mask_ratio=args.mask_ratio)
            loss = out['loss']
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if update:
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            state.global_step += 1
        images += samples.shape[0]
        compute_time += time.time() - t0
        pending.append({'i': i, 'loss': loss.detach(), 'stages': {k: v.detach() for k, v in out['stage_losses'].items()},
                        'lr': step_lr, 'update': update})
        if i % print_freq == 0 or i == n_micro - 1:
            _flush(pending, metric_logger, epoch, n_micro, log_writer)
            pending = []
        ready = time.time()

    metric_logger.synchronize_between_processes()
    epoch_time = time.time() - epoch_start
    stats = {k: m.global_avg for k, m in metric_logger.meters.items()}
    world = du.get_world_size()
    if torch.cuda.is_available() and device.type == 'cuda':
        max_mem = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        import resource
        max_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    stats.update(epoch_time=epoch_time, compute_time=compute_time, data_time=max(0.0, epoch_time - compute_time),
                 data_wait_time=data_wait, data_wait_share=data_wait / max(1e-9, epoch_time), max_mem_mb=max_mem,
                 step_time=compute_time / max(1, state.steps_per_epoch),
                 img_per_s=world * images / max(1e-9, epoch_time))
    du.print0(f'Averaged stats: {metric_logger}  compute time {compute_time:.1f}s  '
              f'{stats["img_per_s"]:.1f} img/s')
    return stats


def _policy_events(events: List[Dict[str, Any]], epoch: int, frac: float, log_writer: Optional[TensorBoard]) -> None:
    """One line per decision of the adaptive policy; signals and decisions to TensorBoard (x = epoch_1000x)."""
    x = int((frac + epoch) * 1000)
    for ev in events:
        if ev['kind'] == 'decision':
            du.print0(format_decision(ev, epoch))
            if log_writer:
                log_writer.scalar('freezeout/decided_unit', ev['index'], x)
        elif log_writer and ev['kind'] == 'signal' and ev['plasticity']:
            log_writer.scalars('freezeout/plasticity', ev['plasticity'], x)


def _flush(pending: List[Dict[str, Any]], metric_logger: MetricLogger, epoch: int, n_micro: int,
           log_writer: Optional[TensorBoard]) -> None:
    """Read the pending device losses once, check them, feed the meters and TensorBoard."""
    if not pending:
        return
    losses = torch.stack([p['loss'].float() for p in pending]).cpu()
    if du.is_dist():
        # every rank flushes at the same iteration: agree on "some rank saw NaN/inf" so all stop together instead
        # of the healthy ranks waiting in the next collective until the timeout
        bad = torch.tensor([float(not torch.isfinite(losses).all())], device=du.collective_device())
        du.all_reduce_tensor(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() and torch.isfinite(losses).all():
            raise NonFiniteLoss(f'another rank saw a non-finite loss by epoch {epoch}, iteration {pending[-1]["i"]}/'
                                f'{n_micro}; stopping without writing a checkpoint (see that rank\'s message)')
    stage_keys = sorted({k for p in pending for k in p['stages']})
    stage_vals = {k: torch.stack([p['stages'][k].float() if k in p['stages'] else torch.zeros((), device=p['loss']
                                  .device) for p in pending]).cpu() for k in stage_keys}
    for j, p in enumerate(pending):
        v = losses[j].item()
        stages = {k: stage_vals[k][j].item() for k in stage_keys if k in p['stages']}
        if not math.isfinite(v):
            detail = ', '.join(f'stage{k}={s:.4g}' for k, s in stages.items())
            raise NonFiniteLoss(f'loss is {v} at epoch {epoch}, iteration {p["i"]}/{n_micro} ({detail}); stopping '
                                f'without writing a checkpoint (the last good one is kept). Try a lower --blr, '
                                f'--amp bf16/none, or check the data')
        metric_logger.update(loss=v, lr=p['lr'], **{f'loss_s{k}': s for k, s in stages.items()})
        if log_writer and p['update']:
            x = int((p['i'] / n_micro + epoch) * 1000)
            log_writer.scalar('train_loss', v, x)
            log_writer.scalar('lr', p['lr'], x)
            for k, s in stages.items():
                log_writer.scalar(f'stage_loss/stage{k}', s, x)
