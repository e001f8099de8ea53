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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from util.args import integer, real
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


# ---------------------------------------------------------------------------------------------------------------------
# The policy seam: a FreezePolicy decides (how long the frozen prefix is, each trainable unit's LR); one FreezeOut
# applies any policy (requires_grad, optimizer groups and state, the model's no_grad prefix, DDP re-wrap via the
# caller, history for the saving, resume checks). A new freezing rule is one FreezePolicy subclass.


class FreezePolicy:
    """Base class of freezing policies (a public contract: plugins subclass it, ``--freeze_policy module:Class``).

    A policy sees ordered unit *names* only (unit 0 = input side); the toolkit owns the parameters. Steps are
    0-based optimizer steps; ``frozen_units(step)`` is asked before the update of step ``step`` and must never go
    down. Optional hooks (defaults do nothing): :meth:`observe` (watch training, e.g. weights or a probe's outputs),
    :meth:`boundaries` (the steps where the frozen count changes, when known), :meth:`format_plan` (its
    ``--plan_only`` text), ``needs_probe`` (ask the toolkit for a probe of every unit's output).
    """
    name: str = ''             # set by register_policy (or 'module:Class' for a plugin)
    needs_probe: bool = False  # observe() gets view.probe(): one feature tensor per model unit, fixed batch
    plans_ahead: bool = True   # frozen_units() is a pure function of the step: the plan can be computed up front
    schedule: Optional['FreezeOutSchedule'] = None  # a planned per-unit schedule, if the policy has one

    def __init__(self, args: Any, units: List[str], total_steps: int, warmup_steps: int):
        self.args, self.units = args, list(units)
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)

    @classmethod
    def add_args(cls, group) -> None:
        """The policy's own flags (help with units and default; numeric ones need a domain, util/args)."""

    def frozen_units(self, step: int) -> int:
        """How many leading units are frozen from optimizer step ``step`` on."""
        return 0

    def unit_lr(self, unit: int, step: int, base_lr: float) -> float:
        """LR of trainable unit ``unit`` at ``step``; ``base_lr`` = the run's global schedule at ``step``."""
        return base_lr

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    # ---- optional hooks --------------------------------------------------------------------------------------

    def observe(self, step: int, view: 'UnitView') -> List[Dict[str, Any]]:
        """Called once per optimizer step before :meth:`frozen_units`; returns log events (``kind`` 'signal' with
        ``plasticity`` {unit: value}, or 'decision' with step/unit/index/freeze_step and a ``text`` line)."""
        return []

    def boundaries(self) -> Optional[List[int]]:
        """Sorted steps in [0, T) where ``frozen_units`` changes (None: the toolkit scans every step)."""
        return None

    def epoch_record(self, start: int, end: int) -> Dict[str, Any]:
        """Extra fields for the log record of the epoch spanning optimizer steps [start, end)."""
        return {}

    def format_plan(self, freezer: 'FreezeOut', steps_per_epoch: int, flops: Optional[Dict[str, Any]]) -> str:
        """``--plan_only``: every unit's freeze step (from :meth:`frozen_units`) and the FLOP-model saving."""
        spe = max(1, steps_per_epoch)
        steps = freezer.freeze_steps()
        lines = [f'FreezeOut policy: {self.name} ({_first_line(type(self).__doc__)}), T={self.total_steps} optimizer '
                 f'steps ({steps_per_epoch}/epoch), warm-up W={self.warmup_steps}',
                 f"{'unit':>4} {'name':<10} {'freeze step':>11} {'epoch':>8}"]
        for i, (name, s) in enumerate(zip(self.units, steps)):
            lines.append(f"{i:>4} {name:<10} {'never' if s is None else s:>11} "
                         f"{'-' if s is None else format(s / spe, '.2f'):>8}")
        if flops is not None:
            lines.append(f'projected saving of training FLOPs (FLOP model, backward = 2x forward): '
                         f'{100 * decided_saving(freezer, flops, self.total_steps):.1f}%')
        return '\n'.join(lines)


def _first_line(doc: Optional[str]) -> str:
    return (doc or '').strip().split('\n')[0].rstrip('.') or 'no description'


@dataclass
class UnitView:
    """What :meth:`FreezePolicy.observe` may look at: the scheduled units' parameters (detached reads only), the
    current frozen count, an optional probe (one output tensor per *model* unit on a fixed batch) and ``sync``
    (make a device vector identical on every rank, e.g. a broadcast from rank 0; identity when not distributed)."""
    units: List[Any]                 # ParamUnit-like: .name, .params {name: Parameter}
    num_frozen: int
    probe: Optional[Callable[[], List[torch.Tensor]]]
    sync: Callable[[torch.Tensor], torch.Tensor]
    offset: int                      # model units before the first scheduled one (1 with --dont_freeze_pe)
    base_lr: Callable[[int], float]  # the run's global schedule
    optimizer: Optional[torch.optim.Optimizer] = None  # the optimizer being stepped (set by FreezeOut.step)

    def params(self, unit: int) -> List[torch.Tensor]:
        return [p.detach() for p in self.units[unit].params.values()]

    def optimizer_state(self, unit: int) -> List[Tuple[Dict[str, Any], Dict[str, Any]]]:
        """``(state, param group)`` of each of the unit's parameters in the optimizer (read-only; a state is empty
        before the parameter's first update). The state holds what the optimizer accumulated from the gradients
        (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``), which are gone by the time a policy observes."""
        if self.optimizer is None:
            return []
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g['params']}
        return [(self.optimizer.state.get(p, {}), group_of[id(p)])
                for p in self.units[unit].params.values() if id(p) in group_of]

    def outputs(self, units: Sequence[int]) -> Dict[int, torch.Tensor]:
        if self.probe is None:
            raise ValueError('this policy needs a probe() returning one feature tensor per unit (needs_probe)')
        feats = self.probe()
        return {i: feats[i + self.offset].detach().float() for i in units}


POLICIES: Dict[str, type] = {}


def register_policy(name: str):
    """Class decorator: make a FreezePolicy available as ``--freeze_policy NAME``."""
    def deco(cls):
        cls.name = name
        POLICIES[name] = cls
        return cls
    return deco


def resolve_policy(spec: str) -> type:
    """``--freeze_policy`` value -> FreezePolicy subclass: a registered name or ``module:Class`` on PYTHONPATH."""
    if spec in POLICIES:
        return POLICIES[spec]
    if ':' not in spec:
        raise UserError(f"--freeze_policy {spec!r}: not a registered policy ({', '.join(POLICIES)}) nor "
                        f"module:Class importable from PYTHONPATH")
    from util.plugins import load_class
    cls = load_class(spec, FreezePolicy, '--freeze_policy')
    if not cls.name:
        cls.name = spec
    return cls


