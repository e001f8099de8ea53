"""FreezeOut for pre-training: per-unit LR schedules that end at a unit-specific point t_i, then freezing.

The module knows *ordered units of parameters*, nothing about LocalMIM. A model offers ``units()`` (unit 0 =
input side, then one unit per block in forward order) and ``set_frozen(num_frozen_blocks, embed_frozen)``.

Freeze points (both schedules): x_i = t0 + (1 - t0) · i / N,  t_i = s(x_i),  s ∈ {identity, square, cube}
(--how_scale); α_i = lr / t_i (default, "scale_lr") or lr (--not_scale_lr). T = total optimizer steps, W = warm-up
steps, both from the real loader length, epochs, accumulation and world size.

``--freeze_schedule vitfreeze`` (default; what the ViTFreeze code does, so the seed's runs are reproduced):

    j < W:            lr_i(j) = lr · j / W                  (every unit ramps to the *global* lr)
    W <= j < F_i:     lr_i(j) = m_i + (α_i - m_i) · ½ (1 + cos(π (j - W) / (t_i (T - W))))
                      (a scaled unit jumps from lr to α_i at j = W)
    F_i = W + t_i · (T - W): unit i is frozen at the first optimizer step j >= F_i (layer-wise), j > F_i
                      (--non_layerwise_lr)

LR floors (``unit_min_lr``; the plan's header names them): a freezing unit's own cosine ends at m_i = unit_min_lr,
everything on the global curve (--non_layerwise_lr, units with t_i = 1, the embedding under --dont_freeze_pe) ends
at min_lr. ViTFreeze's code: unit curves a_i/2 (1 + cos(..)) end at 0, its global curve at --min_lr (1e-6), so under
``vitfreeze`` the flags resolve unit_min_lr = 0 unless --min_lr is typed (then both floors are --min_lr). A unit with
t_i = 1 keeps the global curve and floor: the last block and every unit of ``--t_0 1`` are the plain schedule bit
for bit (ViTFreeze ran its last block on a_i's curve to 0 instead: at most min_lr = 1e-6 of LR apart).

Freeze step: ViTFreeze freezes at the first step with j - W > t_i (T - W), so when F_i is a whole step (unit 0 of
cubic 0.8: W + 0.512 (T - W) is) it still takes step F_i. Layer-wise that step runs at LR a_i/2 (1 + cos π) = 0,
and AdamW moves nothing at LR 0 (the update and the decoupled decay both scale with the LR), so we freeze one step
earlier: the same weights for one step less compute. Non-layer-wise the step runs on the global curve, at
lr_global(F_i) (~0.48 lr for unit 0 of cubic 0.8), a real update: there we freeze at j > F_i, as ViTFreeze.
(ViTFreeze counts F_i in micro-batches, we in optimizer steps: both agree to rounding.)

``--freeze_schedule freezeout`` (the FreezeOut paper's convention, counted from step 0):

    j < W:            lr_i(j) = α_i · j / W
    W <= j < J_i:     lr_i(j) = min_lr + (α_i - min_lr) · ½ (1 + cos(π (j - W) / (J_i - W)))
    J_i = t_i · T:    unit i is frozen at the first optimizer step j >= J_i

``--lr_schedule constant`` (hold the peak after warm-up instead of the cosine): the global curve holds lr; unit i
holds α_i after warm-up and, so that nothing is frozen at a high LR (its weights would stop right after a large,
noisy update instead of settling), anneals over a short tail: the last ``constant_tail`` fraction of its
post-warm-up span [W, F_i) is a half-cosine from α_i to min_lr ending at its freeze point. A unit that never freezes
(t_i = 1) holds to the end, exactly as the plain constant run.

Units are 0..N with N = number of blocks (unit 0 = patch embedding + cls token, unit i = block i). With
``--dont_freeze_pe`` the embedding is not a unit (global schedule, never frozen) and the blocks are units 0..N-1
with denominator N-1, so the first block freezes at s(t0) and the last at 1. The last unit always has t = 1 and
never freezes. ``--non_layerwise_lr``: every unit follows the global warm-up + cosine (or constant) and is still
frozen at its freeze point. With t_i = 1 the per-unit curve *is* the global one (same function, same numbers), so
``--t_0 1`` reproduces plain training bit-exactly under either schedule.

The cls token belongs to unit 0 and freezes with it (a deliberate difference from ViTFreeze, which keeps it at the
global LR and never freezes it, so its backward still runs through every frozen block).

Freezing (what saves compute): parameters get ``requires_grad=False``, their param groups leave the optimizer, their
optimizer state is deleted, the model runs the frozen prefix under ``no_grad`` and drops the stages it fed, and the
caller re-wraps DDP so frozen parameters are no longer all-reduced.
"""
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from util.errors import UserError
from util.lr_sched import LR_SCHEDULES, global_lr, warmup_cosine

SCALINGS = {'linear': lambda x: x, 'squared': lambda x: x ** 2, 'cubic': lambda x: x ** 3}
FREEZE_SCHEDULES = ('vitfreeze', 'freezeout')


def freeze_points(num_units: int, t_0: float, how_scale: str) -> List[float]:
    """t_i for units 0..num_units-1 (denominator num_units-1, so the last unit has t = 1)."""
    if how_scale not in SCALINGS:
        raise UserError(f"--how_scale {how_scale!r}: choose linear, squared or cubic")
    if not (0.0 < t_0 <= 1.0):
        raise UserError(f'--t_0 {t_0}: must be in (0, 1] (1 = never freeze)')
    n = num_units - 1
    s = SCALINGS[how_scale]
    # the last unit is exactly 1 (never frozen, plain schedule): in floats t_0 + (1 - t_0)·n/n can be 1 - 2^-52
    return [s(t_0 + (1.0 - t_0) * i / n) if 0 <= i < n else 1.0 for i in range(num_units)]


@dataclass
class UnitPlan:
    index: int          # FreezeOut unit index
    name: str
    t: float            # freeze point as a fraction of training (vitfreeze: of the post-warm-up part)
    alpha: float        # peak LR of the unit (after warm-up)
    end_step: float     # where the unit's LR reaches min_lr: F_i = W + t_i (T - W) (vitfreeze) or J_i = t_i T
    freeze_step: Optional[int]  # first optimizer step at which the unit is frozen; None = never


