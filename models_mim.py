"""LocalMIM for ViT on timm 1.0: encoder, per-stage decoders, reconstruction targets, loss, FreezeOut units.

Data flow of one forward pass (B images of H×W, patch p, grid g = H/p, L = g² tokens):

    imgs [B,3,H,W] -> targets (``targets.py``; default HOG, fp32), no grad, only for ACTIVE stages
                   -> patch embed + fixed sin-cos pos -> random mask (keep L·(1-r)) -> [cls | visible]
                   -> blocks; after each tap block b (stage k): stage norm k -> latent_k [B,1+keep,D]
                   -> decoder k (embed 256, mask tokens, unshuffle, 1 block, norm, scale head) -> [B,(g·s_k)²,dim_k]
                   -> masked-mean MSE per stage (mask resampled to g·s_k) -> total = Σ_k w_k · loss_k

Differences from the reference code (all deliberate, see ``docs/``): ``img_size``/``patch_size`` reach the model;
HOG cells are ``patch / scale`` (integer, checked) instead of hard-coded 4/8/16/32 px; ViT-H/14 uses scales
(2, 2, 1, 0.5) because 14/4 = 3.5 px cells do not exist; the HOG pass is shared by all stages; the forward returns
per-stage losses too; and a FreezeOut-frozen prefix runs under ``no_grad`` with the stages it feeds switched off.
The target is a plugin (``targets.Target``): the model describes each stage by a ``targets.Stage`` and sizes each
decoder's head by ``target.dim(stage)``.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

import targets as targets_lib
from targets import HOGTargets, Stage, Target  # noqa: F401 - HOGTargets re-exported (it lived here)
from masking import BlockMaskCurriculum, order_to_mask, shuffle_to_mask
from prefix_cache import lookup as cache_lookup, store as cache_store
from prefix_target import PrefixTarget, decode_with_prefix
from util.errors import UserError
from util.pos_embed import sincos_2d_tensor

__all__ = ['HOGTargets', 'Stage', 'Target', 'LocalMIM', 'ParamUnit', 'stage_layout', 'parse_stage_weights', 'stage_weights_for',
           'StageWeightSchedule', 'LayerDrop', 'parse_stage_taps', 'check_stage_taps', 'parse_stage_scales',
           'check_stage_scales', 'create_model',
           'MODEL_NAMES']

# ---------------------------------------------------------------------------------------------------------------------
# Stage layout


def default_taps(depth: int) -> List[int]:
    """0-based blocks feeding the four stages: [1, 3, depth-3, depth-1] (LocalMIM)."""
    if depth < 4:
        raise UserError(f'LocalMIM needs at least 4 encoder blocks, got depth {depth}')
    return [1, 3, depth - 3, depth - 1]


STAGE_TAPS_HELP = ("encoder blocks feeding a stage decoder, 1-based, shallow to deep: 'all' (every block; as "
                   "--all_stages) or a strictly increasing comma list ending at the last block, e.g. 2,4,6,8,10,12 "
                   "for depth 12. Scales by the rule of models_mim.stage_layout unless --stage_scales: a tap gets "
                   "the scale of the deepest LocalMIM default tap (blocks 2, 4, depth-2, depth: scales 4, 2, 1, "
                   "0.5) at or before it, a tap before block 2 (i.e. block 1) twice block 2's scale where that is a "
                   "whole-pixel cell")


def parse_stage_taps(spec: Union[str, Sequence[int], None], depth: int) -> Optional[List[int]]:
    """``--stage_taps`` -> 0-based feeding blocks (None: the LocalMIM default taps). ``'all'``: every block; else
    1-based block indices, strictly increasing, within 1..depth and ending at ``depth`` (blocks after the deepest
    tap would get no gradient, and the evaluated encoder's final norm is the deepest stage's norm)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec.strip() == 'all':
            return list(range(depth))
        msg = check_stage_taps('--stage_taps', spec)
        if msg:
            raise UserError(msg)
        taps = [int(x) for x in spec.split(',') if x.strip()]
    else:
        taps = [int(x) for x in spec]
    if not taps or any(b < 1 or b > depth for b in taps) or taps != sorted(set(taps)):
        raise UserError(f"--stage_taps {','.join(map(str, taps))}: blocks must be strictly increasing within "
                        f'1..{depth} (the depth)')
    if taps[-1] != depth:
        raise UserError(f"--stage_taps {','.join(map(str, taps))}: the deepest tap must be the last block, {depth}: "
                        f"blocks after it would get no gradient and the evaluated encoder's final norm is the "
                        f'deepest stage\'s')
    return [b - 1 for b in taps]


def check_stage_taps(flag: str, value: str) -> Optional[str]:
    """The string domain of --stage_taps (util.args.domain_errors): 'all' or a strictly increasing comma list of
    1-based block indices (the depth is checked when the model is built)."""
    if value.strip() == 'all':
        return None
    try:
        taps = [int(x) for x in value.split(',') if x.strip()]
    except ValueError:
        return f"{flag} {value!r}: must be 'all' or a comma list of 1-based block indices, e.g. 2,4,10,12"
    if not taps or taps[0] < 1 or any(a >= b for a, b in zip(taps, taps[1:])):
        return f'{flag} {value!r}: block indices must be >= 1 and strictly increasing'
    return None


def _scale_ok(s: float) -> bool:
    return s == 0.5 or (s >= 1 and math.log2(s) == int(math.log2(s)))


def check_stage_scales(flag: str, value: str) -> Optional[str]:
    """The string domain of --stage_scales: a comma list of decoder scales, each 0.5 or a power of two >= 1 (the
    count is checked against the taps when the model is built)."""
    try:
        sc = [float(x) for x in value.split(',') if x.strip()]
    except ValueError:
        return f'{flag} {value!r}: must be a comma list of scales (0.5 or powers of two >= 1), e.g. 4,2,1,0.5'
    if not sc or not all(math.isfinite(s) and _scale_ok(s) for s in sc):
        return f'{flag} {value!r}: every scale must be 0.5 or a power of two >= 1 (1, 2, 4, ...)'
    return None


