"""Self-distillation across stages (``--self_distill W``, optionally ``--distill_ema M``).

Transitive, DeepMIM-like deep supervision: besides its target (HOG, pixels, ...), stage k regresses the encoder
features that the next deeper tap produces for the same masked tokens.

    teacher (no grad)   full (unmasked) image -> patch embed + pos -> blocks -> at tap block t: LayerNorm per token
                        without affine -> T_t [B, L, D]; from the live encoder, or from an EMA copy (--distill_ema)
    student, stage k    decoder k's normed tokens at the masked positions [B, M, d_dec] -> linear head k
                        (d_dec -> D, stored as decoder.k.distill_head, so it trains and freezes with stage k)
    loss                loss += W * sum_k mean((head_k - T_{t(k)})^2) over the masked tokens and features

Token level, not cells: the decoder works on the patch grid (one token per patch) and only its scale head turns a
token into s x s cells (or pools 2x2 tokens at scale 0.5), so the teacher's token map and the decoder's tokens are
the same grid and no resampling rule is needed. The teacher tap t(k) of stage k is the shallowest tap strictly
deeper than stage k's (``--stage_taps`` are increasing, so that is stage k+1's; the repeated taps of depth < 7
models are handled too); a stage without a deeper tap (the deepest) has no term.

FreezeOut: stage k's term lives and dies with stage k (its head is in stage k's unit): once block b_k is frozen
the stage is switched off and its term is not computed. The teacher pass runs up to the deepest teacher tap while
any distilled stage is active (one unmasked encoder forward, no backward) and stops once every distilled stage is
frozen; the FLOP model (``freezeout.step_cost``) counts it as no-grad work tied to the deepest distilled stage's
unit (``nograd_fwd``), and the heads as that stage's trainable work.

EMA: a copy of the encoder (patch embed, cls token, pos embed, blocks) outside the model's parameters (not in
``state_dict``, not in the optimizer, no grad), updated after every optimizer step ``ema = M*ema + (1-M)*live``;
parameters that do not train (frozen units, the fixed pos embed) are copied instead, so a frozen prefix is its own
teacher. Saved in checkpoints under ``distill_ema`` and restored on resume. An AMP step the loss scaler skips
still moves the EMA toward the (unchanged) weights. The EMA blocks run eager under ``--compile``.
"""
import copy
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.args import real
from util.errors import UserError

SELF_DISTILL_HELP = ('self-distillation across stages: each stage but the deepest also regresses, with a linear '
                     'head on its decoder tokens, the LayerNorm\'ed (no affine) encoder tokens of the next deeper '
                     'tap on the full unmasked image (teacher under no_grad, or the --distill_ema copy), MSE at the '
                     'masked tokens; W >= 0 is the weight of each stage\'s term in the loss. Costs one unmasked '
                     'encoder forward per step while any distilled stage trains (in the FLOP plan); a stage frozen '
                     'by FreezeOut drops its term. Logged per epoch as train_distill_loss (the unweighted sum of the '
                     'terms) (default: 0 = off)')
DISTILL_EMA_HELP = ('with --self_distill: the teacher is an exponential moving average of the encoder, updated '
                    'after every optimizer step ema = M*ema + (1-M)*live, M in (0, 1), e.g. 0.999; kept outside '
                    'the model parameters, saved in checkpoints as distill_ema (default: none: the live encoder '
                    'under no_grad)')


def add_self_distill_args(g) -> None:
    g.add_argument('--self_distill', default=0.0, type=float, metavar='W', help=SELF_DISTILL_HELP,
                   domain=real(0.0), defines_run=True)
    g.add_argument('--distill_ema', default=None, type=float, metavar='M', help=DISTILL_EMA_HELP,
                   domain=real(0.0, 1.0, lo_open=True, hi_open=True), defines_run=True)


def teacher_blocks(stage_blocks: Sequence[int]) -> Dict[int, int]:
    """``{stage: teacher tap block}`` for every stage with a deeper tap (the shallowest tap deeper than its own)."""
    out = {}
    for k, b in enumerate(stage_blocks):
        deeper = [t for t in stage_blocks if t > b]
        if deeper:
            out[k] = min(deeper)
    return out