class FreezeOutSchedule:
    """The pure schedule: t_i, α_i, freeze points, lr_i(step), freeze steps. No model needed.

    Args:
        unit_names: names of the scheduled units in forward order (embedding first unless ``dont_freeze_pe``).
        total_steps: T, optimizer steps of the whole run (from the real loader length, epochs, accum, world size).
        warmup_steps: W.
        lr, min_lr: peak and final LR of the global schedule.
        unit_min_lr: final LR of a freezing unit's own (layer-wise) curve, reached at its freeze point (None:
            ``min_lr``; ViTFreeze's code: 0). Units on the global curve keep ``min_lr``; see :meth:`floor`.
        t_0, how_scale, scale_lr, layerwise_lr: the method's knobs (see module docstring).
        freeze_schedule: ``vitfreeze`` (ViTFreeze's code) or ``freezeout`` (the paper's convention).
        lr_schedule: ``cosine`` or ``constant`` (hold the peak; units anneal over a tail before freezing).
        constant_tail: with ``constant``, the fraction of a unit's post-warm-up span spent annealing to min_lr.
    """

    def __init__(self, unit_names: Sequence[str], total_steps: int, warmup_steps: int, lr: float, min_lr: float,
                 t_0: float = 0.8, how_scale: str = 'cubic', scale_lr: bool = True, layerwise_lr: bool = True,
                 freeze_schedule: str = 'vitfreeze', lr_schedule: str = 'cosine', constant_tail: float = 0.1,
                 unit_min_lr: Optional[float] = None):
        if total_steps < 1:
            raise UserError('FreezeOut needs at least one optimizer step: check --epochs, --batch_size, '
                            '--accum_iter against the dataset size')
        if freeze_schedule not in FREEZE_SCHEDULES:
            raise UserError(f'--freeze_schedule {freeze_schedule!r}: choose {" or ".join(FREEZE_SCHEDULES)}')
        if lr_schedule not in LR_SCHEDULES:
            raise UserError(f'--lr_schedule {lr_schedule!r}: choose {" or ".join(LR_SCHEDULES)}')
        if not 0.0 <= constant_tail <= 1.0:
            raise UserError(f'--constant_tail {constant_tail}: must be in [0, 1]')
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.lr, self.min_lr = float(lr), float(min_lr)
        self.unit_min_lr = self.min_lr if unit_min_lr is None else float(unit_min_lr)
        if not (math.isfinite(self.unit_min_lr) and self.unit_min_lr >= 0.0):
            raise UserError(f'--min_lr {self.unit_min_lr}: the unit LR floor must be >= 0')
        self.t_0, self.how_scale, self.scale_lr, self.layerwise_lr = t_0, how_scale, scale_lr, layerwise_lr
        self.freeze_schedule, self.lr_schedule, self.constant_tail = freeze_schedule, lr_schedule, constant_tail
        ts = freeze_points(len(unit_names), t_0, how_scale)
        post = max(0, self.total_steps - self.warmup_steps)  # T - W
        self.units: List[UnitPlan] = []
        for i, (name, t) in enumerate(zip(unit_names, ts)):
            alpha = self.lr / t if scale_lr else self.lr
            end = self.warmup_steps + t * post if freeze_schedule == 'vitfreeze' else t * self.total_steps
            # round first: 0.8**3 * T is 51200.000000000004, which must freeze at 51200, not 51201
            e = round(end, 6)
            # non-layer-wise vitfreeze: ViTFreeze's j - W > t_i (T - W); the step at F_i has the global LR (module
            # docstring). Layer-wise that step has LR 0 in ViTFreeze, which moves nothing: freeze at it.
            first = math.floor(e) + 1 if (freeze_schedule == 'vitfreeze' and not layerwise_lr) else math.ceil(e)
            freeze = first if e < self.total_steps else None
            self.units.append(UnitPlan(i, name, t, alpha, end, freeze))

    def lr_at(self, unit: int, step: int) -> float:
        """LR of ``unit`` at optimizer step ``step`` (valid while the unit is active)."""
        if not self.layerwise_lr:
            return self.global_lr_at(step)
        u = self.units[unit]
        w = self.warmup_steps
        if step < w:
            # vitfreeze: every unit ramps to the global lr (the same numbers as the plain run), then jumps to α_i
            return (self.lr if self.freeze_schedule == 'vitfreeze' else u.alpha) * step / w
        end = u.end_step if u.freeze_step is not None else self.total_steps
        m = self.floor(unit)
        if self.lr_schedule == 'cosine':
            return warmup_cosine(step, u.alpha, m, w, end)
        if u.freeze_step is None:
            return u.alpha  # t = 1: the plain constant run's curve
        tail_start = end - self.constant_tail * (end - w)
        if step < tail_start or end <= tail_start:
            return u.alpha
        return m + (u.alpha - m) * 0.5 * (
            1.0 + math.cos(math.pi * min(1.0, (step - tail_start) / (end - tail_start))))

    def floor(self, unit: int) -> float:
        """The LR that ``unit``'s curve ends at: ``unit_min_lr`` for a freezing unit's own layer-wise curve (at its
        freeze point), ``min_lr`` for a unit on the global curve (non-layer-wise, or t_i = 1: never frozen)."""
        return self.unit_min_lr if self.layerwise_lr and self.units[unit].freeze_step is not None else self.min_lr

    def describe_floors(self) -> str:
        """Which floor each curve has (one line of the plan)."""
        if not self.layerwise_lr:
            return f'LR floor: every unit is on the global curve, which ends at min_lr={self.min_lr:.3g}'
        frozen = [u for u in self.units if u.freeze_step is not None]
        never = [u.name for u in self.units if u.freeze_step is None]
        src = ('ViTFreeze: its unit curves end at 0; --min_lr sets it' if self.unit_min_lr == 0.0 and
               self.freeze_schedule == 'vitfreeze' else 'from --min_lr')
        out = (f'LR floor: freezing units ({len(frozen)}) end their own curves at {self.unit_min_lr:.3g} at their '
               f'freeze step ({src})' if frozen else 'LR floor: no unit freezes')
        on_global = f'{", ".join(never)} (t = 1, never frozen) and the global curve end' if never else \
            'the global curve ends'
        return out + f'; {on_global} at min_lr={self.min_lr:.3g}'

    def global_lr_at(self, step: int) -> float:
        return global_lr(step, self.lr, self.min_lr, self.warmup_steps, self.total_steps, self.lr_schedule)

    def describe(self) -> str:
        """One line naming the schedule in force and its formulas."""
        if self.freeze_schedule == 'vitfreeze':
            s = ('vitfreeze (ViTFreeze: every unit warms up to lr, a scaled unit jumps to a_i at W, its cosine runs '
                 'from W over t_i(T-W) to its LR floor, frozen at W + t_i(T-W))')
        else:
            s = ('freezeout (FreezeOut paper: warm-up to a_i, cosine to its LR floor at J_i = t_i T from step 0, '
                 'frozen at J_i)')
        if not self.layerwise_lr:
            s += '; non-layerwise: every unit follows the global curve, only the freeze steps are per unit'
        if self.lr_schedule == 'constant':
            s += (f'; constant LR: hold the peak after warm-up, a freezing unit anneals to its LR floor over the '
                  f'last {self.constant_tail:g} of its post-warm-up span')
        return s

    def num_frozen_at(self, step: int) -> int:
        """Length of the frozen prefix at optimizer step ``step`` (t_i increases with i, so it is a prefix)."""
        return sum(1 for u in self.units if u.freeze_step is not None and step >= u.freeze_step)

    def state_boundaries(self) -> List[int]:
        """Steps where the frozen count changes, sorted, within [0, T)."""
        return sorted({u.freeze_step for u in self.units if u.freeze_step is not None})

    def steps_in_state(self) -> List[int]:
        """Number of optimizer steps spent with 0, 1, 2, ... frozen units (sums to T)."""
        counts = [0] * (len(self.units) + 1)
        bounds = [0] + [b for b in self.state_boundaries()] + [self.total_steps]
        for n in range(len(bounds) - 1):
            counts[self.num_frozen_at(bounds[n])] += max(0, min(bounds[n + 1], self.total_steps) - bounds[n])
        return counts