def parse_stage_scales(spec: Union[str, Sequence[float], None], num_taps: int) -> Optional[List[float]]:
    """``--stage_scales`` -> one scale per tap (None: by the rule of :func:`stage_layout`)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        msg = check_stage_scales('--stage_scales', spec)
        if msg:
            raise UserError(msg)
        spec = [float(x) for x in spec.split(',') if x.strip()]
    sc = [float(x) for x in spec]
    if len(sc) != num_taps:
        raise UserError(f"--stage_scales {','.join(f'{s:g}' for s in sc)}: {len(sc)} scales for {num_taps} stage "
                        f'taps; give one per tap (shallow to deep)')
    return sc


def stage_layout(depth: int, patch_size: int, base_scales: Sequence[float] = (4, 2, 1, 0.5),
                 all_stages: bool = False, taps: Optional[Sequence[int]] = None,
                 tap_scales: Optional[Sequence[float]] = None) -> List[Tuple[int, float]]:
    """``[(feeding_block, scale), ...]`` per stage, shallow to deep (blocks 0-based).

    Default: the four LocalMIM taps with ``base_scales``. ``taps`` (0-based, e.g. from :func:`parse_stage_taps`) or
    ``all_stages`` (every block): block b gets ``tap_scales`` if given, else the scale of the last default tap at
    or before b, and blocks before the first default tap get twice the first tap's scale (if that gives an integer
    HOG cell, else the first tap's scale). For depth 12 and every block this is exactly the seed's table
    8,4,4,2,2,2,2,2,2,1,1,0.5. With depth < 7 the default taps repeat a block (e.g. depth 4: [1,3,1,3]); each
    stage still has its own norm and decoder.
    """
    default = default_taps(depth)
    if taps is None and not all_stages:
        if tap_scales is not None:
            return list(zip(default, parse_stage_scales(tap_scales, len(default))))
        return list(zip(default, [float(s) for s in base_scales]))
    taps = list(range(depth)) if taps is None else list(taps)
    if tap_scales is not None:
        return list(zip(taps, parse_stage_scales(tap_scales, len(taps))))
    layout = []
    for b in taps:
        before = [i for i, t in enumerate(default) if t <= b]
        if before:
            s = float(base_scales[max(before, key=lambda i: (default[i], -i))])
        else:
            s = 2.0 * base_scales[0]
            if (patch_size / s) != int(patch_size / s):
                s = float(base_scales[0])
        layout.append((b, s))
    return layout


def cell_size(patch_size: int, scale: float) -> int:
    c = patch_size / scale
    if c != int(c) or c < 1:
        raise UserError(f'HOG cell of patch_size/scale = {patch_size}/{scale:g} = {c:g} px is not a whole number of '
                        f'pixels; choose --patch_size divisible by {scale:g} (or other --stage_taps/--stage_scales)')
    return int(c)


STAGE_WEIGHT_PRESETS = ('equal', '4321', 'cum4321', '1overk', 'inv4321')
STAGE_WEIGHTS_HELP = ("'equal' (paper: 1 each); '4321', 'cum4321' and '1overk' as ViTFreeze's weighted runs computed "
                      "them, over the stages still active: the k-th active stage (k = 0 shallowest) gets S_active - k "
                      "('4321', its late-January runs), (S_active - k)! ('cum4321': 24, 6, 2, 1, its mid-January "
                      "in-loop edit that multiplied the running sum by S_active - k) or 1/(k+1) ('1overk'), so the "
                      "weights shift when freezing switches a stage off; 'inv4321': fixed 1/S, .., 1/2, 1 "
                      "shallow->deep; or a comma list of S numbers, fixed per stage")


def _parse_spec(spec: Union[str, Sequence[float], None], num_stages: int,
                flag: str = '--stage_weights') -> Union[str, List[float]]:
    """A validated preset name or list of ``num_stages`` weights."""
    if spec is None:
        return 'equal'
    if isinstance(spec, str):
        if spec in STAGE_WEIGHT_PRESETS:
            return spec
        try:
            w = [float(x) for x in spec.split(',') if x.strip()]
        except ValueError:
            raise UserError(f"{flag} {spec!r}: use {', '.join(repr(p) for p in STAGE_WEIGHT_PRESETS)} or "
                            f'a comma list of {num_stages} numbers') from None
    else:
        w = [float(x) for x in spec]
    if len(w) != num_stages:
        raise UserError(f'{flag}: got {len(w)} weights for {num_stages} stages; give exactly {num_stages}')
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise UserError(f'{flag} {spec!r}: weights must be finite and >= 0')
    return w


def check_stage_weights(flag: str, value: str) -> Optional[str]:
    """The string domain of --stage_weights/--stage_weights_end (util.args.domain_errors): a preset of
    STAGE_WEIGHT_PRESETS or a comma list of finite weights >= 0, not all 0."""
    if value in STAGE_WEIGHT_PRESETS:
        return None
    try:
        w = [float(x) for x in value.split(',') if x.strip()]
    except ValueError:
        return f"{flag} {value!r}: must be {', '.join(STAGE_WEIGHT_PRESETS)} or a comma list of numbers"
    if not w or any(not math.isfinite(x) or x < 0 for x in w) or not any(x > 0 for x in w):
        return f"{flag} {value!r}: weights must be finite and >= 0, and not all 0"
    return None


def stage_weights_for(spec: Union[str, Sequence[float], None], num_stages: int,
                      active: Optional[Sequence[int]] = None) -> List[float]:
    """Loss weight of every stage (0 for inactive ones) given the ``active`` stages (default: all).

    ``4321``/``cum4321``/``1overk`` rank the active stages (ViTFreeze's edits of the loss, whose stage list shrank as
    stages were switched off): rank r of S_a active stages gets S_a - r, (S_a - r)!, resp. 1/(r + 1). ``cum4321`` is
    what ViTFreeze's mid-January loop ``loss += L_r; loss *= S_a - r`` computed: every earlier term is multiplied by
    every later factor, so the weights are the cumulative products 24, 6, 2, 1 of 4, 3, 2, 1 (S_a = 4). ``inv4321``
    and comma lists are fixed per stage index.
    """
    p = _parse_spec(spec, num_stages)
    active = list(range(num_stages)) if active is None else sorted(active)
    out = [0.0] * num_stages
    for r, k in enumerate(active):
        if isinstance(p, list):
            out[k] = p[k]
        elif p == 'equal':
            out[k] = 1.0
        elif p == '4321':
            out[k] = float(len(active) - r)
        elif p == 'cum4321':
            out[k] = float(math.factorial(len(active) - r))
        elif p == '1overk':
            out[k] = 1.0 / (r + 1)
        else:  # inv4321
            out[k] = 1.0 / (num_stages - k)
    return out


def parse_stage_weights(spec: Union[str, Sequence[float], None], num_stages: int) -> List[float]:
    """Weights with every stage active (see :func:`stage_weights_for`); validates ``spec``."""
    return stage_weights_for(spec, num_stages)


class StageWeightSchedule:
    """Stage-loss weights at a point of training: ``--stage_weights W0`` and optionally ``--stage_weights_end W1``.

    At training progress p = step / T the weight of stage k is ``W0_k + (W1_k - W0_k) · p``, both ends evaluated
    over the currently active stages (presets shift when a stage switches off); without ``W1`` it is ``W0_k``.
    """

    def __init__(self, start: Union[str, Sequence[float], None], end: Union[str, Sequence[float], None],
                 num_stages: int):
        self.start, self.end, self.num_stages = start, end, num_stages
        _parse_spec(start, num_stages)
        if end is not None:
            _parse_spec(end, num_stages, '--stage_weights_end')

    @property
    def varies(self) -> bool:
        """True when the weights change with the step (a curriculum), not only with the active set."""
        return self.end is not None

    def at(self, progress: float, active: Optional[Sequence[int]] = None) -> List[float]:
        w0 = stage_weights_for(self.start, self.num_stages, active)
        if self.end is None:
            return w0
        w1 = stage_weights_for(self.end, self.num_stages, active)
        return [a + (b - a) * progress for a, b in zip(w0, w1)]


class LayerDrop:
    """Progressive layer dropping (Zhang & He 2020, PLD): the keep probability of the whole network falls over
    training, ``theta(t) = (1 - theta_bar) · exp(-gamma · t) + theta_bar`` with t = step / T in [0, 1] (``gamma``
    in units of 1/T: the paper's gamma = 100/T per step is 100 here), and over depth: block l (1-based, of L) is
    kept with ``p_l = 1 - l / L · (1 - theta(t))``.

    One decision per block per optimizer step (its accumulated micro-batches share it, so a step's gradient is
    that of one sub-network), drawn by :meth:`set_step` from a CPU generator seeded by (seed, step): no device
    RNG, no host sync, the same on every rank, and a resumed run draws exactly the decisions it would have.
    ``plan[b]``: 0.0 = dropped (the block is not run), else the factor 1/p_b of a kept block's residual branch
    (1.0 exactly when p_b = 1). Blocks of the FreezeOut-frozen prefix are never dropped: they cost no backward
    (dropping one saves only its forward), and skipping a frozen block changes the features the trained blocks
    above it see and have learnt from, with nothing left to adapt to it.
    """

    def __init__(self, theta_bar: float, gamma: float, depth: int, seed: int = 0):
        if not 0.0 < theta_bar <= 1.0 or not (math.isfinite(gamma) and gamma >= 0):
            raise UserError(f'--layer_drop {theta_bar:g} / --layer_drop_gamma {gamma:g}: need 0 < theta_bar <= 1 '
                            f'and gamma >= 0')
        self.theta_bar, self.gamma, self.depth, self.seed = float(theta_bar), float(gamma), depth, int(seed)
        self.progress, self.step = 0.0, None
        self.plan: List[float] = [1.0] * depth  # before the first set_step (t = 0): theta = 1, nothing dropped
        self.kept_steps, self.block_steps = 0, 0
        # the FLOP model's expected saving of the whole run (set once the plan is known: run_pretrain's plan);
        # logged so that reports read the saving of a dropping run from its log, like FreezeOut's
        self.expected_saving_total: Optional[float] = None

    def theta(self, progress: float) -> float:
        return (1.0 - self.theta_bar) * math.exp(-self.gamma * progress) + self.theta_bar

    def keep_probs(self, progress: float) -> List[float]:
        """p_l of every block (0-based b = l - 1) at training progress ``progress``."""
        th = self.theta(progress)
        return [1.0 - (b + 1) / self.depth * (1.0 - th) for b in range(self.depth)]

    def decisions(self, progress: float, step: int, num_frozen_blocks: int = 0) -> List[float]:
        """``plan`` of optimizer step ``step`` (see the class doc); a pure function of (seed, step, progress)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        u = torch.rand(self.depth, generator=g, dtype=torch.float64).tolist()
        out = []
        for b, p in enumerate(self.keep_probs(progress)):
            if b < num_frozen_blocks or p >= 1.0:
                out.append(1.0)
            else:
                out.append(1.0 / p if u[b] < p else 0.0)
        return out

    def set_step(self, progress: float, step: int, num_frozen_blocks: int = 0) -> None:
        self.progress, self.step = float(progress), int(step)
        self.plan = self.decisions(progress, step, num_frozen_blocks)
        trainable = self.plan[num_frozen_blocks:]
        self.kept_steps += sum(1 for f in trainable if f > 0)
        self.block_steps += len(trainable)

    def record(self) -> Dict[str, float]:
        """Per-epoch log: theta(t) now, the deepest block's keep probability, and the share of trainable blocks
        run over the steps since the last record (this process's count; resets)."""
        out = {'layer_drop_theta': self.theta(self.progress), 'layer_drop_keep_last': self.keep_probs(self.progress)[-1]}
        if self.block_steps:
            out['layer_drop_kept_share'] = self.kept_steps / self.block_steps
        if self.expected_saving_total is not None:
            out['layer_drop_expected_saving'] = self.expected_saving_total
        self.kept_steps, self.block_steps = 0, 0
        return out

    def expected_saving(self, flops: Dict[str, Any], total_steps: int, frozen_blocks_at: Callable[[int], int],
                        boundaries: Sequence[int] = (), base_cost: Optional[Callable[[int], float]] = None) -> float:
        """FLOP-model saving of dropping over steps [0, T): sum over steps of sum over trainable blocks b of
        (1 - p_b(t)) · 3 · (block b's encoder forward), divided by the run's cost without dropping (``base_cost(step)``
        per step, default the sum of all units' and shared forward x3). ``frozen_blocks_at(step)`` gives the
        FreezeOut prefix (constant between ``boundaries``). Exact: 1 - p_b(t) = b/L · (1 - theta_bar) · (1 -
        exp(-gamma · t / T)) is summed over each interval as a geometric series."""
        T = max(1, int(total_steps))
        enc = flops.get('unit_enc_fwd', flops['unit_fwd'])[1:1 + self.depth]  # unit 0 is the embedding
        a = self.gamma / T

        def s_one_minus_exp(lo: int, hi: int) -> float:  # sum_{t=lo}^{hi-1} (1 - e^{-a t})
            n = hi - lo
            if a == 0:
                return 0.0
            return n - math.exp(-a * lo) * (-math.expm1(-a * n)) / (-math.expm1(-a))

        bounds = [0] + sorted({int(b) for b in boundaries if 0 < b < T}) + [T]
        saved = run = 0.0
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            k = frozen_blocks_at(lo)
            w = sum((b + 1) / self.depth * enc[b] for b in range(k, self.depth))
            saved += 3.0 * (1.0 - self.theta_bar) * w * s_one_minus_exp(lo, hi)
            run += (hi - lo) * (base_cost(lo) if base_cost is not None
                                else flops['shared_fwd'] + 3.0 * sum(flops['unit_fwd'])
                                + sum(f for _, f in flops.get('nograd_fwd', ())))
        return saved / run if run else 0.0

    def describe(self) -> str:
        th = [self.theta(p) for p in (0.0, 0.1, 0.5, 1.0)]
        return (f'layer drop (PLD): theta_bar={self.theta_bar:g}, gamma={self.gamma:g}/T; theta at 0/10/50/100% of '
                f"training: {', '.join(f'{t:.3f}' for t in th)}; deepest block kept with p = theta at the end; "
                f'frozen blocks never dropped')


# ---------------------------------------------------------------------------------------------------------------------
# Decoder


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of [B,C,H,W] maps (ConvNeXt style, as in the reference's scale-4 head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


def scale_head(in_dim: int, out_dim: int, scale: float) -> nn.Sequential:
    """[B,in,g,g] -> [B,out,g·s,g·s]. s = 2^k: k stride-2 deconvs halving channels, LN2d+GELU between them, then a
    1×1 conv (s=4 and s=2 are the reference's heads); s = 1: 1×1 conv; s = 0.5: 2×2 average pool + 1×1 conv."""
    if scale == 0.5:
        return nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(in_dim, out_dim, 1))
    k = math.log2(scale) if scale >= 1 else -1
    if scale < 1 or k != int(k):
        raise UserError(f'decoder scale {scale:g} is not supported (use 0.5 or a power of two >= 1)')
    layers: List[nn.Module] = []
    dim = in_dim
    for i in range(int(k)):
        layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        dim //= 2
        if i < int(k) - 1:
            layers += [LayerNorm2d(dim, eps=1e-6), nn.GELU()]
    layers.append(nn.Conv2d(dim, out_dim, 1))
    return nn.Sequential(*layers)


def block_rows(blk: Block, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``blk(x)`` at the sequence positions ``rows`` [B, M] only: [B, N, D] -> [B, M, D].

    Every token still supplies keys and values; the query projection, attention rows, output projection, MLP and
    residuals run on the M selected tokens. Row r of a transformer block depends on the other rows only through
    K and V, so this equals ``blk(x).gather(rows)`` up to float reassociation (the GEMMs see other row blocks).
    Mirrors timm's ``Block``/``Attention`` forward (qk-norm, scale-norm, gate, layer scale, drop-path included).
    """
    a = blk.attn
    b, n, d = x.shape
    m = rows.shape[1]
    h = blk.norm1(x)
    take = rows.unsqueeze(-1).expand(-1, -1, d)
    x_r, h_r = torch.gather(x, 1, take), torch.gather(h, 1, take)
    dim = a.attn_dim
    w, bias = a.qkv.weight, a.qkv.bias
    q = F.linear(h_r, w[:dim], None if bias is None else bias[:dim])
    kv = F.linear(h, w[dim:], None if bias is None else bias[dim:])
    q = q.view(b, m, a.num_heads, a.head_dim).transpose(1, 2)
    k, v = kv.view(b, n, 2, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    if a.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if a.training else 0.)
    else:
        att = (q * a.scale) @ k.transpose(-2, -1)
        o = a.attn_drop(att.softmax(dim=-1)) @ v
    o = a.norm(o.transpose(1, 2).reshape(b, m, dim))
    if getattr(a, 'gate', None) is not None:
        o = o * a.gate(h_r).sigmoid()
    x_r = x_r + blk.drop_path1(blk.ls1(a.proj_drop(a.proj(o))))
    return x_r + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x_r))))


def head_per_token(head: nn.Sequential, x: torch.Tensor, scale: int) -> torch.Tensor:
    """A scale >= 1 :func:`scale_head` applied to tokens one by one: [N, D] -> [N, s·s, out].

    The heads only use 2×2-stride-2 transposed convs (each input pixel owns its own 2×2 output block), per-pixel
    LayerNorm/GELU and 1×1 convs, so every token's s×s output cells depend on that token alone. Computed
    channel-last with the same weights as ``head`` (GEMMs instead of convs: equal up to float reassociation).
    Cells come out row-major within the token's s×s block.
    """
    y = x[:, None, None, :]  # [N, h, w, C], channel-last
    for mod in head:
        if isinstance(mod, nn.ConvTranspose2d):
            n, hh, ww, _ = y.shape
            co = mod.out_channels
            wt = mod.weight.permute(2, 3, 1, 0).reshape(4 * co, -1)  # rows (i, j, c_out)
            y = F.linear(y, wt, None if mod.bias is None else mod.bias.repeat(4))
            y = y.view(n, hh, ww, 2, 2, co).permute(0, 1, 3, 2, 4, 5).reshape(n, 2 * hh, 2 * ww, co)
        elif isinstance(mod, LayerNorm2d):
            y = F.layer_norm(y, mod.normalized_shape, mod.weight, mod.bias, mod.eps)
        elif isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1):
            y = F.linear(y, mod.weight.flatten(1), mod.bias)
        elif isinstance(mod, nn.GELU):
            y = mod(y)
        else:
            raise TypeError(f'head_per_token: {type(mod).__name__} is not a per-token layer')
    return y.reshape(y.shape[0], scale * scale, y.shape[-1])


class StageDecoder(nn.Module):
    """One LocalMIM decoder: latent [B,1+keep,D] + ids_restore [B,L] -> prediction.

    ``forward(x, ids_restore)``: every cell, [B,(g·s)², out_dim] (visualisation, reference semantics).
    ``forward(x, ids_restore, rows)`` with ``rows`` [B,M] = masked token positions (scale >= 1 only): the cells of
    those tokens only, [B, M, s·s, out_dim] (token-major, row-major inside each token's s×s block). The last
    decoder block runs its per-token part on those rows only (:func:`block_rows`) and the head per token
    (:func:`head_per_token`); visible tokens and the cls token still provide keys and values.
    """

    def __init__(self, in_dim: int, grid: int, out_dim: int, scale: float, embed_dim: int = 256, depth: int = 1,
                 num_heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        self.grid, self.scale = grid, scale
        self.embed = nn.Linear(in_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d_tensor(embed_dim, grid, cls_token=True), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True,
                                           norm_layer=_ln) for _ in range(depth)])
        self.norm = _ln(embed_dim)
        self.pred = scale_head(embed_dim, out_dim, scale)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.embed, self.blocks, self.norm]:
            m.apply(_init_linear_ln)

    @property
    def per_token(self) -> bool:
        """True when the head is per token (scale >= 1), i.e. the masked-only path applies."""
        return self.scale >= 1

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor, rows: Optional[torch.Tensor] = None,
                return_tokens: bool = False, out: str = 'pred') -> Any:
        """``out``: 'pred' (the prediction), 'hidden' (the normed decoder tokens the head reads: [B, M, E] at
        ``rows``, else [B, L, E]) or 'both' (``(pred, hidden)``); the prefix target (prefix_target.py) reads the
        hidden tokens with its own head. ``return_tokens``: the same as ``out='both'`` (self-distillation's student
        features)."""
        if return_tokens:
            out = 'both'
        x = self.embed(x)
        b, n_vis, d = x.shape
        n_mask = ids_restore.shape[1] + 1 - n_vis
        patches = torch.cat([x[:, 1:], self.mask_token.expand(b, n_mask, d)], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        if rows is not None:
            for blk in self.blocks[:-1]:
                x = blk(x)
            h = self.norm(block_rows(self.blocks[-1], x, rows + 1))  # +1: position 0 is the cls token
            if out == 'hidden':
                return h
            pred = head_per_token(self.pred, h.flatten(0, 1), int(self.scale)).unflatten(0, (b, rows.shape[1]))
            return (pred, h) if out == 'both' else pred
        for blk in self.blocks:
            x = blk(x)
        h = self.norm(x)[:, 1:]
        if out == 'hidden':
            return h
        pred = self.pred(h.transpose(1, 2).reshape(b, d, self.grid, self.grid)).flatten(2).transpose(1, 2)
        return (pred, h) if out == 'both' else pred


_ln = partial(nn.LayerNorm, eps=1e-6)


def _init_linear_ln(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class ParamUnit:
    """An ordered FreezeOut unit: a name and its trainable parameters (by state-dict name)."""
    name: str
    params: Dict[str, nn.Parameter] = field(default_factory=dict)


class LocalMIM(nn.Module):
    """LocalMIM ViT: MAE encoder with stage taps, one decoder per stage, a reconstruction target (HOG by default),
    masked multi-scale loss.

    Args:
        img_size: square input size in pixels (an int, or an (h, w) pair with h == w).
        patch_size: patch size in pixels; ``img_size`` must be divisible by it.
        embed_dim, depth, num_heads, mlp_ratio: encoder shape.
        hog_nbins: orientation bins of the ``hog`` target (``in_chans·hog_nbins`` values per cell).
        hog_bias: frozen random gradient bias in the HOG (``--hog_bias``).
        all_stages: every block feeds a decoder (see :func:`stage_layout`).
        stage_weights: loss weight per stage (see :func:`stage_weights_for`).
        stage_weights_end: with it, the weights move linearly from ``stage_weights`` to this over training
            (:class:`StageWeightSchedule`; the engine calls :meth:`update_stage_weights` per optimizer step).
        stage_scales: scales of the four default taps (4, 2, 1, 0.5).
        decoder_embed_dim, decoder_depth, decoder_num_heads: per-stage decoder shape (256, 1, 8).
        hog_bias_seed: seed of the hog bias draw (same on all ranks).
        target: the reconstruction target of every stage (``--target``): a registered name (``hog``, ``pixel``),
            ``module:Class``, a ``targets.Target`` subclass or instance; built with the model's :class:`Stage` list.
        stage_targets: one target name per stage, or one for all (``--stage_targets``); overrides ``target``.
        target_options: settings for the targets (``run_pretrain.py`` passes all its flags); ``hog_nbins``,
            ``hog_bias``, ``hog_bias_seed`` and ``in_chans`` are set from the arguments above.
        mask_curriculum: ``'START:END'`` (``--mask_curriculum``): block-wise masks whose difficulty moves linearly
            over training (``masking.BlockMaskCurriculum``, calibrated at ``mask_ratio``; the engine calls
            :meth:`set_progress`); None: MAE's random masking (:meth:`random_masking`).
        mask_ratio: the ratio the curriculum is calibrated for (the run's ``--mask_ratio``).
        stage_taps: ``--stage_taps``: ``'all'`` or 1-based feeding blocks (:func:`parse_stage_taps`); None: the
            LocalMIM taps (or every block with ``all_stages``).
        tap_scales: ``--stage_scales``: one decoder scale per tap; None: by the rule of :func:`stage_layout`.
        layer_drop, layer_drop_gamma, layer_drop_seed: progressive layer dropping (:class:`LayerDrop`;
            ``layer_drop`` = theta_bar, 0 = off).
        prefix_target, prefix_target_weight: ``'replace'``/``'add'``: once the prefix is frozen, active stages also
            (or only) predict its full-image features (``prefix_target.PrefixTarget``); None: off, nothing built.
        self_distill, distill_ema: self-distillation across stages (``self_distill.SelfDistill``: the weight W of
            each stage's term, 0 = off; the EMA teacher's momentum, None = the live encoder).
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0, hog_nbins: int = 9,
                 hog_bias: bool = False, all_stages: bool = False,
                 stage_weights: Union[str, Sequence[float], None] = 'equal',
                 stage_scales: Sequence[float] = (4, 2, 1, 0.5), decoder_embed_dim: int = 256,
                 decoder_depth: int = 1, decoder_num_heads: int = 8, hog_bias_seed: int = 0, in_chans: int = 3,
                 stage_weights_end: Union[str, Sequence[float], None] = None,
                 target: Union[str, type, Target] = 'hog', stage_targets: Union[str, Sequence[str], None] = None,
                 target_options: Optional[Dict[str, object]] = None,
                 mask_curriculum: Optional[str] = None, mask_ratio: float = 0.75,
                 stage_taps: Union[str, Sequence[int], None] = None,
                 tap_scales: Union[str, Sequence[float], None] = None,
                 layer_drop: float = 0.0, layer_drop_gamma: float = 100.0, layer_drop_seed: int = 0,
                 prefix_target: Optional[str] = None, prefix_target_weight: float = 1.0,
                 self_distill: float = 0.0, distill_ema: Optional[float] = None):
        super().__init__()
        if isinstance(img_size, (tuple, list)):
            if len(img_size) != 2 or img_size[0] != img_size[1]:
                raise UserError(f'input size {tuple(img_size)} gives a non-square patch grid; LocalMIM needs square '
                                f'inputs (--input_size N)')
            img_size = img_size[0]
        if patch_size < 1 or img_size % patch_size:
            raise UserError(f'--input_size {img_size} is not divisible by --patch_size {patch_size}; pick sizes with '
                            f'input_size = k · patch_size')
        self.img_size, self.patch_size, self.grid = img_size, patch_size, img_size // patch_size
        self.num_patches = self.grid ** 2
        self.depth, self.embed_dim = depth, embed_dim

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d_tensor(embed_dim, self.grid, cls_token=True), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_ln)
                                     for _ in range(depth)])

        # stages
        taps = parse_stage_taps(stage_taps, depth)
        if all_stages and taps is not None and taps != list(range(depth)):
            raise UserError(f'--all_stages and --stage_taps {stage_taps}: --all_stages is --stage_taps all; give one')
        self.layout = stage_layout(depth, patch_size, stage_scales, all_stages, taps, tap_scales)
        self.stage_blocks = [b for b, _ in self.layout]
        self.stage_scales = [s for _, s in self.layout]
        self.cell_sizes = [cell_size(patch_size, s) for s in self.stage_scales]
        for s in self.stage_scales:
            if (self.grid * s) != int(self.grid * s):
                raise UserError(f'a {self.grid}x{self.grid} patch grid cannot be resampled at scale {s:g}; use an even '
                                f'grid (input_size / patch_size)')
        self.stage_weight_schedule = StageWeightSchedule(stage_weights, stage_weights_end, len(self.layout))
        self.stage_weights = self.stage_weight_schedule.at(0.0)  # at the start, every stage active
        # the loss reads the weights from a device buffer, written only when they change (freeze events, or each
        # optimizer step of a curriculum), so the training step never builds or syncs them on the host
        self.register_buffer('stage_weight', torch.tensor(self.stage_weights, dtype=torch.float32),
                             persistent=False)
        self._stage_weight_progress = 0.0
        self._stage_weight_values = list(self.stage_weights)
        self.norm = nn.ModuleList([_ln(embed_dim) for _ in self.layout])

        self._init_encoder()  # before the decoders, as in the reference: decoders initialise themselves
        self.stages = [Stage(index=k, block=b, scale=s, cell_size=c, grid=img_size // c, patch_size=patch_size,
                             img_size=img_size, in_chans=in_chans)
                       for k, ((b, s), c) in enumerate(zip(self.layout, self.cell_sizes))]
        # the built-in targets draw no global random numbers, so the decoders' init is the same for any of them
        options = dict(target_options or {}, hog_nbins=hog_nbins, hog_bias=hog_bias, hog_bias_seed=hog_bias_seed,
                       in_chans=in_chans)
        self.target = targets_lib.build_target(target, stage_targets, self.stages, options)
        self.target_dims = [int(self.target.dim(st)) for st in self.stages]
        self.decoder = nn.ModuleList([
            StageDecoder(embed_dim, self.grid, d, s, decoder_embed_dim, decoder_depth, decoder_num_heads)
            for s, d in zip(self.stage_scales, self.target_dims)])
        # built after everything else, so the default init draws are unchanged
        self.prefix = (PrefixTarget(prefix_target, prefix_target_weight, decoder_embed_dim, embed_dim,
                                    len(self.layout)) if prefix_target else None)
        # None: random_masking, untouched; else a host-side generator (no parameters, nothing in the state dict)
        self.masking = BlockMaskCurriculum(mask_curriculum, self.grid, mask_ratio) if mask_curriculum else None

        self.prefix_cache = None  # --prefix_cache: a prefix_cache.PrefixCache, set by the script
        # FreezeOut state (declared here, driven by freezeout.py through set_frozen)
        self.num_frozen_blocks = 0
        self.embed_frozen = False
        # None: every block runs every step, untouched; else host-side decisions (no parameters, no state dict)
        self.layer_drop = LayerDrop(layer_drop, layer_drop_gamma, depth, layer_drop_seed) if layer_drop else None
        # last: its heads' init draws come after everything else's, so the rest of the model is initialised alike
        # with and without it; None (W = 0): nothing is built, the model is the one without the flags
        from self_distill import SelfDistill, check_config
        if prefix_target and self_distill:  # both put heads on the stage decoders and extra passes in the step
            raise UserError('--prefix_target with --self_distill: not combined (their decoder heads and extra '
                            'full-image passes are untested together); choose one')
        check_config(float(self_distill or 0.0), distill_ema, self.stage_blocks)
        self.self_distill = SelfDistill(self, self_distill, distill_ema) if self_distill else None

    def _init_encoder(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in [self.blocks, self.norm]:
            m.apply(_init_linear_ln)

    # ---- FreezeOut seam ----------------------------------------------------------------------------------------

    def units(self) -> List[ParamUnit]:
        """FreezeOut units in forward order.

        Unit 0 = patch embedding + cls token (the fixed sin-cos ``pos_embed`` is not trainable). Unit k (1..depth) =
        block k-1 plus the norm and decoder (and prefix-target head) of every stage that block feeds. Only
        trainable parameters are listed;
        every trainable parameter is in exactly one unit.
        """
        named = dict(self.named_parameters())
        units = [ParamUnit('embed', {n: p for n, p in named.items()
                                     if (n.startswith('patch_embed.') or n == 'cls_token') and p.requires_grad})]
        for b in range(self.depth):
            prefixes = [f'blocks.{b}.'] + [f'{m}.{k}.' for k, (blk, _) in enumerate(self.layout) if blk == b
                                          for m in ('norm', 'decoder', 'prefix.heads')]
            units.append(ParamUnit(f'block{b + 1}', {n: p for n, p in named.items()
                                                     if p.requires_grad and any(n.startswith(x) for x in prefixes)}))
        return units

    def set_frozen(self, num_frozen_blocks: int, embed_frozen: bool) -> None:
        """Run the first ``num_frozen_blocks`` blocks (and, if ``embed_frozen``, the embedding) without training them.

        With the embedding frozen the whole frozen prefix runs under ``no_grad`` (no activations kept, no backward);
        otherwise (``--dont_freeze_pe``) it keeps the graph so gradients reach the patch embedding. Stages fed by a
        frozen block are switched off: no target, no decoder, no loss.
        """
        self.num_frozen_blocks, self.embed_frozen = int(num_frozen_blocks), bool(embed_frozen)
        for b, blk in enumerate(self.blocks):
            blk.train(self.training and b >= self.num_frozen_blocks)
        self.update_stage_weights(self._stage_weight_progress)  # presets rank the active stages

    def update_stage_weights(self, progress: float) -> bool:
        """Set the loss weights for training progress ``progress`` = step / T and the current active stages.

        Called at optimizer-step boundaries only; writes the device buffer (non-blocking, no host sync) only when
        a weight changes. Returns True if it did."""
        self._stage_weight_progress = float(progress)
        values = self.stage_weight_schedule.at(self._stage_weight_progress, self.active_stages())
        if values == self._stage_weight_values:
            return False
        self._stage_weight_values = values
        src = torch.tensor(values, dtype=torch.float32)
        if self.stage_weight.device.type == 'cuda':
            src = src.pin_memory()  # a pageable-memory copy would synchronise the host with the stream
        self.stage_weight.copy_(src, non_blocking=True)
        return True

    @property
    def follows_progress(self) -> bool:
        """True when something in the model changes with the training step (a stage-loss or mask curriculum): the
        engine then calls :meth:`set_progress` once per optimizer step."""
        return self.stage_weight_schedule.varies or self.masking is not None or self.layer_drop is not None

    def set_progress(self, progress: float, step: Optional[int] = None) -> None:
        """Training progress ``progress`` = step / T, at an optimizer-step boundary (a host float, no sync).
        ``step`` (the optimizer step) seeds the layer-drop decisions of that step (needed with ``layer_drop``)."""
        self.update_stage_weights(progress)
        if self.masking is not None:
            self.masking.set_progress(progress)
        if self.layer_drop is not None:
            if step is None:
                raise ValueError('set_progress: layer dropping needs the optimizer step (step=...)')
            self.layer_drop.set_step(progress, step, self.num_frozen_blocks)

    def progress_record(self) -> Dict[str, float]:
        """Per-epoch log fields of what follows the step (the mask curriculum's difficulty, the layer-drop keep
        probability), {} otherwise."""
        out = self.masking.record() if self.masking is not None else {}
        if self.layer_drop is not None:
            out.update(self.layer_drop.record())
        if self.prefix_cache is not None and self.prefix_cache.batches:  # batches with a frozen prefix since the last
            c = self.prefix_cache
            out['prefix_cache_hit_share'] = c.hits / c.batches  # served at the current depth
            out['prefix_cache_extend_share'] = c.extended / c.batches  # from a shallower depth + the new blocks
            c.hits = c.extended = c.batches = 0
        return out

    @property
    def optimizer_step_hook(self) -> Optional[Callable[[], None]]:
        """What the engine calls after every optimizer step (the self-distillation EMA update), or None."""
        sd = self.self_distill
        if sd is not None and sd.ema is not None:
            return lambda: sd.update_ema(self)
        return None

    def checkpoint_extras(self) -> Dict[str, Any]:
        """Training state outside ``state_dict()`` that a checkpoint must hold for an exact resume:
        ``{'distill_ema': ...}`` with an EMA teacher, else {} (checkpoints as without self-distillation)."""
        sd = self.self_distill
        return {'distill_ema': sd.ema_state_dict()} if sd is not None and sd.ema is not None else {}

    def load_checkpoint_extras(self, ckpt: Dict[str, Any], where: str) -> None:
        """Restore :meth:`checkpoint_extras` from a checkpoint (``where``: how to name it in an error)."""
        sd = self.self_distill
        if sd is None or sd.ema is None:
            return
        if not ckpt.get('distill_ema'):
            raise UserError(f'{where}: the checkpoint has no distill_ema (saved without --distill_ema), so the EMA '
                            f'teacher cannot be restored; resume without --distill_ema, or start a new run')
        sd.load_ema_state_dict(ckpt['distill_ema'], where)

    def extra_step_flops(self, input_size: int, mask_ratio: float, device: torch.device) -> Dict[str, Any]:
        """Training work the eval forward does not show to a FLOP counter (``freezeout.measure_unit_flops``):
        ``{'unit_fwd': [[unit, flops]], 'nograd_fwd': [[unit, flops]]}`` per image, {} without any."""
        sd = self.self_distill
        return sd.extra_step_flops(self, input_size, mask_ratio, device) if sd is not None else {}

    def current_stage_weights(self) -> List[float]:
        """The weights the loss uses now (host copy, for logging)."""
        return list(self._stage_weight_values)

    def train(self, mode: bool = True) -> 'LocalMIM':
        super().train(mode)
        for b in range(min(self.num_frozen_blocks, self.depth)):
            self.blocks[b].eval()  # frozen blocks never see dropout/drop-path: their function must not change
        return self

    @torch.no_grad()
    def unit_features(self, imgs: torch.Tensor) -> List[torch.Tensor]:
        """Output of every unit (``units()`` order) on ``imgs``, unmasked: the embedded tokens, then each block's
        tokens. The adaptive FreezeOut policy's probe (``--freeze_signal output``); uses no RNG."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        out = [x]
        for blk in self.blocks:
            x = blk(x)
            out.append(x)
        return out

    def active_stages(self) -> List[int]:
        return [k for k, b in enumerate(self.stage_blocks) if b >= self.num_frozen_blocks]

    def compile_regions(self, targets: bool = False, **opts) -> int:
        """``nn.Module.compile(**opts)`` on every encoder block and every stage decoder (and, with ``targets=True``,
        the target's work: ``Target.compile_regions``), in place; returns the per-function variant limit it set.

        Regions, not the whole model: the Python loop over blocks stays eager, so a FreezeOut event only changes
        which blocks run inside ``torch.no_grad()`` (grad mode, the blocks' train/eval flag and requires_grad are
        dynamo guards, i.e. graph-visible) and never invalidates a graph. Identical blocks share one compiled code
        object. Expected variants per function: encoder blocks 4 (trainable with/without an input that requires
        grad, frozen under no_grad, frozen with grad for ``--dont_freeze_pe``), decoders 1 per head shape (masked
        or full decode), times grad/no_grad where a caller runs without grad. The limit set here is 8 plus 2 per
        decoder, and a hit raises instead of dynamo's silent fall-back to eager (util.compile.allow_variants).
        State-dict keys are unchanged (no ``_orig_mod.`` prefix), so checkpoints load either way.
        """
        from util.compile import allow_variants
        opts.setdefault('fullgraph', True)  # a graph break is an error, not a silent eager island
        limit = 8 + 2 * len(self.decoder)
        allow_variants(limit)
        for blk in self.blocks:
            blk.compile(**opts)
        for dec in self.decoder:
            dec.compile(**opts)
        if targets:
            self.target.compile_regions(**opts)
        return limit

    # ---- forward ----------------------------------------------------------------------------------------------

    def random_masking(self, x: torch.Tensor, mask_ratio: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MAE per-sample random masking. x [B,L,D] -> (kept [B,keep,D], mask [B,L] 1=removed, ids_restore [B,L])."""
        b, n, d = x.shape
        keep = int(n * (1 - mask_ratio))
        noise = torch.rand(b, n, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return kept, mask, ids_restore

    def stage_mask(self, mask: torch.Tensor, scale: float) -> torch.Tensor:
        """[B,L] patch mask -> [B,(g·s)²] weights: nearest ×s for s >= 1, 2×2 (generally 1/s × 1/s) mean for s < 1."""
        b, g = mask.shape[0], self.grid
        m = mask.view(b, g, g)
        if scale >= 1:
            s = int(scale)
            m = m.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
        else:
            m = F.avg_pool2d(m.unsqueeze(1), int(round(1 / scale))).squeeze(1)
        return m.reshape(b, -1)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, ids_shuffle: Optional[torch.Tensor] = None,
                        cached: Optional[Dict[str, Any]] = None
                        ) -> Tuple[Dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
        """-> ({stage: normed latent [B,1+keep,D]} for active stages, mask [B,L], ids_restore [B,L]).
        ``ids_shuffle`` [B,L] (``--fixed_views``): the token order to mask by instead of a random draw.
        ``cached`` (``--prefix_cache``): the loader's rows of the frozen prefix's output; used when every row is
        at the current depth, else the prefix runs and the missing rows are written (prefix_cache.py)."""
        k_frozen = self.num_frozen_blocks
        prefix_ctx = torch.no_grad() if self.embed_frozen else nullcontext()
        want = {}
        for k in self.active_stages():
            want.setdefault(self.stage_blocks[k], []).append(k)
        latents: Dict[int, torch.Tensor] = {}
        hit = cache_lookup(self, cached, 'vis') if cached is not None else None
        if hit is not None:  # the visible tokens' prefix output, as computed from the visible tokens only
            x, extended = hit  # (rows of a shallower prefix: only the blocks frozen since were run)
            mask, ids_restore = order_to_mask(ids_shuffle, mask_ratio)
            if extended:
                cache_store(self, cached, 'vis', x)
        else:
            with prefix_ctx:
                x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
                if ids_shuffle is not None:
                    x, mask, ids_restore = shuffle_to_mask(x, ids_shuffle, mask_ratio)
                else:
                    x, mask, ids_restore = (self.random_masking(x, mask_ratio) if self.masking is None
                                            else self.masking(x, mask_ratio))
                cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
                x = torch.cat([cls, x], dim=1)
                for blk in self.blocks[:k_frozen]:
                    x = blk(x)
            if cached is not None:
                cache_store(self, cached, 'vis', x)
        if self.embed_frozen:
            x = x.detach()
        # progressive layer dropping: a dropped block is not run (identity), a kept one's residual branch is scaled
        # by 1/p_b (inverted stochastic depth: expected output = the full network's); frozen blocks always run
        drop = self.layer_drop.plan if (self.layer_drop is not None and self.training) else None
        for b in range(k_frozen, self.depth):
            if drop is None or drop[b] == 1.0:
                x = self.blocks[b](x)
            elif drop[b] > 0.0:
                x = x + (self.blocks[b](x) - x) * drop[b]
            for k in want.get(b, ()):
                latents[k] = self.norm[k](x)
        return latents, mask, ids_restore

    def stage_loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Masked mean over cells of the per-cell MSE (mean over features)."""
        per_cell = (pred.float() - target).pow(2).mean(dim=-1)
        return (per_cell * weight).sum() / weight.sum().clamp_min(1e-12)

    def token_cells(self, cells: torch.Tensor, scale: int, rows: torch.Tensor) -> torch.Tensor:
        """[B,(g·s)²,F] row-major cells -> [B,M,s·s,F]: the s×s cells of each token in ``rows`` [B,M]."""
        b, _, f = cells.shape
        g, s = self.grid, scale
        per_tok = cells.view(b, g, s, g, s, f).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, s * s, f)
        return torch.gather(per_tok, 1, rows[:, :, None, None].expand(-1, -1, s * s, f))

    def masked_rows(self, ids_restore: torch.Tensor, mask_ratio: float) -> torch.Tensor:
        """[B, M] positions of the masked tokens (any order: the loss is a sum over them)."""
        keep = int(ids_restore.shape[1] * (1 - mask_ratio))
        return torch.argsort(ids_restore, dim=1)[:, keep:]  # ids_shuffle[:, keep:], as random_masking drew it

    def decode(self, latents: Dict[int, torch.Tensor], mask: torch.Tensor, ids_restore: torch.Tensor,
               targets: Dict[int, torch.Tensor], mask_ratio: float, full: bool = False,
               tokens: Optional[Dict[int, torch.Tensor]] = None, rows: Optional[torch.Tensor] = None
               ) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
        """Per active stage: (losses, predictions). ``full=False`` (training): stages with scale >= 1 predict and
        are scored on masked tokens only (same loss and gradients as the full path, up to float rounding: the
        visible cells have weight 0); the 0.5-scale stage pools 2×2 tokens, so nearly every pooled cell holds a
        masked token (1 - 0.25^4 = 99.6% at ratio 0.75) and it runs in full. ``full=True``: every stage predicts
        every cell (visualisation, and the reference semantics the test compares against).

        ``tokens`` (a dict, filled for the stages among its keys, whose values are ignored): the decoder tokens
        the head reads, at the masked positions (:meth:`masked_rows` order) [B, M, d_dec] (self-distillation);
        ``rows``: those positions if the caller has them already."""
        losses: Dict[int, torch.Tensor] = {}
        preds: Dict[int, torch.Tensor] = {}
        want = set(tokens) if tokens is not None else set()
        for k in latents:
            dec = self.decoder[k]
            if full or not dec.per_token:
                if k in want:
                    preds[k], tok = dec(latents[k], ids_restore, return_tokens=True)
                    if rows is None:
                        rows = self.masked_rows(ids_restore, mask_ratio)
                    tokens[k] = torch.gather(tok, 1, rows.unsqueeze(-1).expand(-1, -1, tok.shape[-1]))
                else:
                    preds[k] = dec(latents[k], ids_restore)
                losses[k] = self.stage_loss(preds[k], targets[k], self.stage_mask(mask, self.stage_scales[k]))
                continue
            if rows is None:
                rows = self.masked_rows(ids_restore, mask_ratio)
            s = int(self.stage_scales[k])
            if k in want:
                preds[k], tokens[k] = dec(latents[k], ids_restore, rows, return_tokens=True)
            else:
                preds[k] = dec(latents[k], ids_restore, rows)
            per_cell = (preds[k].float() - self.token_cells(targets[k], s, rows)).pow(2).mean(dim=-1)
            losses[k] = per_cell.sum() / max(1, per_cell.numel())  # = masked mean: every selected cell has weight 1
        return losses, preds

    def compute_targets(self, imgs: torch.Tensor, stages: Sequence[int]) -> Dict[int, torch.Tensor]:
        """``{k: [B, cells_k, dim_k]}`` target values of the stages ``stages`` (indices), under ``no_grad``.

        Every cell, not only the masked ones: the 0.5-scale stage reads (nearly) all of them, and HOG pools the
        finer stages from one full-resolution pass, so restricting the pixel work to masked cells would not save
        work. Shapes are checked (host-side, no sync) so that a plugin's mistake is one line, not a broadcast."""
        with torch.no_grad():
            out = self.target.forward_stages(imgs, [self.stages[k] for k in stages])
        for k in stages:
            t = out.get(k)
            want = (imgs.shape[0], self.stages[k].num_cells, self.target_dims[k])
            if t is None or tuple(t.shape) != want:
                got = 'nothing' if t is None else list(t.shape)
                raise UserError(f'target {targets_lib.target_name(self.target, self.stages[k])} returned {got} for '
                                f'stage {k}; expected [B, cells, dim] = {list(want)} (cells of '
                                f'{self.stages[k].cell_size} px, row-major)')
        return out

    def total_loss(self, stage_losses: Dict[int, torch.Tensor], imgs: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the active stages' losses (0 when every stage is frozen)."""
        if stage_losses:
            return sum(self.stage_weight[k] * stage_losses[k] for k in self.active_stages())
        return imgs.new_zeros(())

    @property
    def hog(self) -> HOGTargets:
        """The HOG engine of the ``hog`` target (direct access for HOG-specific code; the toolkit asks
        ``self.target``). AttributeError when no stage uses HOG."""
        for m in self.target.modules():
            if isinstance(m, HOGTargets):
                return m
        raise AttributeError(f'model has no HOG target (target {targets_lib.target_name(self.target)})')

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the target seam hold the HOG bias as 'hog.bias' (now inside self.target)
        old = [k for k in state_dict if k.startswith(prefix + 'hog.')]
        if old:
            where = next((n for n, m in self.named_modules() if isinstance(m, HOGTargets)), None)
            if where is not None:
                for k in old:
                    state_dict[prefix + where + k[len(prefix + 'hog'):]] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, return_vis: bool = False,
                full_decode: Optional[bool] = None, ids_shuffle: Optional[torch.Tensor] = None,
                index: Optional[Sequence[int]] = None, view: Optional[Sequence[int]] = None,
                cached: Optional[Dict[str, Any]] = None) -> Dict[str, object]:
        """imgs [B,3,H,W] (normalised) -> dict with
        ``loss`` (weighted sum over active stages), ``stage_losses`` ({stage: scalar}, graph kept),
        and with ``return_vis``: ``pred``/``target`` ({stage: [B,cells,dim]}, every cell) and ``mask`` [B,L].
        With self-distillation, in training mode: ``distill_loss`` (the unweighted sum of the stage terms; the
        loss includes W times it). Not in eval mode: the teacher signal is a training term, and FLOP counting
        (``freezeout.measure_unit_flops``) takes its cost from :meth:`extra_step_flops` instead.
        ``full_decode`` (default: ``return_vis``) predicts every cell of every stage instead of only the masked
        ones; the loss is the same up to float rounding, the work is not. ``ids_shuffle`` [B,L], ``index`` [B] and
        ``view`` [B] come from the fixed-views loader (``fixed_views.py``): the mask order of each image's view, and
        which (image, view) each row is."""
        if not 0.0 < mask_ratio < 1.0 or int(self.num_patches * (1 - mask_ratio)) >= self.num_patches:
            raise UserError(f'--mask_ratio {mask_ratio}: must be in (0, 1) and remove at least one of the '
                            f'{self.num_patches} patches (the loss is computed on removed patches only)')
        full = return_vis if full_decode is None else full_decode
        sd = self.self_distill  # never together with the prefix target (refused at build)
        distilled, tokens, rows = [], None, None
        if self.prefix is not None and not full and PrefixTarget.active(self):
            hit = cache_lookup(self, cached, 'full') if cached is not None else None
            # before the encoder: no RNG, the masks are unchanged
            raw = PrefixTarget.prefix_output(self, imgs) if hit is None else hit[0]
            if cached is not None and (hit is None or hit[1]):
                cache_store(self, cached, 'full', raw)
            feats = PrefixTarget.normalize(raw)
            targets = {} if self.prefix.mode == 'replace' else self.compute_targets(imgs, self.active_stages())
            latents, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, ids_shuffle, cached)
            stage_losses, preds = decode_with_prefix(self, latents, ids_restore, targets, mask, mask_ratio, feats), {}
        else:  # (the pictures, full decode, show the HOG stages)
            targets = self.compute_targets(imgs, self.active_stages())
            latents, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, ids_shuffle,
                                                              None if full else cached)
            distilled = sd.stages(latents) if (sd is not None and self.training) else []
            tokens = dict.fromkeys(distilled) if distilled else None
            rows = self.masked_rows(ids_restore, mask_ratio) if distilled else None
            stage_losses, preds = self.decode(latents, mask, ids_restore, targets, mask_ratio, full, tokens, rows)
        loss = self.total_loss(stage_losses, imgs)
        out: Dict[str, object] = {'loss': loss, 'stage_losses': stage_losses}
        if sd is not None and self.training:
            # 0 once every distilled stage is frozen: the key stays, so the per-epoch log keeps its column
            if distilled:
                d = sd.loss(self, imgs, tokens, rows)
                loss = loss + sd.weight * d
            else:
                d = imgs.new_zeros((), dtype=torch.float32)
            out.update(loss=loss, distill_loss=d)
        if return_vis:
            out.update(pred=preds, target=targets, mask=mask)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Factories

MODEL_CONFIGS: Dict[str, Dict[str, object]] = {
    'MIM_vit_tiny_patch16': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'MIM_vit_small_patch16': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'MIM_vit_base_patch16': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    'MIM_vit_large_patch16': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    # 14 px patches: the reference's 4/2/1/0.5 scales need 3.5 px cells, which do not exist. (2, 2, 1, 0.5) is the
    # nearest power-of-two set with whole-pixel cells (7, 7, 14, 28 px).
    'MIM_vit_huge_patch14': dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, stage_scales=(2, 2, 1, 0.5)),
}
MODEL_NAMES = list(MODEL_CONFIGS)
_REGISTRY: Dict[str, Callable[..., LocalMIM]] = {}


