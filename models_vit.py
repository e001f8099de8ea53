"""Evaluation ViTs: native timm ``VisionTransformer`` models, MAE's layer decay, and the FreezeOut seam.

Models are plain timm 1.0 ViTs built with MAE's settings (qkv_bias, LayerNorm eps 1e-6), no subclass:

* ``global_pool='avg'`` (default, MAE fine-tuning): mean of the patch tokens → ``fc_norm`` → head; ``norm`` is
  ``Identity``. State-dict keys ``cls_token, pos_embed, patch_embed.*, blocks.*, fc_norm.*, head.*``.
* ``global_pool='token'`` (``--cls_token``, linear probe, k-NN): ``norm`` after the last block, cls token → head.

Reading checkpoints (ours, MAE, LocalMIM, ViTFreeze) into these models is :mod:`checkpoint_formats`.

Public API:
    create_model(name, **kw) / vit_*_patch*(**kw)      build a model
    vit_name(name) / model_arch(model)                  evaluation name of a model name; a model's shapes
    encoder_features(model, x, pool)                     [B,3,H,W] -> [B,D] features for k-NN / probes
    layer_decay_param_groups(model, wd, layer_decay)     MAE's layer-wise lr decay groups via timm
    ViTUnits(model)                                      FreezeOut units of a timm ViT (fine-tuning)
"""
import math
import re
from collections import OrderedDict
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay

from util.errors import UserError

__all__ = ['VIT_CONFIGS', 'MODEL_NAMES', 'ARCH_KEYS', 'create_model', 'vit_tiny_patch16', 'vit_small_patch16',
           'vit_base_patch16', 'vit_large_patch16', 'vit_huge_patch14', 'vit_name', 'model_arch', 'encoder_features',
           'layer_decay_param_groups', 'mae_layer_id', 'FreezableBlocks', 'ViTUnits']

VIT_CONFIGS: Dict[str, Dict[str, int]] = {
    'vit_tiny_patch16': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'vit_small_patch16': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'vit_base_patch16': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    'vit_large_patch16': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    'vit_huge_patch14': dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
MODEL_NAMES = list(VIT_CONFIGS)
ARCH_KEYS = ('patch_size', 'embed_dim', 'depth', 'num_heads')


# ---------------------------------------------------------------------------------------------------------------------
# Factories


def _build(name: str, img_size: int = 224, patch_size: Optional[int] = None, embed_dim: Optional[int] = None,
           depth: Optional[int] = None, num_heads: Optional[int] = None, num_classes: int = 1000,
           global_pool: str = 'avg', drop_path_rate: float = 0.0, **kwargs: Any) -> VisionTransformer:
    cfg = dict(VIT_CONFIGS[name])
    cfg.update({k: v for k, v in dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                      num_heads=num_heads).items() if v is not None})
    if global_pool not in ('avg', 'token'):
        raise UserError(f"global_pool {global_pool!r}: use 'avg' (mean of patch tokens + fc_norm) or 'token'")
    if cfg['patch_size'] < 1 or img_size % cfg['patch_size']:
        raise UserError(f"--input_size {img_size} is not divisible by --patch_size {cfg['patch_size']}; pick sizes "
                        f"with input_size = k · patch_size")
    if cfg['embed_dim'] % cfg['num_heads']:
        raise UserError(f"--embed_dim {cfg['embed_dim']} is not divisible by --num_heads {cfg['num_heads']}")
    return VisionTransformer(img_size=img_size, num_classes=num_classes, global_pool=global_pool, mlp_ratio=4.0,
                             qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             drop_path_rate=drop_path_rate, **cfg, **kwargs)


def vit_tiny_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16: D 192, depth 12, 3 heads. kwargs: img_size, patch_size, embed_dim, depth, num_heads,
    num_classes, global_pool ('avg' | 'token'), drop_path_rate."""
    return _build('vit_tiny_patch16', **kwargs)


def vit_small_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-S/16: D 384, depth 12, 6 heads (kwargs as :func:`vit_tiny_patch16`)."""
    return _build('vit_small_patch16', **kwargs)


