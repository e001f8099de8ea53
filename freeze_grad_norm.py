"""Gradient-signal adaptive freezing, ``--freeze_policy grad_norm`` (AutoFreeze, Liu et al. 2021; the freeze rule
PipeTransformer builds on, He et al. 2021): a unit freezes once its accumulated gradient norm stops changing faster
than most other units', in prefix order.

Signal. Every K = ``--grad_window`` optimizer steps from the end of warm-up W (evaluation steps W, W + K, ...), for
every unit i still measured, the accumulated gradient norm

    G_i = sqrt(sum_p ||exp_avg_p||^2) / (1 - beta1^t)       (p over the unit's parameters)

is read from the optimizer: AdamW's ``exp_avg`` is the exponential moving average of each parameter's gradients
(beta1 = 0.9 in both training scripts, an average over ~10 optimizer steps), ``t`` its step count (bias correction).
Its relative change since the previous evaluation,

    eta_i = |G_i - G_i'| / G_i'     (G_i' = G_i one window earlier; 0 when both are 0, inf when only G_i' is 0),

is the signal (``plasticity`` in the events, TensorBoard ``freezeout/plasticity``; ``freeze_grad_change`` in
log.txt). Why the optimizer state and no gradient hook: the engines call the freezer before each optimizer step's
forward, when the previous step's gradients are gone (``zero_grad(set_to_none=True)``); ``exp_avg`` already holds
them accumulated, unscaled (the AMP loss scaler unscales before the step; a skipped non-finite step does not touch
it), after the DDP all-reduce (identical on every rank), with no extra work per step. One norm per parameter and
one host read per evaluation (made identical on every rank with ``view.sync``); the policy's state is a few floats
per unit, and ``exp_avg`` itself is in the optimizer's checkpoint, so a resume is exact.

Decision. At an evaluation, with the units measured (not frozen, not decided; the last unit included) and tau =
the P-th percentile (``--grad_percentile``, linear interpolation) of their eta, the frozen prefix grows up to the
first undecided unit whose eta > tau: every undecided unit before it is decided together. A decided unit's LR is
multiplied by 1/2 (1 + cos(pi (j - j_d) / tail)) for ``--grad_tail`` steps, then it freezes. Bounds: the last unit
never freezes; nothing freezes before ``--grad_earliest`` * T; no decision whose freeze would fall at or after T;
two decisions are at least ``--grad_spacing`` steps apart. Every other unit follows the run's global schedule, so
a run without a decision is plain training, number for number.
"""
import math
from typing import Any, Dict, List, Optional

import torch

from freezeout import FreezePolicy, UnitView, register_policy, step_cost
from util.args import integer, real
from util.errors import UserError



def percentile(values: List[float], p: float) -> float:
    """The ``p``-th percentile (0..100) of ``values`` with linear interpolation between order statistics (numpy's
    default): position (n - 1) p / 100 in the sorted list."""
    v = sorted(values)
    pos = (len(v) - 1) * p / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    if v[lo] == v[hi]:  # also inf == inf, where the interpolation below would give nan
        return v[lo]
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def relative_change(now: float, prev: float) -> float:
    if prev > 0:
        return abs(now - prev) / prev
    return 0.0 if now == 0 else math.inf