class FreezeOut:
    """Applies a :class:`FreezeOutSchedule` to a model and its optimizer, one call per optimizer step.

    The optimizer must be built from :meth:`param_groups` (groups tagged with ``unit``; ``unit = -1`` for the never
    frozen embedding under ``dont_freeze_pe``).
    """

    def __init__(self, model: nn.Module, schedule: FreezeOutSchedule, dont_freeze_pe: bool = False):
        self.model, self.schedule, self.dont_freeze_pe = model, schedule, dont_freeze_pe
        units = model.units()
        self.embed_unit = units[0]
        self.sched_units = units[1:] if dont_freeze_pe else units
        if len(self.sched_units) != len(schedule.units):
            raise ValueError(f'schedule has {len(schedule.units)} units, model {len(self.sched_units)}')
        self.num_frozen = 0

    @staticmethod
    def unit_names(model: nn.Module, dont_freeze_pe: bool) -> List[str]:
        units = model.units()
        return [u.name for u in (units[1:] if dont_freeze_pe else units)]

    def param_groups(self, weight_decay: float) -> List[Dict[str, Any]]:
        """Two groups (decay / no decay, timm's rule: no decay for ndim <= 1 or ``.bias``) per unit, in unit order."""
        groups = []
        tagged = [(-1, self.embed_unit)] if self.dont_freeze_pe else []
        tagged += list(enumerate(self.sched_units))
        for idx, unit in tagged:
            decay = [p for n, p in unit.params.items() if not (p.ndim <= 1 or n.endswith('.bias'))]
            no_decay = [p for n, p in unit.params.items() if p.ndim <= 1 or n.endswith('.bias')]
            for params, wd in ((no_decay, 0.0), (decay, weight_decay)):
                if params:
                    groups.append({'params': params, 'weight_decay': wd, 'unit': idx, 'name': unit.name})
        return groups

    def lr_by_unit(self, step: int) -> Dict[str, float]:
        """LR of every active unit at ``step`` (for logging)."""
        out = {}
        if self.dont_freeze_pe:
            out[self.embed_unit.name] = self.schedule.global_lr_at(step)
        for i, u in enumerate(self.sched_units):
            if i >= self.num_frozen:
                out[u.name] = self.schedule.lr_at(i, step)
        return out

    def step(self, optimizer: torch.optim.Optimizer, step: int) -> bool:
        """At optimizer step ``step``: freeze every unit that is due, then set the LR of the rest.

        Returns True when the frozen set changed (the caller must then re-wrap DDP / rebuild compiled graphs).
        """
        due = self.schedule.num_frozen_at(step)
        changed = due > self.num_frozen
        if changed:
            self.apply_frozen(optimizer, due)
        for g in optimizer.param_groups:
            u = g['unit']
            lr = self.schedule.global_lr_at(step) if u < 0 else self.schedule.lr_at(u, step)
            g['lr'] = lr * g.get('lr_scale', 1.0)  # layer decay (fine-tuning); x 1.0 is exact
        return changed

    def num_frozen_at(self, step: int) -> int:
        return self.schedule.num_frozen_at(step)

    def state_boundaries(self) -> List[int]:
        return self.schedule.state_boundaries()

    def apply_frozen(self, optimizer: Optional[torch.optim.Optimizer], count: int) -> None:
        """Freeze the first ``count`` scheduled units (idempotent; used at freeze events and when resuming)."""
        for unit in self.sched_units[:count]:
            for p in unit.params.values():
                p.requires_grad_(False)
                p.grad = None
                if optimizer is not None:
                    optimizer.state.pop(p, None)
        if optimizer is not None:
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g['unit'] < 0 or g['unit'] >= count]
        self.num_frozen = count
        if self.dont_freeze_pe:
            self.model.set_frozen(count, embed_frozen=False)
        else:
            self.model.set_frozen(max(0, count - 1), embed_frozen=count >= 1)

    def state_dict(self) -> Dict[str, Any]:
        return {'num_frozen': self.num_frozen, 'frozen_units': [u.name for u in self.sched_units[:self.num_frozen]]}

    def load_state_dict(self, state: Dict[str, Any], optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Re-apply the saved frozen set; call BEFORE ``optimizer.load_state_dict`` so the group layouts match."""
        if state.get('policy') == 'adaptive':
            raise UserError('--resume: the checkpoint was written with --freeze_policy adaptive; resume with it')
        self.apply_frozen(optimizer, int(state.get('num_frozen', 0)))


def tag_param_groups(groups: Sequence[Dict[str, Any]], units: Sequence[Any],
                     dont_freeze_pe: bool = False) -> List[Dict[str, Any]]:
    """Split optimizer param groups built elsewhere (e.g. layer-decay groups with ``lr_scale``) by FreezeOut unit.

    Every resulting group keeps its source group's settings and gets ``unit`` (index among the scheduled units) and
    ``name``; parameters in no scheduled unit get ``unit = -1`` (never frozen, global schedule). The LR a
    :class:`FreezeOut` step sets is the unit's LR times the group's ``lr_scale``.
    """
    sched = list(units[1:] if dont_freeze_pe else units)
    owner = {id(p): (i, u.name) for i, u in enumerate(sched) for p in u.params.values()}
    out = []
    for g in groups:
        split: Dict[Any, List[torch.Tensor]] = {}
        for p in g['params']:
            split.setdefault(owner.get(id(p), (-1, 'rest')), []).append(p)
        for (i, name), params in split.items():
            out.append({**{k: v for k, v in g.items() if k != 'params'}, 'params': params, 'unit': i, 'name': name})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# FLOP model and plan


def measure_unit_flops(model: nn.Module, input_size: int, mask_ratio: float, device: torch.device,
                       dont_freeze_pe: bool = False, time_targets: bool = True,
                       forward: Optional[Callable[[torch.Tensor], Any]] = None,
                       units: Optional[Sequence[Any]] = None) -> Dict[str, Any]:
    """Forward FLOPs of one image, per unit, measured on the actual model with torch's FlopCounterMode.

    Each unit counts its block plus the norms/decoders of the stages it feeds; attention matmuls are added
    analytically (4·N²·C per attention call) because fused SDPA kernels are not counted on every backend.
    Everything else (HOG targets, masking) is ``shared``, paid in every freeze state. HOG is mostly binning and
    scatter, which FLOP counters do not see, so with ``time_targets`` it is timed against the rest of the forward on
    ``device`` and added to ``shared`` as FLOP-equivalents (``hog_fwd``). The model's RNG use is isolated
    (fork_rng) so measuring does not change the run.

    Other models: ``forward(x)`` runs one image (default ``model(x, mask_ratio=...)``) and ``units`` are their
    FreezeOut units (default ``model.units()``); parameters outside every unit (a classifier head) count as shared.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from timm.models.vision_transformer import Attention

    attn_extra: Dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, Attention):
            def hook(m, inp, _name=name):
                b, n, c = inp[0].shape
                attn_extra[_name] = attn_extra.get(_name, 0.0) + 4.0 * b * n * n * c
            hooks.append(mod.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), torch.no_grad():
            x = torch.randn(1, 3, input_size, input_size, device=device)
            with FlopCounterMode(display=False) as fc:
                model(x, mask_ratio=mask_ratio) if forward is None else forward(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    counts = {k: float(sum(v.values())) for k, v in fc.get_flop_counts().items()}
    root = type(model).__name__

    def under(prefix: str) -> float:
        total = counts.get(f'{root}.{prefix}', 0.0)
        total += sum(v for k, v in attn_extra.items() if k == prefix or k.startswith(prefix + '.'))
        return total

    units = model.units() if units is None else units
    per_unit, per_unit_enc = [], []
    for u in units:
        mods = sorted({'.'.join(n.split('.')[:2]) if n.split('.')[0] in ('blocks', 'norm', 'decoder')
                       else n.split('.')[0] for n in u.params})
        per_unit.append(sum(under(m) for m in mods))
        per_unit_enc.append(sum(under(m) for m in mods if not m.startswith(('norm.', 'decoder.'))))
    total = counts.get('Global', 0.0) + sum(attn_extra.values())
    hog = _hog_flop_equivalent(model, input_size, mask_ratio, device, total) if time_targets else 0.0
    return {'names': [u.name for u in units], 'unit_fwd': per_unit, 'unit_enc_fwd': per_unit_enc,
            'total_fwd': total + hog, 'hog_fwd': hog, 'shared_fwd': max(0.0, total - sum(per_unit)) + hog}


def _hog_flop_equivalent(model: nn.Module, input_size: int, mask_ratio: float, device: torch.device,
                         counted_fwd: float, batch: int = 4, reps: int = 3) -> float:
    """Per-image FLOP-equivalent of the HOG targets: their time × the FLOP rate of the rest of the forward."""
    import time

    def timed(fn) -> float:
        out = []
        for _ in range(reps + 1):
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            out.append(time.perf_counter() - t0)
        return sorted(out[1:])[len(out[1:]) // 2]

    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), torch.no_grad():
            x = torch.randn(batch, 3, input_size, input_size, device=device)
            t_hog = timed(lambda: model.hog(x))
            t_all = timed(lambda: model(x, mask_ratio=mask_ratio))
    finally:
        model.train(was_training)
    rest = max(t_all - t_hog, 1e-9)
    return counted_fwd * t_hog / rest


def step_cost(flops: Dict[str, Any], num_frozen: int, dont_freeze_pe: bool) -> float:
    """Relative training cost of one step with ``num_frozen`` scheduled units frozen (backward = 2× forward).

    Active unit: 3× its forward. Frozen unit: its encoder forward only (1×) under no_grad — or 2× with
    ``dont_freeze_pe``, where the input-side backward still runs through the frozen blocks — and its decoders are
    not run at all. Shared work (HOG targets, masking) is paid every step.
    """
    fwd = flops['unit_fwd']
    enc = flops.get('unit_enc_fwd', fwd)
    cost = flops['shared_fwd']
    offset = 1 if dont_freeze_pe else 0
    for i, f in enumerate(fwd):
        sched_idx = i - offset
        frozen = 0 <= sched_idx < num_frozen
        if not frozen:
            cost += 3.0 * f
        else:
            cost += (2.0 if dont_freeze_pe else 1.0) * enc[i]
    return cost


def projected_saving(schedule: FreezeOutSchedule, flops: Dict[str, Any], dont_freeze_pe: bool) -> float:
    """1 - (FLOPs of the FreezeOut run) / (FLOPs of the same run without freezing)."""
    steps = schedule.steps_in_state()
    base = step_cost(flops, 0, dont_freeze_pe) * schedule.total_steps
    run = sum(n * step_cost(flops, k, dont_freeze_pe) for k, n in enumerate(steps))
    return 1.0 - run / base


def format_plan(schedule: FreezeOutSchedule, steps_per_epoch: int, flops: Optional[Dict[str, Any]] = None,
                dont_freeze_pe: bool = False) -> str:
    """A human-readable freeze plan: the schedule in force, which LR floor each curve ends at, per unit t_i, peak LR,
    the step where its LR reaches its floor (``end``), freeze step and epoch; projected FLOP saving."""
    s = schedule
    cls = ('cls token: in the never-frozen embedding (--dont_freeze_pe), as in ViTFreeze' if dont_freeze_pe else
           'cls token: frozen with unit 0 (ViTFreeze keeps it at the global LR and never freezes it, so its backward '
           'runs through every frozen block)')
    lines = [f'FreezeOut plan: {s.how_scale} t_0={s.t_0:g}, scale_lr={s.scale_lr}, layerwise_lr={s.layerwise_lr}, '
             f'T={s.total_steps} optimizer steps ({steps_per_epoch}/epoch), warm-up W={s.warmup_steps}, '
             f'lr={s.lr:.3e}, min_lr={s.min_lr:.3e}; {cls}',
             f'schedule: {s.describe()}',
             s.describe_floors() + ('; the never-frozen embedding (--dont_freeze_pe) is on the global curve'
                                    if dont_freeze_pe else ''),
             f"{'unit':>4} {'name':<10} {'t_i':>7} {'peak lr':>10} {'end':>10} {'freeze step':>11} "
             f"{'epoch':>8}  note"]
    if dont_freeze_pe:
        lines.append(f"{'-':>4} {'embed':<10} {'-':>7} {s.lr:>10.3e} {'-':>10} {'never':>11} {'-':>8}  global "
                     f"schedule; backward still runs through frozen blocks to reach it")
    for u in s.units:
        alpha = u.alpha if s.layerwise_lr else s.lr
        if u.freeze_step is None:
            fs, ep, note = 'never', '-', 't = 1'
        else:
            fs, ep = str(u.freeze_step), f'{u.freeze_step / max(1, steps_per_epoch):.2f}'
            note = 'end <= warm-up: frozen before its cosine starts' if u.end_step <= s.warmup_steps else ''
        if (s.freeze_schedule == 'vitfreeze' and s.layerwise_lr and u.alpha != s.lr and s.warmup_steps > 0
                and (u.freeze_step is None or u.freeze_step > s.warmup_steps)):
            note = (note + '; ' if note else '') + f'LR jumps x{u.alpha / s.lr:.3g} at W'
        lines.append(f'{u.index:>4} {u.name:<10} {u.t:>7.4f} {alpha:>10.3e} {u.end_step:>10.1f} {fs:>11} {ep:>8}  '
                     f'{note}')
    if flops is not None:
        lines.append(f'projected saving of training FLOPs (FLOP model, backward = 2x forward, decoders and targets '
                     f'included): {100 * projected_saving(s, flops, dont_freeze_pe):.1f}%')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Adaptive freezing (--freeze_policy adaptive)

SIGNALS = ('weight', 'output')


@dataclass
class AdaptiveBounds:
    """Bounds of the adaptive policy, all in optimizer steps except ``earliest`` (a fraction of T)."""
    earliest: float     # nothing freezes before step ceil(earliest · T)
    window: int         # K: the signal is evaluated every K steps, as the change over the last K steps
    threshold: float    # a unit is stalled when its plasticity (rate / its peak rate) is below this
    patience: int       # consecutive stalled evaluations before the decision
    tail: int           # steps of LR anneal between the decision and the freeze


def auto_window(total_steps: int) -> int:
    """Default K: 2% of the run (50 evaluations), at least 1 step."""
    return max(1, total_steps // 50)


def eval_mode_probe(model: nn.Module, features: Callable[[torch.Tensor], List[torch.Tensor]],
                    imgs: torch.Tensor) -> Callable[[], List[torch.Tensor]]:
    """The ``probe`` of :class:`AdaptiveFreezeOut`'s output signal: ``features(imgs)`` (one tensor per unit) with
    ``model`` in eval mode, so no dropout or drop path makes two probes of the same weights differ; the model's
    train/eval mode is restored afterwards."""
    def probe() -> List[torch.Tensor]:
        was = model.training
        model.eval()
        try:
            return features(imgs)
        finally:
            model.train(was)
    return probe


class AdaptiveFreezeOut(FreezeOut):
    """Freezes unit i once its training has stalled, judged by a per-unit signal, instead of at a planned t_i.

    Same optimizer-side interface as :class:`FreezeOut` (``param_groups``, ``step(optimizer, step)`` once per
    optimizer step, ``apply_frozen``, ``state_dict``). Every ``K = bounds.window`` steps after warm-up it measures,
    for every unit still training, ``rate`` = the relative change over the last K steps (‖ΔW‖/‖W‖, or the same of
    the unit's output); ``plasticity = rate / peak rate`` (its own peak since warm-up; a unit that has never moved
    has plasticity 0). With ``per_lr`` the rate is divided by the LR summed over the window (AdamW moves every
    weight by ~LR, so this isolates how *consistently* a unit moves from how far its LR lets it) — but on the demo
    data that ratio *rises* as the cosine decays (weights stop bouncing across the valley at low LR), so nothing
    ever stalls under a cosine schedule; it is an option, not the default. Signals:

    * ``weight``: change of the unit's parameters. Computed from the weights, which DDP keeps bit-identical on every
      rank, so every rank takes the same decisions with no communication.
    * ``output``: change of the unit's output on a fixed probe batch (Egeria-style); ``probe()`` (supplied by the
      caller) returns one feature tensor per model unit. ``sync`` (e.g. a broadcast from rank 0) makes the numbers
      identical on every rank even if kernels differ in the last bit.

    A unit whose plasticity stays below ``threshold`` for ``patience`` evaluations is *decided*: its LR is
    multiplied by ½(1 + cos(π·(j − j_d)/tail)) for ``tail`` steps, then it freezes (at an optimizer-step boundary).
    Decisions follow prefix order (unit i only once unit i−1 is decided), the last unit is never frozen, nothing
    freezes before ``earliest · T``, and no decision is taken whose freeze would fall at or after T. Every other
    unit follows ``base_lr(step)`` (the run's global schedule) times its group's ``lr_scale``; with no decision the
    run is plain training, number for number.
    """

    def __init__(self, model: nn.Module, total_steps: int, warmup_steps: int, base_lr: Callable[[int], float],
                 bounds: AdaptiveBounds, signal: str = 'weight',
                 probe: Optional[Callable[[], List[torch.Tensor]]] = None,
                 sync: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, dont_freeze_pe: bool = False,
                 per_lr: bool = False):
        if signal not in SIGNALS:
            raise UserError(f"--freeze_signal {signal!r}: choose {' or '.join(SIGNALS)}")
        if signal == 'output' and probe is None:
            raise ValueError('the output signal needs a probe() returning one feature tensor per unit')
        units = model.units()
        self.model, self.dont_freeze_pe, self.schedule = model, dont_freeze_pe, None
        self.embed_unit = units[0]
        self.sched_units = units[1:] if dont_freeze_pe else units
        self.num_frozen = 0
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.base_lr, self.bounds, self.signal, self.probe, self.sync = base_lr, bounds, signal, probe, sync
        self.per_lr = per_lr
        self.earliest_step = math.ceil(round(bounds.earliest * self.total_steps, 6))
        n = len(self.sched_units)
        self.peak: List[float] = [0.0] * n
        self.below: List[int] = [0] * n
        self.plasticity: Dict[str, float] = {}
        self.tails: Dict[int, List[int]] = {}           # unit -> [decision step, freeze step]
        self.decisions: List[Dict[str, Any]] = []       # every decision so far (also the saving's frozen history)
        self.snapshot: Dict[int, List[torch.Tensor]] = {}
        self.snapshot_step: Optional[int] = None
        self._events: List[Dict[str, Any]] = []

    # ---- the policy --------------------------------------------------------------------------------------------

    def is_eval_step(self, step: int) -> bool:
        return step >= self.warmup_steps and (step - self.warmup_steps) % self.bounds.window == 0

    def _candidates(self) -> List[int]:
        """Units still measured: not frozen, not decided, not the last (never frozen)."""
        return [i for i in range(self.num_frozen, len(self.sched_units) - 1) if i not in self.tails]

    def _current(self, units: Sequence[int]) -> Dict[int, List[torch.Tensor]]:
        if self.signal == 'weight':
            return {i: [p.detach() for p in self.sched_units[i].params.values()] for i in units}
        feats = self.probe()
        offset = 1 if self.dont_freeze_pe else 0
        return {i: [feats[i + offset].detach().float()] for i in units}

    def _evaluate(self, step: int) -> None:
        units = self._candidates()
        now = self._current(units)
        prev, prev_step = self.snapshot, self.snapshot_step
        measured = [i for i in units if prev_step is not None and i in prev]
        if measured:
            # one device vector, one host read per evaluation: [delta_0, ref_0, delta_1, ref_1, ...]
            parts = []
            for i in measured:
                d = torch.stack([torch.linalg.vector_norm(a.float() - b.float()) for a, b in zip(now[i], prev[i])])
                r = torch.stack([torch.linalg.vector_norm(b.float()) for b in prev[i]])
                parts += [d.pow(2).sum().sqrt(), r.pow(2).sum().sqrt()]
            vec = torch.stack(parts)
            if self.sync is not None:
                vec = self.sync(vec)
            vals = vec.tolist()
            lr_dist = sum(self.base_lr(j) for j in range(prev_step, step)) if self.per_lr else 1.0
            plast = {}
            for k, i in enumerate(measured):
                delta, ref = vals[2 * k], vals[2 * k + 1]
                rate = delta / max(ref, 1e-30) / lr_dist if lr_dist > 0 else 0.0
                self.peak[i] = max(self.peak[i], rate)
                p = rate / self.peak[i] if self.peak[i] > 0 else 0.0
                self.below[i] = self.below[i] + 1 if p < self.bounds.threshold else 0
                plast[self.sched_units[i].name] = p
            self.plasticity = plast
            self._events.append({'kind': 'signal', 'step': step, 'plasticity': dict(plast)})
            self._decide(step)
        keep = self._candidates()
        self.snapshot = {i: [t.clone() for t in now[i]] for i in keep if i in now}
        self.snapshot_step = step

    def _decide(self, step: int) -> None:
        b = self.bounds
        if step + b.tail < self.earliest_step or step + b.tail >= self.total_steps:
            return  # too early (the freeze would precede the earliest step), or it would never take effect
        i = self.num_frozen + len(self.tails)   # tails are contiguous after the frozen prefix
        while i < len(self.sched_units) - 1 and self.below[i] >= b.patience:
            self.tails[i] = [step, step + b.tail]
            d = {'step': step, 'unit': self.sched_units[i].name, 'index': i, 'freeze_step': step + b.tail,
                 'plasticity': self.plasticity.get(self.sched_units[i].name, 0.0), 'threshold': b.threshold,
                 'patience': b.patience}
            self.decisions.append(d)
            self._events.append({'kind': 'decision', **d})
            i += 1

    def _factor(self, unit: int, step: int) -> float:
        tail = self.tails.get(unit)
        if tail is None:
            return 1.0
        start, end = tail
        return 0.5 * (1.0 + math.cos(math.pi * (step - start) / max(1, end - start)))

    def step(self, optimizer: torch.optim.Optimizer, step: int) -> bool:
        """At optimizer step ``step``: evaluate the signal (every K steps), freeze what is due, set LRs."""
        if self.is_eval_step(step) and step != self.snapshot_step:
            self._evaluate(step)
        due = self.num_frozen
        while due in self.tails and self.tails[due][1] <= step:
            due += 1
        changed = due > self.num_frozen
        if changed:
            for i in range(self.num_frozen, due):
                del self.tails[i]
            self.apply_frozen(optimizer, due)
            for i in list(self.snapshot):
                if i < due:
                    del self.snapshot[i]
        base = self.base_lr(step)
        for g in optimizer.param_groups:
            u = g['unit']
            g['lr'] = base * (1.0 if u < 0 else self._factor(u, step)) * g.get('lr_scale', 1.0)
        return changed

    def drain_events(self) -> List[Dict[str, Any]]:
        """Signal evaluations and decisions since the last call (for the log lines and TensorBoard)."""
        ev, self._events = self._events, []
        return ev

    def lr_by_unit(self, step: int) -> Dict[str, float]:
        out = {}
        if self.dont_freeze_pe:
            out[self.embed_unit.name] = self.base_lr(step)
        for i, u in enumerate(self.sched_units):
            if i >= self.num_frozen:
                out[u.name] = self.base_lr(step) * self._factor(i, step)
        return out

    # ---- what the decisions cost (the FLOP model's "saving of the decisions so far") ---------------------------

    def num_frozen_at(self, step: int) -> int:
        return sum(1 for d in self.decisions if step >= d['freeze_step'])

    def state_boundaries(self) -> List[int]:
        return sorted({d['freeze_step'] for d in self.decisions})

    # ---- checkpoint --------------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {'policy': 'adaptive', 'signal': self.signal, 'num_frozen': self.num_frozen,
                'frozen_units': [u.name for u in self.sched_units[:self.num_frozen]],
                'peak': list(self.peak), 'below': list(self.below), 'plasticity': dict(self.plasticity),
                'tails': {str(k): list(v) for k, v in self.tails.items()},
                'decisions': [dict(d) for d in self.decisions],
                'snapshot': {str(k): list(v) for k, v in self.snapshot.items()}, 'snapshot_step': self.snapshot_step}

    def load_state_dict(self, state: Dict[str, Any], optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Re-apply the frozen set and restore the policy; call BEFORE ``optimizer.load_state_dict``."""
        if state and state.get('policy') != 'adaptive':
            raise UserError('--resume: the checkpoint was written with --freeze_policy schedule; resume with it')
        if state and state.get('signal', self.signal) != self.signal:
            raise UserError(f"--resume: the checkpoint's adaptive policy used --freeze_signal {state['signal']}; "
                            f"resume with it")
        self.apply_frozen(optimizer, int(state.get('num_frozen', 0)))
        n = len(self.sched_units)
        self.peak = [float(x) for x in state.get('peak', [0.0] * n)]
        self.below = [int(x) for x in state.get('below', [0] * n)]
        self.plasticity = dict(state.get('plasticity', {}))
        self.tails = {int(k): [int(a) for a in v] for k, v in state.get('tails', {}).items()}
        self.decisions = [dict(d) for d in state.get('decisions', [])]
        dev = next(iter(self.sched_units[-1].params.values())).device
        self.snapshot = {int(k): [t.to(dev) for t in v] for k, v in state.get('snapshot', {}).items()}
        self.snapshot_step = state.get('snapshot_step')


def decided_saving(freezer: Any, flops: Dict[str, Any], done: int, dont_freeze_pe: bool) -> float:
    """FLOP-model saving over optimizer steps [0, done) for the frozen counts ``freezer.num_frozen_at`` gives
    (a schedule's plan, or an adaptive policy's decisions so far)."""
    bounds = [0] + [b for b in freezer.state_boundaries() if b < done] + [done]
    run = sum((hi - lo) * step_cost(flops, freezer.num_frozen_at(lo), dont_freeze_pe)
              for lo, hi in zip(bounds[:-1], bounds[1:]))
    return 1.0 - run / (step_cost(flops, 0, dont_freeze_pe) * done)


def format_adaptive_plan(freezer: AdaptiveFreezeOut, steps_per_epoch: int,
                         flops: Optional[Dict[str, Any]] = None) -> str:
    """--plan_only for the adaptive policy: the policy, its bounds in steps and epochs, and the FLOP bound."""
    f, b = freezer, freezer.bounds
    spe = max(1, steps_per_epoch)
    evals = max(0, (f.total_steps - 1 - f.warmup_steps) // b.window + 1) if f.total_steps > f.warmup_steps else 0
    change = 'change per unit LR' if f.per_lr else 'relative change'
    lines = [f'FreezeOut policy: adaptive, signal={f.signal} (plasticity = {change} over the window / its '
             f'peak since warm-up), T={f.total_steps} optimizer steps ({steps_per_epoch}/epoch), warm-up '
             f'W={f.warmup_steps}',
             f'  earliest freeze: {b.earliest:g} of training = step {f.earliest_step} '
             f'(epoch {f.earliest_step / spe:.2f})',
             f'  window: every {b.window} steps ({b.window / spe:.2f} epochs) from step {f.warmup_steps}: {evals} '
             f'evaluations',
             f'  threshold: plasticity < {b.threshold:g} for {b.patience} consecutive evaluations',
             f'  tail: LR x 1/2(1 + cos) over {b.tail} steps ({b.tail / spe:.2f} epochs) before each freeze',
             f'  order: prefix ({", ".join(u.name for u in f.sched_units[:-1])}); {f.sched_units[-1].name} never '
             f'freezes' + ('; embed never freezes (--dont_freeze_pe)' if f.dont_freeze_pe else ''),
             '  LR: the global warm-up + cosine for every unit (no per-unit t_i, so no 1/t_i scaling)']
    if flops is not None:
        n = len(f.sched_units) - 1
        rest = f.total_steps - f.earliest_step
        c0, cn = step_cost(flops, 0, f.dont_freeze_pe), step_cost(flops, n, f.dont_freeze_pe)
        best = 1.0 - (f.earliest_step * c0 + rest * cn) / (c0 * f.total_steps) if rest > 0 else 0.0
        lines.append(f'FLOP model: at most {100 * best:.1f}% saving of training FLOPs (every unit but the last frozen '
                     f'at the earliest step); the run logs the saving of its decisions so far')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Flags of the freeze policy (shared by run_pretrain.py and run_finetune.py)

SCHEDULE_FLAGS = ('t_0', 'how_scale', 'not_scale_lr', 'non_layerwise_lr')


def add_schedule_args(g, embed: str = 'patch embedding and cls token') -> None:
    """The scheduled FreezeOut's flags (run_pretrain.py, run_finetune.py), in the argument group ``g``."""
    g.add_argument('--freeze_schedule', default='vitfreeze', choices=list(FREEZE_SCHEDULES),
                   help="vitfreeze = ViTFreeze's code: every unit warms up to lr, a scaled unit jumps to lr/t_i at "
                        "the end of warm-up W, its cosine runs from W over t_i*(T-W) steps to 0 (ViTFreeze's unit "
                        "curves; a typed --min_lr replaces the 0) and it freezes at step W + t_i*(T-W), while the "
                        "global curve (--non_layerwise_lr, never-frozen units) ends at --min_lr; freezeout = the "
                        "FreezeOut paper's convention: warm-up to lr/t_i, cosine to --min_lr ending (and freezing) "
                        "at t_i*T (default: vitfreeze)")
    g.add_argument('--t_0', default=None, type=float,
                   help='freeze point of the first unit before scaling, in (0, 1]; 1 = never freeze (default when '
                        'FreezeOut is on: 0.8)')
    g.add_argument('--how_scale', default=None, choices=['linear', 'squared', 'cubic'],
                   help='t_i = s(t_0 + (1 - t_0) i / N) with s = identity/square/cube (default when on: cubic)')
    g.add_argument('--not_scale_lr', action='store_true',
                   help='initial LR of every unit = lr, instead of lr / t_i (default: scaled)')
    g.add_argument('--non_layerwise_lr', action='store_true',
                   help='all units follow the global warm-up + cosine (or constant); each is still frozen at its '
                        'freeze step (default: off)')
    g.add_argument('--dont_freeze_pe', action='store_true',
                   help=f'never freeze the {embed} (they follow the global schedule); blocks become units 0..N-1. '
                        f'Without it the cls token freezes with unit 0 (ViTFreeze never freezes it) (default: off)')


def resolve_freeze_args(args, argv: Sequence[str]) -> None:
    """``args.freezeout`` (on with --t_0/--how_scale or --freeze_policy adaptive), the schedule's defaults
    (cubic, t_0 0.8), and one-line errors for bad or contradictory values."""
    check_policy_args(args, argv, SCHEDULE_FLAGS)
    args.freezeout = args.t_0 is not None or args.how_scale is not None or args.freeze_policy == 'adaptive'
    # floor of a freezing unit's own cosine: ViTFreeze's unit curves end at 0 (its global one at --min_lr), so the
    # vitfreeze default is 0; a typed --min_lr is the floor of every curve
    from util.args import explicit_flags
    typed = 'min_lr' in explicit_flags(argv)
    args.unit_min_lr = args.min_lr if (typed or args.freeze_schedule != 'vitfreeze') else 0.0
    if getattr(args, 'freezeout_weight_decay', None) is not None and not args.freezeout:
        print('note: --freezeout_weight_decay only acts with FreezeOut (--t_0/--how_scale)')
    if args.freezeout and args.freeze_policy == 'schedule':
        args.t_0 = 0.8 if args.t_0 is None else args.t_0
        args.how_scale = args.how_scale or 'cubic'
        if not (0.0 < args.t_0 <= 1.0):
            raise UserError(f'--t_0 {args.t_0}: must be in (0, 1] (1 = never freeze)')
    elif not args.freezeout and (args.not_scale_lr or args.non_layerwise_lr or args.dont_freeze_pe):
        print('note: --not_scale_lr/--non_layerwise_lr/--dont_freeze_pe only act with FreezeOut (--t_0/--how_scale)')


def format_decision(ev: Dict[str, Any], epoch: int) -> str:
    """The one log line of an adaptive decision."""
    return (f"FreezeOut adaptive: step {ev['step']} (epoch {epoch}): {ev['unit']} stalled (plasticity "
            f"{ev['plasticity']:.3f} < {ev['threshold']:g} for {ev['patience']} evaluations); its LR anneals to 0 "
            f"and it freezes at step {ev['freeze_step']}")


ADAPTIVE_FLAGS = ('freeze_signal', 'freeze_per_lr', 'freeze_earliest', 'freeze_window', 'freeze_threshold',
                  'freeze_patience', 'freeze_tail')


def add_policy_args(g, earliest: float = 0.5) -> None:
    """--freeze_policy and the adaptive policy's signal and bounds, in the argument group ``g``."""
    g.add_argument('--freeze_policy', default='schedule', choices=['schedule', 'adaptive'],
                   help='schedule = FreezeOut (unit i freezes at t_i, --t_0/--how_scale); adaptive = a unit freezes '
                        'once its plasticity signal has stalled, in prefix order, within the --freeze_* bounds '
                        '(turns freezing on by itself) (default: schedule)')
    g.add_argument('--freeze_signal', default='weight', choices=list(SIGNALS),
                   help='adaptive signal: weight = relative change of the unit\'s weights over the window (no '
                        'extra forward, no communication); output = the same for its output on a fixed probe batch '
                        'of 16 images (one extra forward per window) (default: weight)')
    g.add_argument('--freeze_per_lr', action='store_true',
                   help='adaptive: divide the change by the LR summed over the window (how consistently a unit '
                        'moves, not how far); under a cosine LR this rarely stalls (default: off)')
    g.add_argument('--freeze_earliest', default=earliest, type=float, metavar='FRAC',
                   help=f'adaptive: nothing freezes before this fraction of the optimizer steps, in [0, 1) '
                        f'(default: {earliest})')
    g.add_argument('--freeze_window', default=None, type=int, metavar='STEPS',
                   help='adaptive: evaluate the signal every STEPS optimizer steps, as the change over them '
                        '(default: 2%% of the run\'s steps, at least 1)')
    g.add_argument('--freeze_threshold', default=0.5, type=float, metavar='P',
                   help='adaptive: a unit is stalled when its plasticity (change over the window / its peak since '
                        'warm-up) is below P, in (0, 1] (default: 0.5)')
    g.add_argument('--freeze_patience', default=2, type=int, metavar='N',
                   help='adaptive: consecutive stalled evaluations before a unit is decided (default: 2)')
    g.add_argument('--freeze_tail', default=None, type=int, metavar='STEPS',
                   help='adaptive: optimizer steps over which a decided unit\'s LR anneals (half cosine to 0) '
                        'before it freezes (default: one window)')


def check_policy_args(args, argv: Sequence[str], schedule_flags: Sequence[str]) -> None:
    """One-line errors for contradictory or out-of-range policy flags (``UserError``: exit status 2)."""
    from util.args import explicit_flags
    given = set(explicit_flags(argv))
    if args.freeze_policy == 'adaptive':
        clash = [f'--{f}' for f in schedule_flags if f in given]
        if clash:
            raise UserError(f"{'/'.join(clash)} shape the scheduled FreezeOut; with --freeze_policy adaptive there "
                            f"is no t_i: drop {'them' if len(clash) > 1 else 'it'} or use --freeze_policy schedule")
        # the numeric bounds of --freeze_* are checked once, at parse time (util/args.FLAG_DOMAINS)
    elif any(f in given for f in ADAPTIVE_FLAGS):
        print('note: --freeze_signal/--freeze_per_lr/--freeze_earliest/--freeze_window/--freeze_threshold/'
              '--freeze_patience/--freeze_tail only act with --freeze_policy adaptive')


def bounds_from_args(args, total_steps: int) -> AdaptiveBounds:
    window = args.freeze_window or auto_window(total_steps)
    return AdaptiveBounds(earliest=args.freeze_earliest, window=window, threshold=args.freeze_threshold,
                          patience=args.freeze_patience,
                          tail=window if args.freeze_tail is None else args.freeze_tail)