def _register(name: str) -> Callable[..., LocalMIM]:
    def factory(**kwargs) -> LocalMIM:
        cfg = dict(MODEL_CONFIGS[name])
        cfg.update({k: v for k, v in kwargs.items() if v is not None})
        if cfg['embed_dim'] % cfg['num_heads']:  # timm would assert deep inside Attention
            default = 'heads' if kwargs.get('num_heads') is None else 'width'
            raise UserError(f"--num_heads {cfg['num_heads']}: must divide --embed_dim {cfg['embed_dim']} "
                            f"({name}'s default {default}; give both flags)")
        return LocalMIM(**cfg)
    factory.__name__ = name
    factory.__doc__ = f'{name}: {MODEL_CONFIGS[name]}; kwargs override (img_size, patch_size, hog_nbins, ...).'
    _REGISTRY[name] = factory
    return factory


for _name in MODEL_NAMES:
    globals()[_name] = _register(_name)


def create_model(name: str, **kwargs) -> LocalMIM:
    """Build a registered LocalMIM model by name; unknown names are a UserError listing the valid ones."""
    if name not in _REGISTRY:
        raise UserError(f"--model {name!r} is not a pre-training model; choose one of {', '.join(MODEL_NAMES)}")
    return _REGISTRY[name](**kwargs)