def auto_window(total_steps: int) -> int:
    """Default K: 2% of the run (50 evaluations), at least 1 step."""
    return max(1, total_steps // 50)


@register_policy('grad_norm')
class GradNormPolicy(FreezePolicy):
    """AutoFreeze: the prefix freezes up to the first unit whose accumulated-gradient-norm change is above a
    percentile of all units' changes (see the module docstring)."""
    plans_ahead = False

    def __init__(self, args: Any, units: List[str], total_steps: int, warmup_steps: int):
        super().__init__(args, units, total_steps, warmup_steps)
        self.window = args.grad_window or auto_window(self.total_steps)
        self.percentile = float(args.grad_percentile)
        self.earliest = float(args.grad_earliest)
        self.tail = self.window if args.grad_tail is None else int(args.grad_tail)
        self.spacing = int(args.grad_spacing)
        for flag, ok, need in (('grad_window', self.window >= 1, '>= 1'),
                               ('grad_percentile', 0.0 <= self.percentile <= 100.0, 'in [0, 100]'),
                               ('grad_earliest', 0.0 <= self.earliest < 1.0, 'in [0, 1)'),
                               ('grad_tail', self.tail >= 0, '>= 0'), ('grad_spacing', self.spacing >= 0, '>= 0')):
            if not ok:
                raise UserError(f'--{flag} {getattr(args, flag)}: must be {need}')
        self.earliest_step = math.ceil(round(self.earliest * self.total_steps, 6))
        self.prev: Dict[int, float] = {}              # unit -> G at the previous evaluation
        self.prev_step: Optional[int] = None
        self.change: Dict[str, float] = {}            # unit name -> eta at the latest evaluation
        self.threshold: Optional[float] = None        # tau at the latest evaluation
        self.tails: Dict[int, List[int]] = {}         # decided, not yet frozen: unit -> [decision step, freeze step]
        self.decisions: List[Dict[str, Any]] = []     # every decision so far, in prefix order

    @classmethod
    def add_args(cls, g) -> None:
        g.add_argument('--grad_window', default=None, type=int, metavar='STEPS',
                       help="grad_norm: evaluate every STEPS optimizer steps from the end of warm-up: the relative "
                            "change of each unit's accumulated gradient norm (AdamW's bias-corrected exp_avg) since "
                            "the previous evaluation (default: 2%% of the run's steps, at least 1)", domain=integer(1))
        g.add_argument('--grad_percentile', default=50.0, type=float, metavar='P',
                       help='grad_norm: the prefix freezes up to the first unit whose change is above the P-th '
                            'percentile, in [0, 100], of the changes of all units still measured (AutoFreeze: the '
                            'median) (default: 50)', domain=real(0, 100))
        g.add_argument('--grad_earliest', default=0.5, type=float, metavar='FRAC',
                       help='grad_norm: nothing freezes before this fraction of the optimizer steps, in [0, 1) '
                            '(default: 0.5)', domain=real(0, 1, hi_open=True))
        g.add_argument('--grad_tail', default=None, type=int, metavar='STEPS',
                       help="grad_norm: optimizer steps over which a decided unit's LR anneals (half cosine to 0) "
                            'before it freezes (default: one window)', domain=integer(0))
        g.add_argument('--grad_spacing', default=0, type=int, metavar='STEPS',
                       help='grad_norm: at least STEPS optimizer steps between two decisions (one decision may '
                            'cover several units) (default: 0: any evaluation may decide)', domain=integer(0))

    # ---- the signal --------------------------------------------------------------------------------------------

    def is_eval_step(self, step: int) -> bool:
        return step >= self.warmup_steps and (step - self.warmup_steps) % self.window == 0

    def _measured(self, num_frozen: int) -> List[int]:
        """Units whose signal counts: not frozen, not decided (the last one included: it sets the percentile)."""
        return [i for i in range(num_frozen, len(self.units)) if i not in self.tails]

    @staticmethod
    def _grad_norm(view: UnitView, unit: int) -> Optional[torch.Tensor]:
        """G of ``unit`` as a 0-d device tensor (None before the optimizer's first update of it)."""
        sq = []
        for state, group in view.optimizer_state(unit):
            if not state:
                continue  # no gradient yet (AdamW skips a parameter whose grad is None)
            if 'exp_avg' not in state:
                raise UserError('--freeze_policy grad_norm reads the optimizer\'s exp_avg (AdamW/Adam); this '
                                f'optimizer keeps {sorted(state)} only')
            m = state['exp_avg']
            t = torch.as_tensor(state['step'], dtype=torch.float32).to(m.device)  # fused AdamW: already there
            corr = 1.0 - float(group['betas'][0]) ** t
            sq.append(torch.linalg.vector_norm(m.float()).div(corr).pow(2))
        return torch.stack(sq).sum().sqrt() if sq else None

    def observe(self, step: int, view: UnitView) -> List[Dict[str, Any]]:
        for i in [i for i in self.tails if i < view.num_frozen]:
            del self.tails[i]
        if not self.is_eval_step(step) or step == self.prev_step:
            return []
        units = self._measured(view.num_frozen)
        norms = {i: self._grad_norm(view, i) for i in units}
        have = [i for i in units if norms[i] is not None]
        if not have:
            return []
        vals = view.sync(torch.stack([norms[i] for i in have])).tolist()  # the one host read of the evaluation
        now = dict(zip(have, vals))
        events: List[Dict[str, Any]] = []
        measured = [i for i in have if i in self.prev]
        if measured:
            eta = {i: relative_change(now[i], self.prev[i]) for i in measured}
            self.change = {self.units[i]: eta[i] for i in measured}
            self.threshold = percentile(list(eta.values()), self.percentile)
            events.append({'kind': 'signal', 'step': step, 'plasticity': dict(self.change),
                           'threshold': self.threshold})
            events += self._decide(step, eta)
        self.prev = {i: v for i, v in now.items() if i not in self.tails}
        self.prev_step = step
        return events

    def _decide(self, step: int, eta: Dict[int, float]) -> List[Dict[str, Any]]:
        if step + self.tail < self.earliest_step or step + self.tail >= self.total_steps:
            return []  # too early (the freeze would precede the earliest step), or it would never take effect
        if self.decisions and step - self.decisions[-1]['step'] < self.spacing:
            return []
        out, tau = [], self.threshold
        i = len(self.decisions)  # decisions are a prefix: the next undecided unit
        while i < len(self.units) - 1 and i in eta and eta[i] <= tau:
            self.tails[i] = [step, step + self.tail]
            name = self.units[i]
            d = {'step': step, 'unit': name, 'index': i, 'freeze_step': step + self.tail,
                 'grad_change': eta[i], 'threshold': tau}
            self.decisions.append(d)
            out.append({'kind': 'decision', 'policy': self.name, **d,
                        'text': f'{name} settled (gradient-norm change {eta[i]:.4g} <= {tau:.4g}, the '
                                f'{self.percentile:g}th percentile of {len(eta)} units); its LR anneals to 0 and it '
                                f'freezes at step {step + self.tail}'})
            i += 1
        return out

    # ---- what the toolkit asks -----------------------------------------------------------------------------------

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

    def first_possible_freeze(self) -> Optional[int]:
        """The first step at which anything can freeze under the bounds (None: never within T). The first G needs
        an optimizer update before it (an evaluation at step >= 1), the first change a second evaluation."""
        e = self.warmup_steps if self.warmup_steps >= 1 else self.window
        e += self.window
        if e + self.tail < self.earliest_step:
            e += -(-(self.earliest_step - self.tail - e) // self.window) * self.window
        return e + self.tail if e + self.tail < self.total_steps else None

    def format_plan(self, freezer, steps_per_epoch: int, flops: Optional[Dict[str, Any]]) -> str:
        spe = max(1, steps_per_epoch)
        t, w, k = self.total_steps, self.warmup_steps, self.window
        evals = max(0, (t - 1 - w) // k + 1) if t > w else 0
        units = freezer.sched_units
        lines = [f'FreezeOut policy: grad_norm (AutoFreeze: signal = relative change of each unit\'s accumulated '
                 f'gradient norm, AdamW\'s bias-corrected exp_avg, over the window), T={t} optimizer steps '
                 f'({steps_per_epoch}/epoch), warm-up W={w}',
                 f'  earliest freeze: {self.earliest:g} of training = step {self.earliest_step} '
                 f'(epoch {self.earliest_step / spe:.2f})',
                 f'  window: every {k} steps ({k / spe:.2f} epochs) from step {w}: {evals} evaluations',
                 f'  threshold: the prefix freezes up to the first unit whose change is above the '
                 f'{self.percentile:g}th percentile of the measured units\' changes',
                 f'  tail: LR x 1/2(1 + cos) over {self.tail} steps ({self.tail / spe:.2f} epochs) before each freeze',
                 f'  spacing: decisions at least {self.spacing} steps apart',
                 f'  order: prefix ({", ".join(u.name for u in units[:-1])}); {units[-1].name} never freezes'
                 + ('; embed never freezes (--dont_freeze_pe)' if freezer.dont_freeze_pe else ''),
                 '  LR: the global schedule for every unit (no per-unit t_i, so no 1/t_i scaling)']
        first = self.first_possible_freeze()
        if first is None:
            lines.append(f'  this plan can never freeze: the first possible decision (after warm-up, two evaluations '
                         f'{k} steps apart, the earliest step) plus the {self.tail}-step tail reaches T; lower '
                         f'--grad_window/--grad_tail/--grad_earliest or train longer')
        else:
            lines.append(f'  first possible freeze: step {first} (epoch {first / spe:.2f})')
        if flops is not None:
            n = len(units) - 1
            c0, cn = step_cost(flops, 0, freezer.dont_freeze_pe), step_cost(flops, n, freezer.dont_freeze_pe)
            best = 0.0 if first is None else 1.0 - (first * c0 + (t - first) * cn) / (c0 * t)
            lines.append(f'FLOP model: at most {100 * best:.1f}% saving of training FLOPs (every unit but the last '
                         f'frozen at the first possible step); the run logs the saving of its decisions so far')
        return '\n'.join(lines)

    def epoch_record(self, start: int, end: int) -> Dict[str, Any]:
        return {'freeze_grad_change': dict(self.change), 'freeze_grad_threshold': self.threshold,
                'freeze_decisions': [d for d in self.decisions if start <= d['step'] < end]}

    def state_dict(self) -> Dict[str, Any]:
        return {'prev': {str(k): v for k, v in self.prev.items()}, 'prev_step': self.prev_step,
                'change': dict(self.change), 'threshold': self.threshold,
                'tails': {str(k): list(v) for k, v in self.tails.items()},
                'decisions': [dict(d) for d in self.decisions]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.prev = {int(k): float(v) for k, v in state.get('prev', {}).items()}
        self.prev_step = state.get('prev_step')
        self.change = dict(state.get('change', {}))
        self.threshold = state.get('threshold')
        self.tails = {int(k): [int(a) for a in v] for k, v in state.get('tails', {}).items()}
        self.decisions = [dict(d) for d in state.get('decisions', [])]