def check_config(weight: float, ema: Optional[float], stage_blocks: Sequence[int]) -> None:
    if not (weight >= 0.0 and weight < float('inf')):
        raise UserError(f'--self_distill {weight}: the weight must be finite and >= 0 (0 = off)')
    if ema is not None and not weight:
        raise UserError(f'--distill_ema {ema:g}: needs --self_distill W > 0 (the EMA is only a distillation teacher)')
    if ema is not None and not 0.0 < ema < 1.0:
        raise UserError(f'--distill_ema {ema}: must be in (0, 1), e.g. 0.999')
    if weight and not teacher_blocks(stage_blocks):
        raise UserError(f'--self_distill {weight:g}: needs at least two stage taps at different blocks (stages fed '
                        f'by blocks {[b + 1 for b in stage_blocks]}); give --stage_taps with two or more taps or '
                        f'drop --self_distill')


class _EncoderCopy(nn.Module):
    """The teacher's copy of the encoder: the modules/parameters named like the live model's, frozen."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.patch_embed = copy.deepcopy(model.patch_embed)
        self.cls_token = nn.Parameter(model.cls_token.detach().clone(), requires_grad=False)
        self.pos_embed = nn.Parameter(model.pos_embed.detach().clone(), requires_grad=False)
        self.blocks = copy.deepcopy(model.blocks)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()  # no dropout/drop-path in the teacher


def encoder_taps(enc: nn.Module, imgs: torch.Tensor, taps: Sequence[int]) -> Dict[int, torch.Tensor]:
    """``{block: LayerNorm(no affine) of its output tokens, cls dropped [B, L, D]}`` for ``taps`` on the unmasked
    ``imgs``, through ``enc``'s patch_embed/cls_token/pos_embed/blocks (the live model or its EMA copy)."""
    last = max(taps)
    want = set(taps)
    out: Dict[int, torch.Tensor] = {}
    with torch.no_grad():
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
        x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        for b in range(last + 1):
            x = enc.blocks[b](x)
            if b in want:
                out[b] = F.layer_norm(x[:, 1:].float(), (x.shape[-1],))
    return out