def vit_base_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-B/16: D 768, depth 12, 12 heads (kwargs as :func:`vit_tiny_patch16`)."""
    return _build('vit_base_patch16', **kwargs)


def vit_large_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-L/16: D 1024, depth 24, 16 heads (kwargs as :func:`vit_tiny_patch16`)."""
    return _build('vit_large_patch16', **kwargs)


def vit_huge_patch14(**kwargs: Any) -> VisionTransformer:
    """ViT-H/14: D 1280, depth 32, 16 heads (kwargs as :func:`vit_tiny_patch16`)."""
    return _build('vit_huge_patch14', **kwargs)


def vit_name(name: Optional[str]) -> Optional[str]:
    """Evaluation model name for a pre-training (``MIM_vit_base_patch16``, MAE's ``mae_vit_base_patch16``) or timm
    (``vit_base_patch16_224``) name, or None."""
    if not isinstance(name, str):
        return None
    base = re.sub(r'_\d+$', '', re.sub(r'^(MIM_|mae_)', '', name))
    return base if base in VIT_CONFIGS else None


def create_model(name: str, **kwargs: Any) -> VisionTransformer:
    """Build an evaluation ViT by name; ``None`` kwargs mean "the factory's default".

    A pre-training name (``MIM_vit_base_patch16``) selects the matching encoder, since the mapping is unambiguous.
    """
    base = vit_name(name)
    if base is None:
        raise UserError(f"--model {name!r} is not an evaluation model; choose one of {', '.join(MODEL_NAMES)}")
    return globals()[base](**{k: v for k, v in kwargs.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------------------
# Shapes and features


def model_arch(model: VisionTransformer) -> Dict[str, int]:
    """patch_size, embed_dim, depth, num_heads and img_size of a timm ViT."""
    return dict(patch_size=int(model.patch_embed.patch_size[0]), embed_dim=int(model.embed_dim),
                depth=len(model.blocks), num_heads=int(model.blocks[0].attn.num_heads),
                img_size=int(model.patch_embed.img_size[0]))


def encoder_features(model: VisionTransformer, x: torch.Tensor, pool: str = 'token') -> torch.Tensor:
    """Image features for k-NN: x [B,3,H,W] → [B,D].

    ``pool='token'``: the cls token after the final norm (DINO convention). ``'avg'``: the mean of the patch tokens
    after the final norm (for a LocalMIM encoder, the last stage norm). Needs a token-pool model (``norm`` set).
    """
    tokens = model.forward_features(x)
    if pool == 'token':
        return tokens[:, 0]
    return tokens[:, model.num_prefix_tokens:].mean(dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay


def mae_layer_id(name: str, num_layers: int) -> int:
    """MAE's ``get_layer_id_for_vit``: embeddings 0, ``blocks.k`` k+1, everything else (norms, head) num_layers."""
    if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed'):
        return 0
    m = re.match(r'^blocks\.(\d+)\.', name)
    if m:
        return int(m.group(1)) + 1
    return num_layers


def layer_decay_param_groups(model: VisionTransformer, weight_decay: float, layer_decay: float,
                             verbose: bool = False) -> List[Dict[str, Any]]:
    """MAE's layer-decay param groups (scale ``layer_decay^(L+1-layer_id)``, L = depth) via timm's
    ``param_groups_layer_decay``, checked parameter by parameter against :func:`mae_layer_id`.

    timm 1.0 puts the final ``norm`` of a token-pool model in the last block's group (MAE: the top group, scale 1);
    such parameters are moved to the group MAE would give them. No weight decay for 1-D tensors and
    ``model.no_weight_decay()`` (pos_embed, cls_token).
    """
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                      no_weight_decay_list=tuple(model.no_weight_decay()))
    names = {id(p): n for n, p in model.named_parameters()}
    num_layers = len(model.blocks) + 1
    fixed: Dict[Tuple[float, float], Dict[str, Any]] = OrderedDict()
    moved = []
    for g in groups:
        for p in g['params']:
            n = names[id(p)]
            scale = layer_decay ** (num_layers - mae_layer_id(n, num_layers))
            if not math.isclose(g['lr_scale'], scale, rel_tol=1e-9):
                moved.append(n)
            key = (scale, g['weight_decay'])
            fixed.setdefault(key, dict(lr_scale=scale, weight_decay=g['weight_decay'], params=[]))['params'].append(p)
    if moved and verbose:
        print(f'layer decay: moved {", ".join(moved)} to the MAE group (timm groups them with the last block)')
    return list(fixed.values())


# ---------------------------------------------------------------------------------------------------------------------
# FreezeOut seam for fine-tuning (units / set_frozen on a plain timm ViT, without subclassing it)


class FreezableBlocks(nn.Sequential):
    """``model.blocks`` whose first ``num_frozen`` blocks run without training them, however they are called.

    Same children (``blocks.0 …``: state-dict keys unchanged). With ``embed_frozen`` every frozen block runs under
    ``no_grad`` (nothing before it trains: no activations kept, no backward); otherwise (``--dont_freeze_pe``) the
    frozen blocks keep the graph so gradients reach the embedding. The grad mode is set by a forward pre-hook and
    restored by a forward hook on each block (``always_call``: also when the block raises), not by this container's
    forward: timm calls ``self.blocks(x)`` only on its plain path and loops over the blocks itself under grad
    checkpointing (``checkpoint_seq``), with an attention mask and in ``forward_intermediates``. Frozen blocks stay
    in eval mode through ``train()``: drop path off, so their function does not change at the freeze.
    """

    def __init__(self, blocks: nn.Sequential):
        super().__init__(*blocks)
        self.num_frozen, self.embed_frozen = 0, False
        self._saved_modes: List[Optional[bool]] = []  # grad mode before each frozen block now running (a stack)
        for b, blk in enumerate(self):
            blk.register_forward_pre_hook(partial(FreezableBlocks._enter, self, b))
            blk.register_forward_hook(partial(FreezableBlocks._leave, self), always_call=True)

    def _enter(self, index: int, module: nn.Module, args: Any) -> None:
        if self.embed_frozen and index < self.num_frozen:
            self._saved_modes.append(torch.is_grad_enabled())
            torch.set_grad_enabled(False)
        else:
            self._saved_modes.append(None)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        mode = self._saved_modes.pop() if self._saved_modes else None
        if mode is not None:
            torch.set_grad_enabled(mode)

    def train(self, mode: bool = True) -> 'FreezableBlocks':
        super().train(mode)
        for b in range(min(self.num_frozen, len(self))):
            self[b].eval()
        return self


class ViTUnits:
    """FreezeOut units of a timm ViT for ``freezeout.FreezeOut`` / ``AdaptiveFreezeOut`` (which see only this).

    Unit 0 = patch embedding + cls token + pos embed; unit k = ``blocks.{k-1}``. ``fc_norm``, ``norm`` and
    ``head`` are in no unit: they are never frozen and follow the global schedule (× their layer-decay scale).
    Installing the seam swaps ``model.blocks`` for a :class:`FreezableBlocks` with the same children.
    """

    def __init__(self, model: VisionTransformer):
        self.model = model
        if not isinstance(model.blocks, FreezableBlocks):
            model.blocks = FreezableBlocks(model.blocks)

    def units(self) -> List[Any]:
        from models_mim import ParamUnit
        named = dict(self.model.named_parameters())
        embed = ('patch_embed.', 'cls_token', 'pos_embed', 'reg_token')
        units = [ParamUnit('embed', {n: p for n, p in named.items() if n.startswith(embed) and p.requires_grad})]
        for b in range(len(self.model.blocks)):
            units.append(ParamUnit(f'block{b + 1}', {n: p for n, p in named.items()
                                                     if n.startswith(f'blocks.{b}.') and p.requires_grad}))
        return units

    @torch.no_grad()
    def unit_features(self, imgs: torch.Tensor) -> List[torch.Tensor]:
        """Output of every unit on ``imgs`` (the adaptive policy's ``output`` probe); call in eval mode."""
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(imgs))))
        out = [x]
        for blk in m.blocks:
            x = blk(x)
            out.append(x)
        return out

    def set_frozen(self, num_frozen_blocks: int, embed_frozen: bool) -> None:
        blocks = self.model.blocks
        blocks.num_frozen, blocks.embed_frozen = int(num_frozen_blocks), bool(embed_frozen)
        blocks.train(self.model.training)
