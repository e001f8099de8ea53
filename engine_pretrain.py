"""Pre-training: one epoch (:func:`train_one_epoch`) and the epoch loop (:func:`fit`: train, log, evaluate,
checkpoint), the way ``engine_finetune.py`` owns fine-tuning.

The step never syncs the host: losses stay on the device and are read (and checked for NaN/inf) every
``print_freq`` iterations and at the end of the epoch (``engine_common.flush_losses``), where they also go to
TensorBoard at their own x (``epoch_1000x``). A non-finite loss raises ``NonFiniteLoss`` (exit status 3) before any
checkpoint of that epoch is written.
"""
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from engine_common import flush_losses, set_lrs
from fixed_views import model_inputs
from freezeout import FreezeOut, decided_saving
from util import distributed as du
from util.amp import Amp
from util.checkpoint import save_checkpoint
from util.compile import eager as compile_eager, stats as compile_stats
from util.datasets import seed_loader_epoch
from util.log import MetricLogger, SmoothedValue, TensorBoard, epoch_record, trim_json_log
from util.lr_sched import WarmupCosine
from util.memory import peak_memory_mb, reset_peak_memory
from util.signals import NO_STOP, GracefulStop

DATA_BOUND_SHARE = 0.10
EXTRA_LOSSES = ('distill_loss',)  # further loss terms a model may return: meters (train_<name> in log.txt, TB)


@dataclass
class PretrainState:
    """Everything the loop mutates across epochs."""
    model: nn.Module                      # possibly DDP-wrapped
    model_without_ddp: nn.Module
    optimizer: torch.optim.Optimizer
    amp: Amp
    schedule: WarmupCosine                # the global LR schedule (what is logged as lr)
    freezer: Optional[FreezeOut]          # any freeze policy; None = plain training
    steps_per_epoch: int
    total_steps: int
    rewrap: Callable[[], nn.Module]       # re-wraps DDP after a freeze event; identity when not distributed
    global_step: int = 0
    saving: Dict[str, Any] = field(default_factory=lambda: {'base_step_time': None, 'time': 0.0, 'steps': 0})

    @property
    def lr_control(self) -> Any:
        return self.freezer if self.freezer is not None else self.schedule


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
    opt, scaler, ctl = state.optimizer, state.amp.scaler, state.lr_control
    opt.zero_grad(set_to_none=True)
    pending: List[Dict[str, Any]] = []
    epoch_start, compute_time, images = time.time(), 0.0, 0
    reset_peak_memory(device)
    mw = state.model_without_ddp
    # a stage-loss or mask curriculum, or layer dropping, changes every optimizer step; otherwise the weights
    # change only at freezes
    curriculum = mw.follows_progress
    post_step = getattr(mw, 'optimizer_step_hook', None)  # e.g. the self-distillation EMA; None: nothing
    unit_lr_tb = bool(log_writer) and state.freezer is not None
    describe = lambda: f'active stages {mw.active_stages()}'  # noqa: E731
    data_wait, ready = 0.0, epoch_start  # host time blocked in the loader, between iterations

    for i, (samples, meta) in enumerate(metric_logger.log_every(islice(loader, n_micro), print_freq, header,
                                                             remaining_after=remaining, total=n_micro)):
        t0 = time.time()
        data_wait += t0 - ready
        stop.check(epoch, i)
        if i % accum == 0:
            if set_lrs(ctl, opt, state.global_step, epoch, i / n_micro, log_writer, describe):
                model = state.model = state.rewrap()
                model.train(True)
            if curriculum:
                mw.set_progress(state.global_step / state.total_steps, step=state.global_step)
            step_lr = state.schedule.lr_at(state.global_step)  # the global LR (units' own LRs: freezeout/unit_lr)
        samples = samples.to(device, non_blocking=True)
        extra = model_inputs(meta, device)  # --fixed_views: each image's mask order; {} by default
        update = (i + 1) % accum == 0
        sync_ctx = model.no_sync() if (isinstance(model, nn.parallel.DistributedDataParallel) and not update) \
            else nullcontext()
        with sync_ctx:
            with state.amp.autocast():
                out = model(samples, mask_ratio=args.mask_ratio, **extra)
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
            if post_step is not None:
                post_step()
        images += samples.shape[0]
        compute_time += time.time() - t0
        pending.append({'i': i, 'loss': loss.detach(), 'lr': step_lr, 'update': update,
                        'parts': {k: v.detach() for k, v in out['stage_losses'].items()},
                        'extra': {k: out[k].detach() for k in EXTRA_LOSSES if k in out}})
        if i % print_freq == 0 or i == n_micro - 1:
            if unit_lr_tb:  # per-unit LR of the latest optimizer step: shows the vitfreeze jump at W, the tails
                # (a unit's decay and no-decay groups share one LR)
                log_writer.scalars('freezeout/unit_lr', {g['name']: g['lr'] for g in opt.param_groups},
                                   int((i / n_micro + epoch) * 1000))
            flush_losses(pending, metric_logger, epoch, n_micro, log_writer, 'train_loss',
                         ('loss_s{}', 'stage{}', 'stage_loss/stage{}'), advice='a lower --blr, --amp bf16/none')
            pending = []
        ready = time.time()

    metric_logger.synchronize_between_processes()
    epoch_time = time.time() - epoch_start
    stats = {k: m.global_avg for k, m in metric_logger.meters.items()}
    world = du.get_world_size()
    stats.update(epoch_time=epoch_time, compute_time=compute_time, data_time=max(0.0, epoch_time - compute_time),
                 data_wait_time=data_wait, data_wait_share=data_wait / max(1e-9, epoch_time),
                 max_mem_mb=peak_memory_mb(device), step_time=compute_time / max(1, state.steps_per_epoch),
                 img_per_s=world * images / max(1e-9, epoch_time))
    du.print0(f'Averaged stats: {metric_logger}  compute time {compute_time:.1f}s  '
              f'{stats["img_per_s"]:.1f} img/s')
    return stats


