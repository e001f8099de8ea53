"""Training and evaluation loops shared by ``run_finetune.py`` and ``run_linprobe.py`` (MAE's engine, device-agnostic).

* :func:`train_one_epoch`: gradient accumulation, the LR set per optimizer step (warm-up + cosine, per-group
  ``lr_scale``), autocast + GradScaler from ``util.amp``, optional clipping and Mixup, and a stop with a clear
  message (no checkpoint written) when the loss is not finite.
* :func:`evaluate`: Acc@1/Acc@5 (timm ``accuracy``) and loss, sample-weighted and summed over ranks; with a
  :class:`~util.knn.ShardSampler` every val image is counted exactly once, so ``--dist_eval`` equals one process.
* :func:`fit`: the epoch loop (train → evaluate → checkpoint → ``log.txt`` / TensorBoard).
"""
import itertools
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
from timm.utils import accuracy

from engine_common import flush_losses, set_lrs
from util import distributed as du
from util.amp import Amp
from util.checkpoint import save_checkpoint
from util.datasets import seed_loader_epoch
from util.log import MetricLogger, SmoothedValue, TensorBoard, trim_json_log
from util.log import epoch_record as log_epoch_record
from util.signals import NO_STOP, GracefulStop
from util.lr_sched import WarmupCosine


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler],
                    clip_grad: Optional[float]) -> Optional[torch.Tensor]:
    """Unscale (fp16), clip, step; returns the pre-clip gradient norm (a device scalar) when clipping."""
    norm = None
    if clip_grad is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g['params'] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad).detach()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return norm


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, amp: Amp, lr_schedule: WarmupCosine, steps_per_epoch: int,
                    accum_iter: int = 1, clip_grad: Optional[float] = None, mixup_fn: Optional[Callable] = None,
                    tb: Optional[TensorBoard] = None, print_freq: int = 50,
                    remaining_after: Optional[int] = None, stop=NO_STOP,
                    rewrap: Optional[Callable[[], nn.Module]] = None,
                    global_lr: Optional[Callable[[int], float]] = None) -> Dict[str, float]:
    """One epoch of ``steps_per_epoch`` optimizer steps of ``accum_iter`` micro-batches each.

    Args:
        model: the (possibly DDP-wrapped) model; images [B,3,H,W] → logits [B,C].
        criterion: loss on (logits, targets); targets are soft [B,C] after Mixup, else class indices [B].
        lr_schedule: the LR control: ``step(optimizer, step) -> changed`` at optimizer step
            ``epoch·steps_per_epoch + s`` sets every group's LR (× ``lr_scale``): a WarmupCosine, or a FreezeOut
            (any freeze policy; when it freezes, ``rewrap()`` returns the re-wrapped DDP model).
        global_lr: the run's global LR at a step, the logged ``lr`` (default: ``lr_schedule.lr_at``).
        clip_grad: max gradient norm (None: no clipping).
        remaining_after: micro-batches of the run after this epoch, for the whole-run ETA.

    Returns:
        Epoch averages over ranks: ``loss``, ``lr`` (the global schedule's) and ``grad_norm`` if clipping.
    """
    global_lr = global_lr or lr_schedule.lr_at  # (a WarmupCosine; a freezer's caller passes the global one)
    model.train(True)
    optimizer.zero_grad(set_to_none=True)
    logger = MetricLogger()
    logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    n_micro = steps_per_epoch * accum_iter  # a trailing partial accumulation window is never stepped: skip it
    pending: List[Dict[str, Any]] = []
    for it, (samples, targets) in enumerate(logger.log_every(itertools.islice(data_loader, n_micro), print_freq,
                                                             f'Epoch: [{epoch}]', remaining_after, total=n_micro)):
        stop.check(epoch, it)  # SIGINT/SIGTERM (util/signals.py): stop between micro-batches, write nothing
        step = epoch * steps_per_epoch + it // accum_iter
        update = (it + 1) % accum_iter == 0
        if it % accum_iter == 0:
            if set_lrs(lr_schedule, optimizer, step, epoch, it / n_micro, tb) and rewrap is not None:
                model = rewrap()
                model.train(True)
            lr = global_lr(step)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        # DDP: all-reduce gradients only on the micro-batch that ends an accumulation window.
        sync = model.no_sync() if not update and isinstance(model, nn.parallel.DistributedDataParallel) \
            else nullcontext()
        with sync:
            with amp.autocast():
                loss = criterion(model(samples), targets)
            scaled = loss / accum_iter
            (amp.scaler.scale(scaled) if amp.scaler is not None else scaled).backward()
        parts = {}
        if update:
            norm = _optimizer_step(optimizer, amp.scaler, clip_grad)
            optimizer.zero_grad(set_to_none=True)
            if norm is not None:
                parts['grad_norm'] = norm
        # the loss stays on the device: read (NaN check, meters, TensorBoard) every print_freq micro-batches
        pending.append({'i': it, 'loss': loss.detach(), 'parts': parts, 'lr': lr, 'update': update})
        if it % print_freq == 0 or it == n_micro - 1:
            flush_losses(pending, logger, epoch, n_micro, tb, 'loss', mean_over_ranks=True,
                         advice='lower --lr/--blr, set --clip_grad, or use --amp bf16 / --amp none')
            pending = []
    logger.synchronize_between_processes()
    du.print0(f'Averaged stats: {logger}')
    return {k: m.global_avg for k, m in logger.meters.items()}


