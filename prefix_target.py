"""Frozen-prefix features as a reconstruction target (``--prefix_target replace|add``, ``--prefix_target_weight``).

LayerLock's idea in LocalMIM's shape: once FreezeOut has frozen the embedding and the first n blocks, the prefix is
a fixed function of the image, and its features are a target the still-trained stages can learn from. With the
prefix frozen (``model.embed_frozen``), every active stage k (its tap in the trained part) also predicts, at the
masked tokens, the prefix's output for the FULL (unmasked) image, per-token LayerNorm'ed without affine (scale-free
like MAE's norm_pix), computed under no_grad:

    p_k = mean over masked tokens t of mean_d (head_k(h_k[t]) - LN(prefix(img))[t])^2

``h_k`` is stage k's normed decoder token (what its HOG head reads) and ``head_k`` a Linear(decoder width -> encoder
width) of its own, in the unit of the block feeding stage k (it freezes with it). ``add``: loss_k = HOG_k + w p_k;
``replace``: loss_k = w p_k and the stages' HOG targets are not computed. Before the first freeze nothing changes
(the heads exist but are not run; DDP is built with find_unused_parameters). The 0.5-scale stage decodes every
token; its p_k reads the masked ones.

Cost: the prefix on the full image is an extra forward of (embedding + n blocks) on L tokens instead of the
L (1 - ratio) visible ones (~4x the prefix's own cost at ratio 0.75, more for attention), plus the heads; the FLOP
model (:func:`prefix_extra_flops`, freezeout.step_cost) counts both, measured with FlopCounterMode on the model. The
HOG work ``replace`` skips is not subtracted (the plan is conservative there). ``--prefix_cache`` (see
docs/PREFIX_CACHE.md) is the route to removing most of the extra pass.
"""
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.errors import UserError

MODES = ('replace', 'add')