def fit(state: PretrainState, loader, args, log_writer: TensorBoard, flops: Optional[Dict[str, Any]] = None,
        knn: Optional[Callable[[nn.Module], Dict[str, float]]] = None, init_record: Optional[Dict] = None,
        pictures: Optional[Callable[[nn.Module], Dict[str, Any]]] = None) -> None:
    """Epochs ``args.start_epoch .. args.epochs-1``: train, log (``log.txt`` JSON lines, TensorBoard at
    ``epoch_1000x``), the online k-NN every ``--knn_eval_freq`` epochs, ``pictures`` every ``--vis_freq``, and a
    checkpoint (``checkpoint-last.pth`` every epoch, ``checkpoint-N.pth`` every ``--save_freq``)."""
    model, freezer, spe = state.model_without_ddp, state.freezer, state.steps_per_epoch
    du.print0(f'Start training for {args.epochs} epochs (from epoch {args.start_epoch})')
    start = time.time()
    trim_json_log(args.output_dir, args.start_epoch - 1, run_id=args.run_id)  # epochs redone now (logged, not saved)
    warned_data_bound = False  # the data-bound note is printed once per run
    stop = GracefulStop().start()  # SIGINT/SIGTERM: stop at a micro-batch boundary, keep checkpoint-last as is
    for epoch in range(args.start_epoch, args.epochs):
        seed_loader_epoch(loader, args.seed, epoch, du.get_rank())
        stats = train_one_epoch(state, loader, epoch, args, log_writer, stop=stop)
        record = {**{f'train_{k}': v for k, v in stats.items()}, 'epoch': epoch, 'step': state.global_step,
                  'lr': state.schedule.lr_at(max(0, state.global_step - 1)), **model.progress_record(),
                  'stage_weights': model.current_stage_weights(), **(init_record if epoch == 0 and init_record
                                                                     else {})}
        if freezer is not None:
            record.update(frozen_units=freezer.num_frozen, active_stages=model.active_stages(),
                          unit_lr=freezer.lr_by_unit(state.global_step), freeze_policy=freezer.policy.name)
            record.update(saving_so_far(state.saving, stats, epoch, args, freezer, flops, spe))
            record.update(freezer.policy.epoch_record(epoch * spe, (epoch + 1) * spe))
        if args.compile:
            record.update({f'compile_{k}': v for k, v in compile_stats().items()})
        last = epoch + 1 == args.epochs
        if knn is not None and ((epoch + 1) % args.knn_eval_freq == 0 or last):
            record.update(knn(model))
        if pictures is not None and ((epoch + 1) % args.vis_freq == 0 or last):
            with compile_eager():  # another batch size and the full decode: not worth compiled variants
                for tag, img in pictures(model).items():
                    log_writer.image(tag, img, (epoch + 1) * 1000)
        log_epoch(log_writer, record, freezer is not None)
        note = data_bound_note(stats, epoch, args) if (epoch > args.start_epoch and not warned_data_bound) else None
        if note:
            du.print0(note)
            warned_data_bound = True
        with epoch_record(args.output_dir, record, args.run_id):  # a failed save takes its record back out
            save_checkpoint(args.output_dir, epoch, {
                'model': model.state_dict(), 'optimizer': state.optimizer.state_dict(),
                'scaler': state.amp.scaler.state_dict() if state.amp.scaler is not None else None,
                'step': state.global_step, 'freezeout': freezer.state_dict() if freezer is not None else {},
                **(model.checkpoint_extras() if hasattr(model, 'checkpoint_extras') else {}),
            }, args, numbered=(epoch % args.save_freq == 0) or last)
        du.print0(f'epoch {epoch}: loss {stats["loss"]:.4f}  lr {record["lr"]:.2e}  frozen units '
                  f'{freezer.num_frozen if freezer else 0}  {stats["img_per_s"]:.1f} img/s  peak memory '
                  f'{stats["max_mem_mb"]:.0f} MiB  time left {_eta(start, epoch - args.start_epoch + 1, args.epochs - epoch - 1)}')
    stop.close()
    du.print0(f'Training time {time.strftime("%H:%M:%S", time.gmtime(time.time() - start))}')