@torch.no_grad()
def evaluate(model: nn.Module, data_loader: Iterable, device: torch.device, amp: Amp,
             print_freq: int = 30) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the whole val set, summed over ranks.

    Pass the unwrapped model: with uneven shards, DDP's per-forward buffer broadcast would wait for ranks that have
    already finished. Top-5 becomes top-C when there are fewer than 5 classes.
    """
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction='sum')
    logger = MetricLogger()
    for name in ('loss', 'acc1', 'acc5'):  # same meters on every rank, even one with an empty shard
        logger.add_meter(name, SmoothedValue())
    tally = torch.zeros(4, dtype=torch.float64)  # samples, top-1 hits, top-5 hits, summed loss
    for images, target in logger.log_every(data_loader, print_freq, 'Test:'):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with amp.autocast():
            output = model(images)
        output = output.float()
        loss = criterion(output, target).item()
        n = images.shape[0]
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[1])))
        hits1, hits5 = round(acc1.item() * n / 100), round(acc5.item() * n / 100)  # exact counts
        tally += torch.tensor([n, hits1, hits5, loss], dtype=torch.float64)
        logger.meters['loss'].update(loss / n, n=n)
        logger.meters['acc1'].update(acc1.item(), n=n)
        logger.meters['acc5'].update(acc5.item(), n=n)
    tally = du.all_reduce_tensor(tally.to(du.collective_device())).cpu()
    total = max(1.0, tally[0].item())
    stats = dict(acc1=100.0 * tally[1].item() / total, acc5=100.0 * tally[2].item() / total,
                 loss=tally[3].item() / total)
    du.print0(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}")
    return stats


def fit(model: nn.Module, model_without_ddp: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
        amp: Amp, lr_schedule: WarmupCosine, steps_per_epoch: int, train_loader: Any, val_loader: Any,
        device: torch.device, args: Any, tb: TensorBoard, mixup_fn: Optional[Callable] = None,
        max_accuracy: float = 0.0, n_parameters: int = 0, rewrap: Optional[Callable[[], nn.Module]] = None,
        epoch_record: Optional[Callable[[int], Dict[str, Any]]] = None, freezer: Any = None) -> float:
    """Epochs ``args.start_epoch .. args.epochs-1``: train, evaluate, checkpoint, log. Returns the best Acc@1.

    Uses ``args``: epochs, start_epoch, accum_iter, clip_grad (optional), seed, rank, save_freq, output_dir.
    ``checkpoint-N.pth`` is written when ``N % save_freq == 0`` and at the last epoch, ``checkpoint-last.pth``
    every epoch; ``log.txt`` gets one JSON line per epoch.

    ``lr_schedule`` is the global schedule (the logged ``lr``). With a ``freezer`` (freezeout.FreezeOut, any policy)
    the freezer sets the LRs, ``rewrap()`` re-wraps DDP after a freeze event, the freezer's ``state_dict()`` goes into
    the checkpoint as ``freezeout``, and ``epoch_record(epoch)`` adds its fields (frozen units, saving so far,
    decisions) to the epoch's log record.
    """
    du.print0(f'Start training for {args.epochs} epochs (from epoch {args.start_epoch})')
    start = time.time()
    trim_json_log(args.output_dir, args.start_epoch - 1, run_id=getattr(args, 'run_id', None))  # epochs trained again
    stop = GracefulStop().start()
    current = {'model': model}

    def _rewrap() -> nn.Module:
        current['model'] = rewrap()
        return current['model']
    for epoch in range(args.start_epoch, args.epochs):
        seed_loader_epoch(train_loader, args.seed, epoch, args.rank)
        remaining = (args.epochs - epoch - 1) * steps_per_epoch * args.accum_iter
        t_epoch = time.time()
        train_stats = train_one_epoch(current['model'], criterion, train_loader, optimizer, device, epoch, amp,
                                      freezer or lr_schedule, steps_per_epoch, args.accum_iter,
                                      getattr(args, 'clip_grad', None), mixup_fn, tb, remaining_after=remaining,
                                      stop=stop, rewrap=_rewrap if rewrap is not None else None,
                                      global_lr=lr_schedule.lr_at)
        train_stats['epoch_time'] = time.time() - t_epoch
        test_stats = evaluate(model_without_ddp, val_loader, device, amp)
        du.print0(f"Accuracy of the network on the {len(val_loader.dataset)} test images: {test_stats['acc1']:.1f}%")
        max_accuracy = max(max_accuracy, test_stats['acc1'])
        du.print0(f'Max accuracy: {max_accuracy:.2f}%')
        for k in ('acc1', 'acc5', 'loss'):
            tb.scalar(f'perf/test_{k}', test_stats[k], epoch)
        tb.flush()
        state = dict(model=model_without_ddp.state_dict(), optimizer=optimizer.state_dict(),
                     max_accuracy=max_accuracy, step=(epoch + 1) * steps_per_epoch)
        if amp.scaler is not None:
            state['scaler'] = amp.scaler.state_dict()
        if freezer is not None:
            state['freezeout'] = freezer.state_dict()
        numbered = epoch % args.save_freq == 0 or epoch + 1 == args.epochs
        log = {**{f'train_{k}': v for k, v in train_stats.items()}, **{f'test_{k}': v for k, v in test_stats.items()},
               'epoch': epoch, 'n_parameters': n_parameters, **(epoch_record(epoch) if epoch_record else {})}
        for k in ('frozen_units', 'planned_saving_so_far', 'decided_saving_so_far'):
            if k in log:
                tb.scalar(f'freezeout/{k}', log[k], epoch)
        with log_epoch_record(args.output_dir, log, getattr(args, 'run_id', None)):  # a failed save: no record
            save_checkpoint(args.output_dir, epoch, state, args, numbered)
    stop.close()
    total = time.time() - start
    du.print0(f'Training time {time.strftime("%H:%M:%S", time.gmtime(total))}')
    return max_accuracy