class SelfDistill(nn.Module):
    """The distillation of a LocalMIM model (``model.self_distill``); holds no parameters of its own (the heads are
    the decoders' ``distill_head``, the EMA copy is outside the module tree)."""

    def __init__(self, model: nn.Module, weight: float, ema: Optional[float] = None):
        super().__init__()
        check_config(weight, ema, model.stage_blocks)
        self.weight, self.momentum = float(weight), (None if ema is None else float(ema))
        self.teacher_of = teacher_blocks(model.stage_blocks)
        for k in sorted(self.teacher_of):  # after the decoders' init: their draws are the same as without
            dec = model.decoder[k]
            head = nn.Linear(dec.embed.out_features, model.embed_dim)
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)
            dec.distill_head = head
        # a list hides the copy from the module tree: not in state_dict(), parameters() or the optimizer
        self._ema: List[_EncoderCopy] = [_EncoderCopy(model)] if ema is not None else []
        self._synced: set = set()  # names of EMA params copied from non-training live params
        self._pairs: Optional[list] = None  # [(name, ema param, live param)], built at the first update

    @property
    def ema(self) -> Optional[_EncoderCopy]:
        return self._ema[0] if self._ema else None

    def _apply(self, fn, *args, **kwargs):
        # model.to(device)/half() must move the hidden copy too
        super()._apply(fn, *args, **kwargs)
        if self._ema:
            self._ema[0]._apply(fn, *args, **kwargs)
        return self

    def stages(self, active: Sequence[int]) -> List[int]:
        """The active stages that have a term."""
        return [k for k in active if k in self.teacher_of]

    def loss(self, model: nn.Module, imgs: torch.Tensor, tokens: Dict[int, torch.Tensor], rows: torch.Tensor
             ) -> torch.Tensor:
        """Sum over ``tokens``' stages of the masked-token MSE; ``tokens[k]`` [B, M, d_dec] at ``rows`` [B, M]."""
        taps = sorted({self.teacher_of[k] for k in tokens})
        feats = encoder_taps(self.ema if self.ema is not None else model, imgs, taps)
        total = None
        for k, tok in tokens.items():
            t = feats[self.teacher_of[k]]
            t = torch.gather(t, 1, rows.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
            term = (model.decoder[k].distill_head(tok).float() - t).pow(2).mean()
            total = term if total is None else total + term
        return total

    @torch.no_grad()
    def update_ema(self, model: nn.Module) -> None:
        """After an optimizer step: ``ema = M*ema + (1-M)*live`` for training params, a copy for the others."""
        if self.ema is None:
            return
        if self._pairs is None:  # once, not per step: parameters keep their identity (to(), load_state_dict)
            live = dict(model.named_parameters())
            self._pairs = [(n, e, live[n]) for n, e in self.ema.named_parameters()]
        ema_p, live_p = [], []
        for n, e, p in self._pairs:
            if p.requires_grad:
                ema_p.append(e)
                live_p.append(p.detach())
                self._synced.discard(n)
            elif n not in self._synced:  # frozen (or fixed): its EMA is the weight itself, copied once
                e.copy_(p.detach())
                self._synced.add(n)
        if ema_p:
            torch._foreach_lerp_(ema_p, live_p, 1.0 - self.momentum)

    def ema_state_dict(self) -> Dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self.ema.state_dict().items()}

    def load_ema_state_dict(self, state: Dict[str, torch.Tensor], where: str) -> None:
        try:
            self.ema.load_state_dict(state)
        except (RuntimeError, KeyError) as e:
            raise UserError(f'{where}: its distill_ema does not match this model ({str(e).splitlines()[0][:200]}); '
                            f'resume with the flags the run was started with') from None
        self._synced.clear()

    def extra_step_flops(self, model: nn.Module, input_size: int, mask_ratio: float, device: torch.device
                         ) -> Dict[str, List[List[float]]]:
        """Per-image forward FLOPs of the training work the eval forward (``freezeout.measure_unit_flops``) does
        not run: ``unit_fwd`` [[unit, flops]] (the heads, trained with their stage's unit) and ``nograd_fwd``
        [[unit, flops]] (the teacher pass, no backward, paid while that unit trains: the deepest distilled
        stage's). Units in ``model.units()`` order (0 = embedding, b+1 = block b)."""
        from torch.utils.flop_counter import FlopCounterMode
        from timm.models.vision_transformer import Attention
        enc = self.ema if self.ema is not None else model
        mods = {id(m): m for root in (model, enc) for m in root.modules() if isinstance(m, Attention)}
        fused = [(m, m.fused_attn) for m in mods.values()]
        for m, _ in fused:
            m.fused_attn = False  # explicit matmuls, as measure_unit_flops counts attention
        L = model.num_patches
        masked = L - int(L * (1 - mask_ratio))
        try:
            with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), torch.no_grad():
                x = torch.randn(1, 3, input_size, input_size, device=device)
                with FlopCounterMode(display=False) as fc:
                    encoder_taps(enc, x, [max(self.teacher_of.values())])
                teacher = float(fc.get_total_flops())
                heads = []
                for k in sorted(self.teacher_of):
                    head = model.decoder[k].distill_head
                    with FlopCounterMode(display=False) as fc:
                        head(torch.zeros(1, masked, head.in_features, device=device))
                    heads.append([model.stage_blocks[k] + 1, float(fc.get_total_flops())])
        finally:
            for m, f in fused:
                m.fused_attn = f
        deepest = max(model.stage_blocks[k] for k in self.teacher_of)
        return {'unit_fwd': heads, 'nograd_fwd': [[deepest + 1, teacher]]}

    def describe(self, flops: Optional[Dict[str, Any]] = None) -> str:
        taps = ', '.join(f'{k}<-block {t + 1}' for k, t in sorted(self.teacher_of.items()))
        line = (f'self-distillation: weight {self.weight:g} per stage term, teacher '
                + (f'EMA (momentum {self.momentum:g})' if self.momentum is not None else 'live encoder (no_grad)')
                + f'; stage <- teacher tap: {taps}')
        if flops is not None and flops.get('nograd_fwd'):
            from freezeout import step_cost
            base = step_cost(flops, 0, False)
            t = sum(f for _, f in flops['nograd_fwd'])
            u = flops['nograd_fwd'][0][0]
            name = flops['names'][u] if u < len(flops.get('names', ())) else f'unit {u}'
            line += (f'; teacher pass {t / 1e9:.3g} GFLOP/img forward, no backward, paid until {name} freezes: '
                     f'{100 * t / base:.1f}% of an unfrozen step (FLOP model)')
        return line