def saving_so_far(acc: dict, stats: dict, epoch: int, args, freezer: FreezeOut, flops, spe: int) -> dict:
    """FLOP-model saving of the run so far (optimizer steps [0, end of this epoch)), for the plan or the decisions
    taken so far, and the measured saving over the epochs this process ran: compute time actually spent vs the
    step time of the latest epoch with nothing frozen (after the first, whose warm-up is noisy), same steps."""
    if freezer.num_frozen == 0 and (epoch > args.start_epoch or acc['base_step_time'] is None):
        acc['base_step_time'] = stats['step_time']
    acc['time'] += stats['compute_time']
    acc['steps'] += spe
    # a policy that plans ahead has a plan; one that decides as it goes (adaptive) has its decisions so far (a
    # decided unit's freeze step may lie in the future: counted only from that step on, within [0, done))
    key = 'planned_saving_so_far' if freezer.policy.plans_ahead else 'decided_saving_so_far'
    out = {key: decided_saving(freezer, flops, (epoch + 1) * spe)}
    if acc['base_step_time']:
        out['measured_saving_so_far'] = 1.0 - acc['time'] / (acc['base_step_time'] * acc['steps'])
    return out


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


def log_epoch(tb: TensorBoard, record: dict, freezing: bool) -> None:
    if not tb:
        return
    x = (record['epoch'] + 1) * 1000
    for k in ('train_img_per_s', 'train_step_time', 'train_epoch_time', 'train_data_time', 'train_data_wait_share',
              'train_max_mem_mb'):
        if k in record:
            tb.scalar(f'perf/{k[6:]}', record[k], x)
    for k, w in enumerate(record.get('stage_weights', [])):
        tb.scalar(f'stage_weight/stage{k}', w, x)
    for k in ('mask_difficulty', 'mask_block_side'):
        if k in record:
            tb.scalar(f'mask/{k[5:]}', record[k], x)
    for k in ('layer_drop_theta', 'layer_drop_keep_last', 'layer_drop_kept_share'):
        if k in record:
            tb.scalar(f'layer_drop/{k[11:]}', record[k], x)
    if freezing:  # (the per-unit LR goes to TensorBoard from the training loop, per optimizer step)
        tb.scalar('freezeout/frozen_units', record['frozen_units'], x)
        tb.scalar('freezeout/active_stages', len(record['active_stages']), x)
        for k in ('planned_saving_so_far', 'decided_saving_so_far', 'measured_saving_so_far'):
            if k in record:
                tb.scalar(f'freezeout/{k}', record[k], x)
    for k, v in record.items():
        if k.startswith('knn_'):
            tb.scalar(f'knn/{k[4:]}', v, x)
    tb.flush()