class FreezeOut:
    """Applies a :class:`FreezePolicy` to a model and its optimizer, one :meth:`step` per optimizer step.

    ``model`` offers ``units()`` (ordered ParamUnits, unit 0 = input side) and ``set_frozen(num_frozen_blocks,
    embed_frozen)``. With ``dont_freeze_pe`` unit 0 is not scheduled (global LR, never frozen). The optimizer must
    be built from :meth:`param_groups` (or :func:`tag_param_groups`): groups tagged with ``unit`` (-1 = unscheduled).
    ``base_lr(step)`` is the run's global schedule. ``policy`` may also be a :class:`FreezeOutSchedule` (wrapped in
    the schedule policy; its global curve is the base LR).
    """

    def __init__(self, model: nn.Module, policy: Any, dont_freeze_pe: bool = False,
                 base_lr: Optional[Callable[[int], float]] = None,
                 probe: Optional[Callable[[], List[torch.Tensor]]] = None,
                 sync: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, flags: Optional[Dict] = None):
        if isinstance(policy, FreezeOutSchedule):
            base_lr = base_lr or policy.global_lr_at
            policy = SchedulePolicy.from_schedule(policy)
        if base_lr is None:
            raise ValueError('FreezeOut needs base_lr(step), the global schedule')
        self.model, self.policy, self.dont_freeze_pe, self.base_lr = model, policy, dont_freeze_pe, base_lr
        units = model.units()
        self.embed_unit = units[0]
        self.sched_units = units[1:] if dont_freeze_pe else units
        if len(self.sched_units) != len(policy.units):
            raise ValueError(f'policy has {len(policy.units)} units, model {len(self.sched_units)}')
        self.view = UnitView(self.sched_units, 0, probe, sync or (lambda v: v), 1 if dont_freeze_pe else 0,
                             base_lr)
        self.flags = dict(flags or {})  # the policy-shaping flags, checked on resume
        self.num_frozen = 0
        self.history: List[List[int]] = []  # [step, frozen count] at every applied change
        self._events: List[Dict[str, Any]] = []
        self._scanned: Optional[List[int]] = None

    @property
    def schedule(self) -> Optional['FreezeOutSchedule']:
        """The planned per-unit schedule (the schedule policy's; None for others)."""
        return self.policy.schedule

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

    def unit_lr(self, unit: int, step: int) -> float:
        base = self.base_lr(step)
        return base if unit < 0 else self.policy.unit_lr(unit, step, base)

    def lr_by_unit(self, step: int) -> Dict[str, float]:
        """LR of every active unit at ``step`` (for logging)."""
        out = {self.embed_unit.name: self.base_lr(step)} if self.dont_freeze_pe else {}
        for i, u in enumerate(self.sched_units):
            if i >= self.num_frozen:
                out[u.name] = self.unit_lr(i, step)
        return out

    def step(self, optimizer: torch.optim.Optimizer, step: int) -> bool:
        """At optimizer step ``step``: let the policy observe, freeze what it says, set every group's LR.

        Returns True when the frozen set changed (the caller then re-wraps DDP)."""
        self.view.num_frozen, self.view.optimizer = self.num_frozen, optimizer
        self._events += self.policy.observe(step, self.view)
        due = int(self.policy.frozen_units(step))
        if due < self.num_frozen or due > len(self.sched_units):
            raise RuntimeError(f'freeze policy {self.policy.name}: frozen_units({step}) = {due}, but '
                               f'{self.num_frozen} units are frozen already (of {len(self.sched_units)}); the frozen '
                               f'prefix can only grow')
        changed = due > self.num_frozen
        if changed:
            self.apply_frozen(optimizer, due)
            self.history.append([step, due])
            self._events.append({'kind': 'freeze', 'step': step, 'num_frozen': due,
                                 'frozen_units': [u.name for u in self.sched_units[:due]]})
        base = self.base_lr(step)
        unit_lr = self.policy.unit_lr
        for g in optimizer.param_groups:
            u = g['unit']
            g['lr'] = (base if u < 0 else unit_lr(u, step, base)) * g.get('lr_scale', 1.0)  # x 1.0 is exact
        return changed

    def drain_events(self) -> List[Dict[str, Any]]:
        """The policy's signals and decisions and the applied freezes since the last call (log lines, TensorBoard)."""
        ev, self._events = self._events, []
        return ev

    def num_frozen_at(self, step: int) -> int:
        """Frozen count at ``step`` as far as known now (a plan, or the decisions taken so far)."""
        return int(self.policy.frozen_units(step))

    def state_boundaries(self) -> List[int]:
        """Sorted steps in [0, T) where the frozen count changes (the policy's, or found by asking it every step;
        cached for a policy that plans ahead)."""
        known = self.policy.boundaries()
        if known is not None:
            return list(known)
        if self._scanned is not None:
            return self._scanned
        out, prev = [], 0
        for s in range(self.policy.total_steps):
            n = self.num_frozen_at(s)
            if n != prev:
                out.append(s)
                prev = n
        if self.policy.plans_ahead:
            self._scanned = out
        return out

    def freeze_steps(self) -> List[Optional[int]]:
        """First step at which each scheduled unit is frozen under the plan known now (None = never)."""
        steps: List[Optional[int]] = [None] * len(self.sched_units)
        for s in [0] + self.state_boundaries():
            for i in range(self.num_frozen_at(s)):
                if steps[i] is None:
                    steps[i] = s
        return steps

    def format_plan(self, steps_per_epoch: int, flops: Optional[Dict[str, Any]] = None) -> str:
        return self.policy.format_plan(self, steps_per_epoch, flops)

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
        return {'policy': self.policy.name, 'flags': dict(self.flags), 'num_frozen': self.num_frozen,
                'frozen_units': [u.name for u in self.sched_units[:self.num_frozen]],
                'units': [u.name for u in self.sched_units], 'history': [list(h) for h in self.history],
                'policy_state': self.policy.state_dict()}

    def check_units(self, state: Dict[str, Any]) -> None:
        """Refuse in one line a checkpoint whose scheduled units are not this run's (``--dont_freeze_pe`` added or
        dropped on resume): its frozen set and optimizer groups would be applied to other units."""
        names = [u.name for u in self.sched_units]
        saved, frozen = state.get('units'), list(state.get('frozen_units') or [])
        if (list(saved) == names) if saved is not None else (frozen == names[:len(frozen)]):
            return
        was = list(saved) if saved is not None else frozen
        pe_then = self.embed_unit.name not in was
        if pe_then != self.dont_freeze_pe:
            hint = f"resume {'with' if pe_then else 'without'} --dont_freeze_pe, as the run was trained"
        else:
            hint = 'resume with the architecture flags (--depth, --all_stages, --stage_taps) it was trained with'
        raise UserError(f"--resume: the checkpoint {'schedules' if saved is not None else 'has frozen'} FreezeOut "
                        f"units {', '.join(was)} but this run schedules {', '.join(names)}; {hint}")

    def load_state_dict(self, state: Dict[str, Any], optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Refuse another policy or changed policy-shaping flags (one line naming both), re-apply the frozen set and
        restore the policy; call BEFORE ``optimizer.load_state_dict`` so the group layouts match."""
        state = state or {}
        saved = state.get('policy', 'schedule')  # checkpoints before the policy seam: schedule, or 'adaptive'
        if saved != self.policy.name:
            raise UserError(f'--resume: the checkpoint was written with --freeze_policy {saved}, this run asks for '
                            f'--freeze_policy {self.policy.name}; resume with --freeze_policy {saved}')
        self.check_units(state)  # (names the units: clearer than the --dont_freeze_pe flag it also catches)
        old = state.get('flags', {})
        changed = [k for k in self.flags if k in old and old[k] != self.flags[k]]
        if changed:
            now = ' '.join(f'--{k} {self.flags[k]}' for k in changed)
            then = ' '.join(f'--{k} {old[k]}' for k in changed)
            raise UserError(f'--resume: the checkpoint\'s freeze policy {saved} was shaped by {then}, this run asks '
                            f'for {now}; resume with {then} (or start a new run)')
        num = int(state.get('num_frozen', 0))
        if num > len(self.sched_units):
            raise UserError(f'--resume: the checkpoint has {num} frozen units but this run schedules only '
                            f'{len(self.sched_units)} (was --dont_freeze_pe or --depth changed?); resume with the '
                            f'flags it was trained with')
        self.apply_frozen(optimizer, num)
        self.history = [list(h) for h in state.get('history', [])]
        self.policy.load_state_dict(state['policy_state'] if 'policy_state' in state else state)


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

    Each unit counts its block plus the norms/decoders of the stages it feeds; attention is counted as its explicit
    matmuls (timm's non-fused path during the count), so CPU and CUDA plans agree and nothing is counted twice.
    Everything else (the reconstruction targets, masking) is ``shared``, paid in every freeze state. Targets whose
    work FLOP counters do not see (``Target.uncounted_stages``: HOG is mostly binning and scatter) are, with
    ``time_targets``, timed against the rest of the forward on ``device`` and added to ``shared`` as
    FLOP-equivalents (``target_fwd``; ``hog_fwd`` is the same number under its old name); counted targets (a
    teacher encoder's matmuls) are in ``shared`` already. ``module_fwd`` holds the counted FLOPs of every submodule
    by name (``target`` included: what a target's ``plan_line`` reports). The model's RNG use is isolated
    (fork_rng) so measuring does not change the run.

    Other models: ``forward(x)`` runs one image (default ``model(x, mask_ratio=...)``) and ``units`` are their
    FreezeOut units (default ``model.units()``); parameters outside every unit (a classifier head) count as shared.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from timm.models.vision_transformer import Attention

    # Count attention as explicit matmuls on every backend: FlopCounterMode counts the fused SDPA kernels on CUDA
    # but not on CPU, so a hand-added term would double-count on one of them (timm's non-fused path is the same math)
    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(m, Attention)]
    for m, _ in fused:
        m.fused_attn = False
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), torch.no_grad():
            x = torch.randn(1, 3, input_size, input_size, device=device)
            with FlopCounterMode(display=False) as fc:
                model(x, mask_ratio=mask_ratio) if forward is None else forward(x)
    finally:
        for m, f in fused:
            m.fused_attn = f
        model.train(was_training)
    counts = {k: float(sum(v.values())) for k, v in fc.get_flop_counts().items()}
    root = type(model).__name__

    def under(prefix: str) -> float:
        return counts.get(f'{root}.{prefix}', 0.0)

    units = model.units() if units is None else units
    per_unit, per_unit_enc = [], []
    for u in units:
        mods = sorted({'.'.join(n.split('.')[:2]) if n.split('.')[0] in ('blocks', 'norm', 'decoder')
                       else n.split('.')[0] for n in u.params})
        per_unit.append(sum(under(m) for m in mods))
        per_unit_enc.append(sum(under(m) for m in mods if not m.startswith(('norm.', 'decoder.'))))
    total = counts.get('Global', 0.0)
    tgt = _hog_flop_equivalent(model, input_size, mask_ratio, device, total) if time_targets else 0.0
    out = {'names': [u.name for u in units], 'unit_fwd': per_unit, 'unit_enc_fwd': per_unit_enc,
           'total_fwd': total + tgt, 'target_fwd': tgt, 'hog_fwd': tgt,
           'shared_fwd': max(0.0, total - sum(per_unit)) + tgt,
           'module_fwd': {k[len(root) + 1:]: v for k, v in counts.items() if k.startswith(root + '.')}}
    # training-only work the eval forward above does not run (a self-distillation teacher pass and its heads):
    # the model reports it per unit; trained work joins its unit, no-grad work is paid while its unit trains
    extra_fn = getattr(model, 'extra_step_flops', None) if forward is None else None
    extra = extra_fn(input_size, mask_ratio, device) if callable(extra_fn) else {}
    for u, f in extra.get('unit_fwd', ()):
        per_unit[int(u)] += float(f)
        out['total_fwd'] += float(f)
    if extra.get('nograd_fwd'):
        out['nograd_fwd'] = [[int(u), float(f)] for u, f in extra['nograd_fwd']]
        out['total_fwd'] += sum(f for _, f in out['nograd_fwd'])
    return out


def _hog_flop_equivalent(model: nn.Module, input_size: int, mask_ratio: float, device: torch.device,
                         counted_fwd: float, batch: int = 4, reps: int = 3) -> float:
    """Per-image FLOP-equivalent of the target work FLOP counters miss (``Target.uncounted_stages`` of every
    stage; HOG): its time × the FLOP rate of the rest of the forward. 0 for models without such targets."""
    import time

    target = getattr(model, 'target', None)
    uncounted = target.uncounted_stages(model.stages) if target is not None else []
    if not uncounted:
        return 0.0

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
            t_tgt = timed(lambda: target.forward_stages(x, uncounted))
            t_all = timed(lambda: model(x, mask_ratio=mask_ratio))
    finally:
        model.train(was_training)
    rest = max(t_all - t_tgt, 1e-9)
    return counted_fwd * t_tgt / rest


def step_cost(flops: Dict[str, Any], num_frozen: int, dont_freeze_pe: bool) -> float:
    """Relative training cost of one step with ``num_frozen`` scheduled units frozen (backward = 2× forward).

    Active unit: 3× its forward. Frozen unit: its encoder forward only (1×) under no_grad — or 2× with
    ``dont_freeze_pe``, where the input-side backward still runs through the frozen blocks — and its decoders are
    not run at all. Shared work (HOG targets, masking) is paid every step. No-grad work tied to a unit
    (``nograd_fwd`` [[unit, flops]]: a self-distillation teacher pass) is paid 1x while that unit is not frozen.
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
    for i, f in flops.get('nograd_fwd', ()):
        if not 0 <= i - offset < num_frozen:
            cost += f
    extra = flops.get('prefix_extra')  # work a frozen state adds (prefix_target.py: the full-image prefix pass)
    if extra:
        cost += extra[min(num_frozen, len(extra) - 1)]
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
# The two built-in policies


@register_policy('schedule')
class SchedulePolicy(FreezePolicy):
    """FreezeOut's planned schedule: unit i freezes at t_i, its LR follows its own cosine (--t_0/--how_scale)."""

    def __init__(self, args: Any, units: List[str], total_steps: int, warmup_steps: int):
        super().__init__(args, units, total_steps, warmup_steps)
        self.schedule = FreezeOutSchedule(
            units, total_steps, warmup_steps, args.lr, args.min_lr, args.t_0, args.how_scale,
            scale_lr=not args.not_scale_lr, layerwise_lr=not args.non_layerwise_lr,
            freeze_schedule=args.freeze_schedule, lr_schedule=getattr(args, 'lr_schedule', 'cosine'),
            constant_tail=getattr(args, 'constant_tail', 0.1), unit_min_lr=getattr(args, 'unit_min_lr', None))

    @classmethod
    def from_schedule(cls, schedule: 'FreezeOutSchedule') -> 'SchedulePolicy':
        self = cls.__new__(cls)
        FreezePolicy.__init__(self, None, [u.name for u in schedule.units], schedule.total_steps,
                              schedule.warmup_steps)
        self.schedule = schedule
        return self

    @classmethod
    def add_args(cls, g) -> None:
        add_schedule_args(g)

    def frozen_units(self, step: int) -> int:
        return self.schedule.num_frozen_at(step)

    def unit_lr(self, unit: int, step: int, base_lr: float) -> float:
        return self.schedule.lr_at(unit, step)

    def boundaries(self) -> List[int]:
        return self.schedule.state_boundaries()

    def format_plan(self, freezer: 'FreezeOut', steps_per_epoch: int, flops: Optional[Dict[str, Any]]) -> str:
        return format_plan(self.schedule, steps_per_epoch, flops, freezer.dont_freeze_pe)


SIGNALS = ('coherence', 'weight', 'output')


@dataclass
class AdaptiveBounds:
    """Bounds of the adaptive policy, all in optimizer steps except ``earliest`` (a fraction of T)."""
    earliest: float     # nothing freezes before step ceil(earliest · T)
    window: int         # K: the signal is evaluated every K steps, as the change over the last K steps
    threshold: float    # a unit is stalled when its plasticity (rate / its peak rate) is below this
    patience: int       # consecutive stalled evaluations before the decision
    tail: int           # steps of LR anneal between the decision and the freeze
    spacing: int = 0    # steps from one decision to the next (0: a stalled prefix may be decided at once)


def coherence_stride(window: int) -> int:
    """Sub-step of the coherence signal's path: ~8 segments per window (a ‖ΔW‖ per segment, on the device)."""
    return max(1, window // 8)


def auto_window(total_steps: int) -> int:
    """Default K: 2% of the run (50 evaluations), at least 1 step."""
    return max(1, total_steps // 50)


def eval_mode_probe(model: nn.Module, features: Callable[[torch.Tensor], List[torch.Tensor]],
                    imgs: torch.Tensor) -> Callable[[], List[torch.Tensor]]:
    """A ``probe`` for policies with ``needs_probe``: ``features(imgs)`` (one tensor per unit) with ``model`` in eval
    mode, so no dropout or drop path makes two probes of the same weights differ; the mode is restored after."""
    def probe() -> List[torch.Tensor]:
        was = model.training
        model.eval()
        try:
            return features(imgs)
        finally:
            model.train(was)
    return probe


@register_policy('adaptive')
class AdaptivePolicy(FreezePolicy):
    """Freezes unit i once its training has stalled, judged by a per-unit signal, instead of at a planned t_i.

    Every ``K = bounds.window`` steps after warm-up it measures a ``plasticity`` in [0, 1] for every unit still
    training. Signals:

    * ``coherence`` (default): the unit's *update coherence* over the window, ‖ΣΔ‖ / Σ‖Δ‖ = the net displacement of
      its weights over the window divided by the path they travelled (summed over ~8 segments of the window, see
      :func:`coherence_stride`). A unit still learning moves consistently (→ 1); one that only jitters around its
      minimum goes nowhere (→ 0). It is scale-free: an LR decay shrinks both terms alike, so the cosine's decay
      is not mistaken for convergence (AdamW moves every weight by ~LR per step, which made the raw rate below
      mostly a measure of the LR). Computed from the weights (bit-identical on every rank under DDP).
    * ``weight``: ``rate`` = ‖ΔW‖/‖W‖ over the window, ``plasticity = rate / its peak since warm-up`` (with
      ``per_lr`` divided by the base LR summed over the window). LR-dependent: under a cosine all units cross the
      threshold together.
    * ``output``: the same rate of the unit's output on the probe batch (Egeria-style); ``view.sync`` makes the
      numbers identical on every rank.

    A unit whose plasticity stays below ``threshold`` for ``patience`` evaluations is *decided*: its LR is
    multiplied by ½(1 + cos(π·(j − j_d)/tail)) for ``tail`` steps, then it freezes. With ``spacing`` > 0 at most one
    unit is decided per evaluation and the next decision waits ``spacing`` steps. Decisions follow prefix order,
    the last unit is never frozen, nothing freezes before ``earliest · T``, and no decision is taken whose freeze
    would fall at or after T. Every other unit follows the run's global schedule (``base_lr``, with its
    --lr_schedule shape); with no decision the run is plain training, number for number.
    """
    plans_ahead = False

    def __init__(self, args: Any, units: List[str], total_steps: int, warmup_steps: int,
                 bounds: Optional[AdaptiveBounds] = None):
        super().__init__(args, units, total_steps, warmup_steps)
        self.bounds = bounds or bounds_from_args(args, total_steps)
        self.signal = args.freeze_signal if args is not None else 'coherence'
        self.per_lr = bool(args.freeze_per_lr) if args is not None else False
        if self.signal not in SIGNALS:
            raise UserError(f"--freeze_signal {self.signal!r}: choose {' or '.join(SIGNALS)}")
        self.needs_probe = self.signal == 'output'
        self.earliest_step = math.ceil(round(self.bounds.earliest * self.total_steps, 6))
        n = len(self.units)
        self.peak: List[float] = [0.0] * n
        self.below: List[int] = [0] * n
        self.plasticity: Dict[str, float] = {}
        self.tails: Dict[int, List[int]] = {}           # decided, not yet frozen: unit -> [decision step, freeze step]
        self.decisions: List[Dict[str, Any]] = []       # every decision so far (also the saving's frozen history)
        self.snapshot: Dict[int, List[torch.Tensor]] = {}
        self.snapshot_step: Optional[int] = None
        # coherence: the weights at the last segment boundary and the path since the window started (device)
        self.stride = coherence_stride(self.bounds.window)
        self.prev: Dict[int, List[torch.Tensor]] = {}
        self.path: Dict[int, torch.Tensor] = {}

    @classmethod
    def add_args(cls, g) -> None:
        add_adaptive_args(g)

    def is_eval_step(self, step: int) -> bool:
        return step >= self.warmup_steps and (step - self.warmup_steps) % self.bounds.window == 0

    def _candidates(self, num_frozen: int) -> List[int]:
        """Units still measured: not frozen, not decided, not the last (never frozen)."""
        return [i for i in range(num_frozen, len(self.units) - 1) if i not in self.tails]

    def observe(self, step: int, view: UnitView) -> List[Dict[str, Any]]:
        for i in [i for i in self.tails if i < view.num_frozen]:
            del self.tails[i]
        for i in [i for i in self.snapshot if i < view.num_frozen]:
            del self.snapshot[i]
        if self.signal == 'coherence':
            return self._observe_coherence(step, view)
        if not self.is_eval_step(step) or step == self.snapshot_step:
            return []
        units = self._candidates(view.num_frozen)
        now = ({i: view.params(i) for i in units} if self.signal == 'weight'
               else {i: [t] for i, t in view.outputs(units).items()})
        prev, prev_step = self.snapshot, self.snapshot_step
        measured = [i for i in units if prev_step is not None and i in prev]
        events: List[Dict[str, Any]] = []
        if measured:
            # one device vector, one host read per evaluation: [delta_0, ref_0, delta_1, ref_1, ...]
            parts = []
            for i in measured:
                d = torch.stack([torch.linalg.vector_norm(a.float() - b.to(a.device).float())
                                 for a, b in zip(now[i], prev[i])])
                r = torch.stack([torch.linalg.vector_norm(b.float()) for b in prev[i]])
                parts += [d.pow(2).sum().sqrt(), r.pow(2).sum().sqrt()]
            vals = view.sync(torch.stack(parts)).tolist()
            lr_dist = sum(view.base_lr(j) for j in range(prev_step, step)) if self.per_lr else 1.0
            plast = {}
            for k, i in enumerate(measured):
                delta, ref = vals[2 * k], vals[2 * k + 1]
                rate = delta / max(ref, 1e-30) / lr_dist if lr_dist > 0 else 0.0
                self.peak[i] = max(self.peak[i], rate)
                plast[i] = rate / self.peak[i] if self.peak[i] > 0 else 0.0
            events += self._judge(step, plast)
        keep = self._candidates(view.num_frozen)
        self.snapshot = {i: [t.clone() for t in now[i]] for i in keep if i in now}
        self.snapshot_step = step
        return events

    def _judge(self, step: int, plast: Dict[int, float]) -> List[Dict[str, Any]]:
        """Count stalled evaluations per unit, log the signal, and decide (shared by every signal)."""
        for i, p in plast.items():
            self.below[i] = self.below[i] + 1 if p < self.bounds.threshold else 0
        self.plasticity = {self.units[i]: p for i, p in plast.items()}
        return [{'kind': 'signal', 'step': step, 'plasticity': dict(self.plasticity)}] + self._decide(step)

    def _observe_coherence(self, step: int, view: UnitView) -> List[Dict[str, Any]]:
        """Segment boundaries: add ‖W - W_prev‖ to each unit's path (device ops, no host read). Evaluation steps:
        one host read of [net_0, path_0, net_1, path_1, ...], coherence = net / path, a new window."""
        if step < self.warmup_steps or step == self.snapshot_step:
            return []
        evaluate = self.is_eval_step(step)
        if not evaluate and (step - self.warmup_steps) % self.stride:
            return []
        units = self._candidates(view.num_frozen)
        now = {i: view.params(i) for i in units}

        def dist(a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
            return torch.stack([torch.linalg.vector_norm(x.float() - y.to(x.device).float()) for x, y in zip(a, b)]
                               ).pow(2).sum().sqrt()
        for i in units:
            if i in self.prev:
                d = dist(now[i], self.prev[i])
                self.path[i] = self.path[i] + d if i in self.path else d
        events: List[Dict[str, Any]] = []
        if evaluate:
            measured = [i for i in units if i in self.snapshot and i in self.path]
            if measured:
                vals = view.sync(torch.stack([v for i in measured for v in (dist(now[i], self.snapshot[i]),
                                                                              self.path[i])])).tolist()
                plast = {}
                for k, i in enumerate(measured):
                    net, path = vals[2 * k], vals[2 * k + 1]
                    plast[i] = min(1.0, net / path) if path > 0 else 0.0
                    self.peak[i] = max(self.peak[i], plast[i])
                events += self._judge(step, plast)
            keep = self._candidates(view.num_frozen)
            self.snapshot = {i: [t.clone() for t in now[i]] for i in keep if i in now}
            self.snapshot_step = step
            self.path = {}
        keep = self._candidates(view.num_frozen)
        self.prev = {i: [t.clone() for t in now[i]] for i in keep if i in now}
        return events

    def _decide(self, step: int) -> List[Dict[str, Any]]:
        b = self.bounds
        if step + b.tail < self.earliest_step or step + b.tail >= self.total_steps:
            return []  # too early (the freeze would precede the earliest step), or it would never take effect
        if b.spacing and self.decisions and step < self.decisions[-1]['step'] + b.spacing:
            return []  # too soon after the last decision
        out = []
        i = len(self.decisions)   # decisions are a prefix: the next undecided unit
        while i < len(self.units) - 1 and self.below[i] >= b.patience and not (b.spacing and out):
            self.tails[i] = [step, step + b.tail]
            d = {'step': step, 'unit': self.units[i], 'index': i, 'freeze_step': step + b.tail,
                 'plasticity': self.plasticity.get(self.units[i], 0.0), 'threshold': b.threshold,
                 'patience': b.patience}
            self.decisions.append(d)
            out.append({'kind': 'decision', **d})
            i += 1
        return out

    def frozen_units(self, step: int) -> int:
        return sum(1 for d in self.decisions if step >= d['freeze_step'])

    def boundaries(self) -> List[int]:
        return sorted({d['freeze_step'] for d in self.decisions})

    def unit_lr(self, unit: int, step: int, base_lr: float) -> float:
        tail = self.tails.get(unit)
        if tail is None:
            return base_lr
        start, end = tail
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - start) / max(1, end - start)))

    def format_plan(self, freezer: 'FreezeOut', steps_per_epoch: int, flops: Optional[Dict[str, Any]]) -> str:
        return format_adaptive_plan(self, freezer, steps_per_epoch, flops)

    def epoch_record(self, start: int, end: int) -> Dict[str, Any]:
        return {'freeze_plasticity': dict(self.plasticity),
                'freeze_decisions': [d for d in self.decisions if start <= d['step'] < end]}

    def state_dict(self) -> Dict[str, Any]:
        return {'signal': self.signal, 'peak': list(self.peak), 'below': list(self.below),
                'plasticity': dict(self.plasticity), 'tails': {str(k): list(v) for k, v in self.tails.items()},
                'decisions': [dict(d) for d in self.decisions],
                'snapshot': {str(k): list(v) for k, v in self.snapshot.items()},
                'snapshot_step': self.snapshot_step, 'prev': {str(k): list(v) for k, v in self.prev.items()},
                'path': {str(k): v for k, v in self.path.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state and state.get('signal', self.signal) != self.signal:
            raise UserError(f"--resume: the checkpoint's adaptive policy used --freeze_signal {state['signal']}, "
                            f"this run asks for --freeze_signal {self.signal}; resume with it")
        n = len(self.units)
        self.peak = [float(x) for x in state.get('peak', [0.0] * n)]
        self.below = [int(x) for x in state.get('below', [0] * n)]
        self.plasticity = dict(state.get('plasticity', {}))
        self.tails = {int(k): [int(a) for a in v] for k, v in state.get('tails', {}).items()}
        self.decisions = [dict(d) for d in state.get('decisions', [])]
        # snapshots come back on the CPU; observe() compares them on the units' device
        self.snapshot = {int(k): list(v) for k, v in state.get('snapshot', {}).items()}
        self.snapshot_step = state.get('snapshot_step')
        self.prev = {int(k): list(v) for k, v in state.get('prev', {}).items()}
        self.path = {int(k): v for k, v in state.get('path', {}).items()}


def check_stage_weights(model: nn.Module, freezer: Any, total_steps: int, steps_per_epoch: int) -> None:
    """Refuse at plan time stage weights that leave every still-active stage at weight 0 once units froze.

    Freezing block b switches off the stages it feeds (``model.stage_blocks``); with ``--stage_weights 1,0,0,0``
    (or a curriculum that reaches 0) the remaining stages would train on a loss of exactly 0: nothing learns for
    the rest of the run, silently. Checked for every frozen count the run can reach: the schedule's own intervals,
    or (adaptive policy) every count from the policy's earliest freeze step on. The weights are linear in the step
    between the interval's ends, so a zero sum inside an interval shows at one of its ends.
    """
    schedule = getattr(model, 'stage_weight_schedule', None)
    if schedule is None:
        return
    total = int(total_steps)
    if freezer is None:
        spans = [(0, 0, total)]
    elif freezer.policy.plans_ahead:
        bounds = [0] + [b for b in freezer.state_boundaries() if 0 < b < total] + [total]
        spans = [(freezer.num_frozen_at(a), a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    else:  # a policy that decides while training: any prefix but the last unit may freeze, from its earliest step
        first = earliest_adaptive_freeze(freezer.policy) if isinstance(freezer.policy, AdaptivePolicy) else 0
        early = min(total, total if first is None else int(first))
        spans = [(0, 0, total)] + [(k, early, total) for k in range(1, len(freezer.sched_units))]
    pe = freezer is not None and freezer.dont_freeze_pe
    for k, a, b in spans:
        blocks = k if pe else max(0, k - 1)
        active = [i for i, blk in enumerate(model.stage_blocks) if blk >= blocks]
        if not active:
            continue  # the whole encoder is frozen: nothing is left to train
        for step in sorted({a, b - 1}):
            w = schedule.at(step / total, active)
            if sum(w[i] for i in active) > 0:
                continue
            spec = f'--stage_weights {schedule.start}' + (f' --stage_weights_end {schedule.end}'
                                                         if schedule.end is not None else '')
            when = (f'once the adaptive policy has frozen {k} units (possible from step {a})'
                    if freezer is not None and not freezer.policy.plans_ahead else
                    f'at optimizer step {step} (epoch {step / max(1, steps_per_epoch):.2f}, {k} units frozen)')
            raise UserError(f'{spec}: {when} only stages {active} are still active and their weights are all 0: the '
                            f'loss would be exactly 0 and nothing would train; give one of those stages a weight '
                            f'> 0, or freeze later')


def decided_saving(freezer: 'FreezeOut', flops: Dict[str, Any], done: int,
                   dont_freeze_pe: Optional[bool] = None) -> float:
    """FLOP-model saving over optimizer steps [0, done) for the frozen counts ``freezer.num_frozen_at`` gives
    (a schedule's plan, or an adaptive policy's decisions so far)."""
    pe = freezer.dont_freeze_pe if dont_freeze_pe is None else dont_freeze_pe
    bounds = [0] + [b for b in freezer.state_boundaries() if 0 < b < done] + [done]
    run = sum((hi - lo) * step_cost(flops, freezer.num_frozen_at(lo), pe) for lo, hi in zip(bounds[:-1], bounds[1:]))
    return 1.0 - run / (step_cost(flops, 0, pe) * done)


def earliest_adaptive_freeze(policy: 'AdaptivePolicy') -> Optional[int]:
    """The first step at which the adaptive policy can freeze anything under its bounds (None: never within T).

    The first snapshot is taken at W, the first measurement at W + K; ``patience`` stalled measurements are needed,
    so the first decision is at an evaluation step e >= W + patience·K with e + tail >= the earliest step, and its
    freeze (at e + tail) must fall before T."""
    b = policy.bounds
    e = policy.warmup_steps + b.patience * b.window
    if e + b.tail < policy.earliest_step:
        e += -(-(policy.earliest_step - b.tail - e) // b.window) * b.window
    return e + b.tail if e + b.tail < policy.total_steps else None


def format_adaptive_plan(policy: 'AdaptivePolicy', freezer: 'FreezeOut', steps_per_epoch: int,
                         flops: Optional[Dict[str, Any]] = None) -> str:
    """--plan_only for the adaptive policy: the policy, its bounds in steps and epochs, and the FLOP bound."""
    f, b = policy, policy.bounds
    spe = max(1, steps_per_epoch)
    evals = max(0, (f.total_steps - 1 - f.warmup_steps) // b.window + 1) if f.total_steps > f.warmup_steps else 0
    what = {'coherence': 'update coherence = net displacement / path of the weights over the window',
            'weight': f"{'change per unit LR' if f.per_lr else 'relative change'} of the weights over the window / "
                      f"its peak since warm-up",
            'output': f"{'change per unit LR' if f.per_lr else 'relative change'} of the output on the probe batch "
                      f"over the window / its peak since warm-up"}[f.signal]
    shape = getattr(f.args, 'lr_schedule', 'cosine') if f.args is not None else 'cosine'
    units = freezer.sched_units
    lines = [f'FreezeOut policy: adaptive, signal={f.signal} (plasticity = {what}), T={f.total_steps} optimizer '
             f'steps ({steps_per_epoch}/epoch), warm-up W={f.warmup_steps}',
             f'  earliest freeze: {b.earliest:g} of training = step {f.earliest_step} '
             f'(epoch {f.earliest_step / spe:.2f})',
             f'  window: every {b.window} steps ({b.window / spe:.2f} epochs) from step {f.warmup_steps}: {evals} '
             f'evaluations',
             f'  threshold: plasticity < {b.threshold:g} for {b.patience} consecutive evaluations',
             f'  tail: LR x 1/2(1 + cos) over {b.tail} steps ({b.tail / spe:.2f} epochs) before each freeze',
             '  spacing: ' + (f'one decision per evaluation, the next at least {b.spacing} steps later'
                               if b.spacing else 'a stalled prefix is decided at once'),
             f'  order: prefix ({", ".join(u.name for u in units[:-1])}); {units[-1].name} never '
             f'freezes' + ('; embed never freezes (--dont_freeze_pe)' if freezer.dont_freeze_pe else ''),
             f'  LR: the global warm-up + {shape} schedule for every unit (no per-unit t_i, so no 1/t_i scaling)']
    first = earliest_adaptive_freeze(f)
    if first is None:
        lines.append(f'  this plan can never freeze: the first possible decision (after warm-up, {b.patience} '
                     f'windows of {b.window} steps, the earliest step) plus the {b.tail}-step tail reaches T; '
                     f'lower --freeze_window/--freeze_patience/--freeze_tail/--freeze_earliest or train longer')
    else:
        lines.append(f'  first possible freeze: step {first} (epoch {first / spe:.2f})')
    if flops is not None:
        pe, T = freezer.dont_freeze_pe, f.total_steps
        # the fastest the bounds allow: unit j freezes at first + j * (spacing rounded up to the evaluation grid)
        gap = -(-b.spacing // b.window) * b.window if b.spacing else 0
        steps = [] if first is None else [s for s in (first + j * gap for j in range(len(units) - 1)) if s < T]
        bounds = [0] + steps + [T]
        run = sum((hi - lo) * step_cost(flops, k, pe) for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])))
        best = 1.0 - run / (step_cost(flops, 0, pe) * T)
        lines.append(f'FLOP model: at most {100 * best:.1f}% saving of training FLOPs (each unit but the last frozen '
                     f'as early as the bounds allow); the run logs the saving of its decisions so far')
    return '\n'.join(lines)


def format_decision(ev: Dict[str, Any], epoch: int) -> str:
    """The one log line of a policy's decision event."""
    if 'plasticity' in ev and 'threshold' in ev:
        return (f"FreezeOut adaptive: step {ev['step']} (epoch {epoch}): {ev['unit']} stalled (plasticity "
                f"{ev['plasticity']:.3f} < {ev['threshold']:g} for {ev['patience']} evaluations); its LR anneals to "
                f"0 and it freezes at step {ev['freeze_step']}")
    if 'text' in ev:  # a policy's own wording of its decision
        return f"FreezeOut {ev.get('policy', '')}: step {ev['step']} (epoch {epoch}): {ev['text']}"
    return (f"FreezeOut: step {ev['step']} (epoch {epoch}): {ev['unit']} decided" +
            (f"; it freezes at step {ev['freeze_step']}" if 'freeze_step' in ev else ''))


# ---------------------------------------------------------------------------------------------------------------------
# Flags, and the one function that turns them into a freezer (run_pretrain.py, run_finetune.py, tools, bench)

SCHEDULE_FLAGS = ('t_0', 'how_scale', 'not_scale_lr', 'non_layerwise_lr')
ADAPTIVE_FLAGS = ('freeze_signal', 'freeze_per_lr', 'freeze_earliest', 'freeze_window', 'freeze_threshold',
                  'freeze_patience', 'freeze_tail', 'freeze_spacing')


def add_schedule_args(g) -> None:
    """The schedule policy's flags."""
    g.add_argument('--freeze_schedule', default='vitfreeze', choices=list(FREEZE_SCHEDULES),
                   help="vitfreeze = ViTFreeze's code: every unit warms up to lr, a scaled unit jumps to lr/t_i at "
                        "the end of warm-up W, its cosine runs from W over t_i*(T-W) steps to 0 (ViTFreeze's unit "
                        "curves; a typed --min_lr replaces the 0) and it freezes at step W + t_i*(T-W), while the "
                        "global curve (--non_layerwise_lr, never-frozen units) ends at --min_lr; freezeout = the "
                        "FreezeOut paper's convention: warm-up to lr/t_i, cosine to --min_lr ending (and freezing) "
                        "at t_i*T (default: vitfreeze)",
                   defines_run=True)
    g.add_argument('--t_0', default=None, type=float,
                   help='freeze point of the first unit before scaling, in (0, 1]; 1 = never freeze (default when '
                        'FreezeOut is on: 0.8)', domain=real(0, 1, lo_open=True), defines_run=True)
    g.add_argument('--how_scale', default=None, choices=['linear', 'squared', 'cubic'],
                   help='t_i = s(t_0 + (1 - t_0) i / N) with s = identity/square/cube (default when on: cubic)',
                   defines_run=True)
    g.add_argument('--not_scale_lr', action='store_true',
                   help='initial LR of every unit = lr, instead of lr / t_i (default: scaled)', defines_run=True)
    g.add_argument('--non_layerwise_lr', action='store_true',
                   help='all units follow the global warm-up + cosine (or constant); each is still frozen at its '
                        'freeze step (default: off)', defines_run=True)


def add_adaptive_args(g, earliest: float = 0.5) -> None:
    """The adaptive policy's signal and bounds."""
    g.add_argument('--freeze_signal', default='coherence', choices=list(SIGNALS),
                   help='adaptive signal: coherence = net displacement of the unit\'s weights over the window / the '
                        'path they travelled (scale-free, so the LR decay is not read as convergence; no extra '
                        'forward, no communication); weight = relative change of the weights over the window / its '
                        'peak (LR-dependent); output = the same for its output on a fixed probe batch of 16 images '
                        '(one extra forward per window) (default: coherence)', defines_run=True)
    g.add_argument('--freeze_per_lr', action='store_true',
                   help='adaptive: divide the change by the LR summed over the window (how consistently a unit '
                        'moves, not how far); under a cosine LR this rarely stalls (default: off)', defines_run=True)
    g.add_argument('--freeze_earliest', default=earliest, type=float, metavar='FRAC',
                   help=f'adaptive: nothing freezes before this fraction of the optimizer steps, in [0, 1) '
                        f'(default: {earliest})', domain=real(0, 1, hi_open=True), defines_run=True)
    g.add_argument('--freeze_window', default=None, type=int, metavar='STEPS',
                   help='adaptive: evaluate the signal every STEPS optimizer steps, as the change over them '
                        '(default: 2%% of the run\'s steps, at least 1)', domain=integer(1), defines_run=True)
    g.add_argument('--freeze_threshold', default=0.5, type=float, metavar='P',
                   help='adaptive: a unit is stalled when its plasticity (change over the window / its peak since '
                        'warm-up) is below P, in (0, 1] (default: 0.5)',
                   domain=real(0, 1, lo_open=True), defines_run=True)
    g.add_argument('--freeze_patience', default=2, type=int, metavar='N',
                   help='adaptive: consecutive stalled evaluations before a unit is decided (default: 2)',
                   domain=integer(1), defines_run=True)
    g.add_argument('--freeze_tail', default=None, type=int, metavar='STEPS',
                   help='adaptive: optimizer steps over which a decided unit\'s LR anneals (half cosine to 0) '
                        'before it freezes (default: one window)', domain=integer(0), defines_run=True)
    g.add_argument('--freeze_spacing', default=None, type=int, metavar='STEPS',
                   help='adaptive: at most one unit decided per evaluation, and the next decision at least STEPS '
                        'optimizer steps later (0 = a stalled prefix is decided at once) (default: one window)',
                   domain=integer(0), defines_run=True)


def add_freeze_args(g, embed: str = 'patch embedding and cls token') -> None:
    """--freeze_policy, --dont_freeze_pe and every built-in policy's flags, in the argument group ``g``. A plugin
    policy's flags are added when it is named (util.plugins, at parse time)."""
    g.add_argument('--freeze_policy', default='schedule', type=str, metavar='NAME',
                   help=f"who decides what freezes when: {' | '.join(POLICIES)} (built in: schedule = FreezeOut, unit "
                        f"i freezes at t_i, --t_0/--how_scale; adaptive = a unit freezes once its plasticity signal "
                        f"has stalled, in prefix order, within the --freeze_* bounds; grad_norm = AutoFreeze, the "
                        f"prefix freezes up to the first unit whose accumulated-gradient-norm change is above a "
                        f"percentile, within the --grad_* bounds), or module:Class, a "
                        f"freezeout.FreezePolicy importable from PYTHONPATH (its flags then show in --help). Any "
                        f"policy but schedule turns freezing on by itself (default: schedule)", defines_run=True)
    g.add_argument('--dont_freeze_pe', action='store_true',
                   help=f'never freeze the {embed} (they follow the global schedule); blocks become units 0..N-1. '
                        f'Without it the cls token freezes with unit 0 (ViTFreeze never freezes it) (default: off)',
                   defines_run=True)
    for cls in POLICIES.values():
        cls.add_args(g)


def _plugin_policy_flags(parser, spec: str) -> None:
    if spec in POLICIES:
        return  # built-in flags are always declared
    cls = resolve_policy(spec)
    cls.add_args(parser.add_argument_group(f'freeze policy {spec}: {_first_line(cls.__doc__)}'))


def policy_flag_dests(cls: type) -> List[str]:
    """The flags a policy declares (they shape it: a resume with other values is refused), plus --dont_freeze_pe."""
    from util.args import ArgumentParser
    p = ArgumentParser(add_help=False)
    cls.add_args(p)
    return [a.dest for a in p._actions if a.option_strings] + ['dont_freeze_pe']


def resolve_freeze_args(args, argv: Sequence[str]) -> None:
    """``args.freezeout`` (on with --t_0/--how_scale or any --freeze_policy but schedule), the schedule's defaults
    (cubic, t_0 0.8), and one-line errors for bad or contradictory values."""
    from util.args import explicit_flags
    given = set(explicit_flags(argv))
    resolve_policy(args.freeze_policy)  # a bad name or module fails here, in one line
    schedule = args.freeze_policy == 'schedule'
    if not schedule:
        clash = [f'--{f}' for f in SCHEDULE_FLAGS if f in given]
        if clash:
            raise UserError(f"{'/'.join(clash)} shape the scheduled FreezeOut; with --freeze_policy "
                            f"{args.freeze_policy} there is no t_i: drop {'them' if len(clash) > 1 else 'it'} or use "
                            f"--freeze_policy schedule")
    for name, cls in POLICIES.items():  # another built-in policy's flags: say they do nothing here
        idle = [f'--{f}' for f in policy_flag_dests(cls)[:-1] if f in given] if name != 'schedule' else []
        if idle and name != args.freeze_policy:
            print(f"note: {'/'.join(idle)} only act with --freeze_policy {name}")
    args.freezeout = args.t_0 is not None or args.how_scale is not None or not schedule
    # floor of a freezing unit's own cosine: ViTFreeze's unit curves end at 0 (its global one at --min_lr), so the
    # vitfreeze default is 0; a typed --min_lr is the floor of every curve
    args.unit_min_lr = args.min_lr if ('min_lr' in given or args.freeze_schedule != 'vitfreeze') else 0.0
    if getattr(args, 'freezeout_weight_decay', None) is not None and not args.freezeout:
        print('note: --freezeout_weight_decay only acts with FreezeOut (--t_0/--how_scale/--freeze_policy)')
    if args.freezeout and schedule:
        args.t_0 = 0.8 if args.t_0 is None else args.t_0
        args.how_scale = args.how_scale or 'cubic'
        if not (0.0 < args.t_0 <= 1.0):
            raise UserError(f'--t_0 {args.t_0}: must be in (0, 1] (1 = never freeze)')
    elif not args.freezeout and (args.not_scale_lr or args.non_layerwise_lr or args.dont_freeze_pe):
        print('note: --not_scale_lr/--non_layerwise_lr/--dont_freeze_pe only act with FreezeOut (--t_0/--how_scale)')


def bounds_from_args(args, total_steps: int) -> AdaptiveBounds:
    window = args.freeze_window or auto_window(total_steps)
    return AdaptiveBounds(earliest=args.freeze_earliest, window=window, threshold=args.freeze_threshold,
                          patience=args.freeze_patience,
                          tail=window if args.freeze_tail is None else args.freeze_tail,
                          spacing=window if getattr(args, 'freeze_spacing', None) is None else args.freeze_spacing)


def build_freezer(args, model: nn.Module, schedule: Any,
                  make_probe: Optional[Callable[[], Callable[[], List[torch.Tensor]]]] = None,
                  sync: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> 'FreezeOut':
    """The freezer the flags ask for, over ``model``'s units (``args.freezeout`` must be set).

    ``schedule`` is the run's global LR schedule (``WarmupCosine``: its ``lr_at`` is every policy's base LR, its
    ``total_steps``/``warmup_steps`` are T and W). ``make_probe()`` builds the probe a ``needs_probe`` policy gets.
    """
    cls = resolve_policy(args.freeze_policy)
    names = FreezeOut.unit_names(model, args.dont_freeze_pe)
    policy = cls(args, names, schedule.total_steps, schedule.warmup_steps)
    probe = make_probe() if policy.needs_probe and make_probe is not None else None
    flags = {k: getattr(args, k) for k in policy_flag_dests(cls) if hasattr(args, k)}
    return FreezeOut(model, policy, args.dont_freeze_pe, schedule.lr_at, probe=probe, sync=sync, flags=flags)


def AdaptiveFreezeOut(model: nn.Module, total_steps: int, warmup_steps: int, base_lr: Callable[[int], float],
                      bounds: AdaptiveBounds, signal: str = 'weight',
                      probe: Optional[Callable[[], List[torch.Tensor]]] = None,
                      sync: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, dont_freeze_pe: bool = False,
                      per_lr: bool = False) -> 'FreezeOut':
    """A freezer with the adaptive policy, built without flags (tests, benches)."""
    import argparse
    args = argparse.Namespace(freeze_signal=signal, freeze_per_lr=per_lr)
    units = FreezeOut.unit_names(model, dont_freeze_pe)
    policy = AdaptivePolicy(args, units, total_steps, warmup_steps, bounds=bounds)
    return FreezeOut(model, policy, dont_freeze_pe, base_lr, probe=probe, sync=sync)


from util import plugins as _plugins  # noqa: E402  (the hook needs the registry above)
_plugins.register_plugin_flag('--freeze_policy', _plugin_policy_flags)
import freeze_grad_norm  # noqa: E402,F401  (registers --freeze_policy grad_norm)