class PrefixTarget(nn.Module):
    """The heads and the loss of the prefix target; owned by ``LocalMIM`` as ``model.prefix``."""

    def __init__(self, mode: str, weight: float, decoder_dim: int, embed_dim: int, num_stages: int):
        super().__init__()
        if mode not in MODES:
            raise UserError(f"--prefix_target {mode!r}: choose one of {', '.join(MODES)}")
        self.mode, self.weight = mode, float(weight)
        self.heads = nn.ModuleList([nn.Linear(decoder_dim, embed_dim) for _ in range(num_stages)])
        for h in self.heads:
            nn.init.xavier_uniform_(h.weight)
            nn.init.zeros_(h.bias)

    @staticmethod
    def active(model: nn.Module) -> bool:
        """On once the whole prefix is frozen: the embedding and ``model.num_frozen_blocks`` >= 0 blocks."""
        return bool(model.embed_frozen)

    @staticmethod
    @torch.no_grad()
    def prefix_output(model: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
        """[B, 1 + L, D]: the frozen prefix's output (cls first) on the unmasked images (what --prefix_cache stores).
        The frozen blocks are in eval mode (LocalMIM.train), so this is deterministic."""
        x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
        x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        for blk in model.blocks[:model.num_frozen_blocks]:
            x = blk(x)
        return x

    @staticmethod
    def normalize(raw: torch.Tensor) -> torch.Tensor:
        """[B, 1 + L, D] prefix output -> [B, L, D] target: the patch tokens LayerNorm'ed per token, no affine, fp32."""
        x = raw[:, 1:].float()
        return F.layer_norm(x, x.shape[-1:])

    @classmethod
    def features(cls, model: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
        """[B, L, D]: the target of ``imgs`` (the prefix on the unmasked images, normalised)."""
        return cls.normalize(cls.prefix_output(model, imgs))

    def loss(self, k: int, hidden: torch.Tensor, feats: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """p_k: ``hidden`` [B, M, E] decoder tokens at the masked positions ``rows`` [B, M]; ``feats`` [B, L, D]."""
        target = torch.gather(feats, 1, rows.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        return (self.heads[k](hidden).float() - target).pow(2).mean()


def decode_with_prefix(model: nn.Module, latents: Dict[int, torch.Tensor], ids_restore: torch.Tensor,
                       targets: Dict[int, torch.Tensor], mask: torch.Tensor, mask_ratio: float,
                       feats: torch.Tensor) -> Dict[int, torch.Tensor]:
    """The stage losses with the prefix target on (training path): per active stage HOG_k + w p_k (add) or
    w p_k (replace), the HOG part exactly as ``LocalMIM.decode`` scores it."""
    pt: PrefixTarget = model.prefix
    rows = model.masked_rows(ids_restore, mask_ratio)
    losses: Dict[int, torch.Tensor] = {}
    for k in latents:
        dec = model.decoder[k]
        if dec.per_token:
            if pt.mode == 'replace':
                h = dec(latents[k], ids_restore, rows, out='hidden')
            else:
                pred, h = dec(latents[k], ids_restore, rows, out='both')
                s = int(model.stage_scales[k])
                per_cell = (pred.float() - model.token_cells(targets[k], s, rows)).pow(2).mean(dim=-1)
                hog = per_cell.sum() / max(1, per_cell.numel())
        else:
            if pt.mode == 'replace':
                full = dec(latents[k], ids_restore, out='hidden')
            else:
                pred, full = dec(latents[k], ids_restore, out='both')
                hog = model.stage_loss(pred, targets[k], model.stage_mask(mask, model.stage_scales[k]))
            h = torch.gather(full, 1, rows.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        p = pt.weight * pt.loss(k, h, feats, rows)
        losses[k] = p if pt.mode == 'replace' else hog + p
    return losses


def require_frozen_prefix(args, flag: str, what: str) -> None:
    """The refusals shared by the flags that need a frozen prefix (the prefix target, the prefix cache): FreezeOut
    on, and the embedding allowed to freeze. ``flag``: how the error line names the flag; ``what``: why it needs it."""
    if not getattr(args, 'freezeout', False):
        raise UserError(f'{flag}: needs FreezeOut (--t_0/--how_scale or a --freeze_policy): {what}')
    if getattr(args, 'dont_freeze_pe', False):
        raise UserError(f'{flag} with --dont_freeze_pe: the embedding keeps training, so no prefix is ever frozen; '
                        f'drop --dont_freeze_pe')


def check_prefix_target(args) -> None:
    """Combinations --prefix_target cannot honour, refused in one line before any work."""
    mode = getattr(args, 'prefix_target', None)
    if mode is None:
        return
    require_frozen_prefix(args, f'--prefix_target {mode}', 'the target is the frozen prefix, and without freezing '
                                                          'nothing is ever frozen')


def prefix_extra_flops(model: nn.Module, input_size: int, mask_ratio: float, device: torch.device
                       ) -> Dict[str, List[float]]:
    """Extra forward-equivalent FLOPs of one image per step with the first n scheduled units frozen (index n,
    0..units): ``prefix_pass[n]``, 0 before the embedding freezes, then the full-image pass through the embedding
    and the n - 1 frozen blocks (forward only, no_grad; FlopCounterMode per module on L + 1 tokens);
    ``prefix_extra[n]``: that plus 3x (forward + backward) each active stage's head on the masked tokens."""
    from torch.utils.flop_counter import FlopCounterMode
    from timm.models.vision_transformer import Attention

    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(m, Attention)]
    for m, _ in fused:
        m.fused_attn = False  # explicit matmuls, counted alike on CPU and CUDA (as freezeout.measure_unit_flops)
    was = model.training
    model.eval()
    blocks: List[float] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), torch.no_grad():
            imgs = torch.randn(1, 3, input_size, input_size, device=device)
            with FlopCounterMode(display=False) as fc:  # one module at a time: its total is its own
                x = model.patch_embed(imgs)
            embed = float(fc.get_total_flops())
            x = torch.cat([model.cls_token.expand(1, -1, -1), x + model.pos_embed[:, 1:]], dim=1)
            for blk in model.blocks:
                with FlopCounterMode(display=False) as fc:
                    x = blk(x)
                blocks.append(float(fc.get_total_flops()))
    finally:
        for m, f in fused:
            m.fused_attn = f
        model.train(was)
    masked = model.num_patches - int(model.num_patches * (1 - mask_ratio))
    head = [2.0 * masked * h.in_features * h.out_features for h in model.prefix.heads]
    passes, out = [0.0], [0.0]
    for n in range(1, model.depth + 2):
        nb = n - 1
        active = [k for k, b in enumerate(model.stage_blocks) if b >= nb]
        passes.append(embed + sum(blocks[:nb]))
        out.append(passes[-1] + 3.0 * sum(head[k] for k in active))
    return {'prefix_extra': out, 'prefix_pass': passes}
