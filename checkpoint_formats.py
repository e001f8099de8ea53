"""Checkpoint formats: reading pre-training / fine-tuning / probe / export checkpoints (ours, MAE, LocalMIM,
ViTFreeze) into the evaluation ViTs of :mod:`models_vit`, and what a checkpoint says about its architecture.

LocalMIM checkpoints have no single final norm but one LayerNorm per tapped stage, ``norm.0 … norm.{S-1}``; the last
one is applied after the last block, so it *is* the encoder's final norm (LOCALMIM.md §1.2, §3.4). Loading maps
``norm.{S-1}.* → norm.*`` for token models and, for average-pool models, leaves the new ``fc_norm`` at its fresh
init exactly as MAE does (the pre-trained norm is not used there). Decoders, HOG buffers, mask tokens and the other
stage norms are ignored and reported.

A top-level module (not in ``util/``) because it builds :mod:`models_vit` models.

Public API:
    read_checkpoint(path, flag)                          load a file (weights-only; pickled Namespace args allowed)
    state_dict_from_checkpoint(ckpt, where)              the model tensors of any supported layout
    load_pretrained(model, path, flag, head_init_std)   --finetune
    load_encoder_state(model, sd, where, ...)            a state dict into a timm ViT, checked, with a LoadReport
    encoder_from_mim_state(state_dict, mim_args)        current pre-training encoder as a timm ViT (online k-NN)
    encoder_from_mim_model(mim_model)                    the same from a live models_mim.LocalMIM
    arch_from_args(ckpt_args) / arch_from_state(sd)      architecture recorded in args / visible in the tensors
    checkpoint_args(ckpt)                                a checkpoint's args as a dict
    checkpoint_arch(ckpt, path) / resolve_arch(...)      architecture of a checkpoint, with where each number came
                                                         from, and the architecture to build (typed flags win)
"""
import argparse
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from models_vit import ARCH_KEYS, VIT_CONFIGS, create_model, model_arch, vit_name
from util import distributed as du
from util.checkpoint import load_checkpoint
from util.errors import UserError

__all__ = ['read_checkpoint', 'fold_probe_head', 'state_dict_from_checkpoint', 'LoadReport', 'load_encoder_state',
           'load_pretrained', 'encoder_from_mim_state', 'encoder_from_mim_model', 'arch_from_args',
           'arch_from_state', 'checkpoint_args', 'checkpoint_arch', 'resolve_arch', 'describe_arch', 'ARCH_FLAGS',
           'expected_stages', 'adopt_reference_pretrain']

_ENCODER_PREFIXES = ('cls_token', 'pos_embed', 'patch_embed.', 'blocks.', 'norm.', 'fc_norm.', 'head.')


# ---------------------------------------------------------------------------------------------------------------------
# Architecture recorded in a checkpoint


def arch_from_args(ckpt_args: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Architecture recorded in a checkpoint's ``args``: ``model`` (evaluation name) and ``patch_size``,
    ``embed_dim``, ``depth``, ``num_heads``, ``input_size`` where known. Empty if the args name no known model."""
    if not isinstance(ckpt_args, dict) or not isinstance(ckpt_args.get('model'), str):
        return {}
    name = vit_name(ckpt_args['model'])
    if name is None:
        return {}
    out: Dict[str, Any] = dict(model=name, **VIT_CONFIGS[name])
    for k in ARCH_KEYS + ('input_size',):
        if ckpt_args.get(k) is not None:
            out[k] = ckpt_args[k]
    return out


def arch_from_state(sd: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """What the tensors themselves say: embed_dim, depth, patch_size, grid (num_heads is not visible in shapes)."""
    out: Dict[str, int] = {}
    w = sd.get('patch_embed.proj.weight')
    if w is not None and w.ndim == 4:
        out['embed_dim'], out['patch_size'] = int(w.shape[0]), int(w.shape[-1])
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r'^blocks\.(\d+)\.', k))}
    if blocks:
        out['depth'] = max(blocks) + 1
    pe = sd.get('pos_embed')
    if pe is not None and pe.ndim == 3:
        g = math.isqrt(pe.shape[1] - 1)
        if g * g == pe.shape[1] - 1:
            out['grid'] = g
    return out


def _heads_hint(ckpt_args: Optional[Dict[str, Any]], have: Dict[str, int]) -> Optional[int]:
    """num_heads of a checkpoint: recorded explicitly, or the named model's default when width and depth show
    that the named config was not overridden; None if unknown."""
    if isinstance(ckpt_args, dict) and ckpt_args.get('num_heads') is not None:
        return int(ckpt_args['num_heads'])
    hint = arch_from_args(ckpt_args)
    base = VIT_CONFIGS.get(hint.get('model', ''))
    if base and have.get('embed_dim') == base['embed_dim'] and have.get('depth') == base['depth']:
        return base['num_heads']
    return None


def _describe(arch: Dict[str, Any]) -> str:
    keys = [k for k in ('embed_dim', 'depth', 'num_heads', 'patch_size') if k in arch]
    return ', '.join(f'{k}={arch[k]}' for k in keys)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint reading


def read_checkpoint(path: str, flag: str = '--finetune') -> Dict[str, Any]:
    """Load ``path`` weights-only (MAE/LocalMIM files that pickled an ``argparse.Namespace`` are allowed too)."""
    try:
        return load_checkpoint(path, flag=flag)
    except UserError:
        if not os.path.isfile(path):
            raise
        with open(path, 'rb') as f:
            magic = f.read(4)
        if magic[:2] != b'PK' and magic[:1] != b'\x80':  # torch.save writes a zip archive (legacy: a pickle)
            raise UserError(f'{flag} {path}: not a PyTorch checkpoint (not written by torch.save); pass a '
                            f'checkpoint-N.pth from pre-training or fine-tuning') from None
        raise


def fold_probe_head(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A linear probe's BN(affine=False, eps 1e-6, eval statistics) + Linear as one exact Linear: W/σ, b − W·μ/σ."""
    mean, var = sd['head.0.running_mean'].double(), sd['head.0.running_var'].double()
    w, b = sd['head.1.weight'].double(), sd['head.1.bias'].double()
    inv = (var + 1e-6).rsqrt()
    return {'head.weight': (w * inv).float(), 'head.bias': (b - (w * inv) @ mean).float()}


def state_dict_from_checkpoint(ckpt: Dict[str, Any], where: str) -> Dict[str, torch.Tensor]:
    """The model tensors of a checkpoint: ``ckpt['model']``, ``ckpt['state_dict']`` or a raw state dict, with the
    ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes stripped; a linear-probe checkpoint's
    ``encoder.*`` becomes the encoder and its BN + Linear head one folded ``head``."""
    sd: Any = None
    for key in ('model', 'state_dict', 'module'):
        if isinstance(ckpt.get(key), dict):
            sd = ckpt[key]
            break
    if sd is None and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = ckpt
    if sd is None:
        raise UserError(f"{where}: no model weights in this file (keys: {', '.join(list(map(str, ckpt))[:8])}); "
                        f"expected a training checkpoint with 'model' or a raw state dict")
    out = OrderedDict()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ('module.', '_orig_mod.'):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    if any(k.startswith('encoder.blocks.') for k in out):  # run_linprobe.py: encoder.* + BN(affine=False)/Linear head
        probe = out
        out = OrderedDict((k[len('encoder.'):], v) for k, v in probe.items() if k.startswith('encoder.'))
        if all(f'head.{k}' in probe for k in ('0.running_mean', '0.running_var', '1.weight', '1.bias')):
            out.update(fold_probe_head(probe))
    if not any(k.startswith('blocks.') for k in out) or 'patch_embed.proj.weight' not in out:
        raise UserError(f'{where}: not a ViT checkpoint (no patch_embed/blocks weights); pass a pre-training or '
                        f'fine-tuning checkpoint of this project, MAE or LocalMIM')
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Loading an encoder


@dataclass
class LoadReport:
    """What :func:`load_encoder_state` did; ``missing`` are model keys left at their init."""
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    head_loaded: bool = False
    final_norm: str = ''  # the checkpoint's norm loaded as the model's final ``norm`` ('' when none)


def _summarise(keys: List[str], limit: int = 6) -> str:
    """``decoder.*`` (72), ``hog.bias`` ... : one entry per top-level module."""
    groups: Dict[str, int] = OrderedDict()
    for k in keys:
        top = k.split('.')[0]
        if top == 'norm' and re.match(r'^norm\.\d+\.', k):
            top = 'norm.' + k.split('.')[1]
        groups[top] = groups.get(top, 0) + 1
    parts = [f'{g}.* ({n})' if n > 1 else g for g, n in groups.items()]
    return ', '.join(parts[:limit]) + (f', … ({len(parts) - limit} more)' if len(parts) > limit else '')


def expected_stages(ckpt_args: Optional[Dict[str, Any]], depth: int) -> Optional[int]:
    """Number of LocalMIM stages the pre-training that wrote ``ckpt_args`` had (4 taps, or one per block with
    ``all_stages``); None when the args are not a LocalMIM/ViTFreeze/our pre-training's."""
    if not isinstance(ckpt_args, dict) or not str(ckpt_args.get('model', '')).startswith('MIM_'):
        return None
    return depth if ckpt_args.get('all_stages') else 4


def _stage_norm_detail(present: List[int], expected: Optional[int]) -> str:
    """Which stage the deepest stage norm of a checkpoint is. ViTFreeze deletes the norm, decoder and HOG layer
    of a stage whose feeding block froze from its ``nn.ModuleList``s, which renumbers the rest from 0: its frozen
    runs' checkpoints hold ``norm.0 … norm.{P-1}`` of the P deepest stages, ``norm.{P-1}`` being the last block's."""
    if expected is None or len(present) == expected:
        return ''
    if len(present) < expected and present == list(range(len(present))):
        return (f'; {expected - len(present)} of the {expected} stages have no norm, decoder or HOG layer here '
                f'(ViTFreeze removes those of stages that froze and renumbers the rest), so norm.{present[-1]} is '
                f'stage {expected} of {expected}')
    return f'; the deepest of the {len(present)} stage norms present ({expected} stages recorded)'


def _map_final_norm(sd: Dict[str, torch.Tensor], model: VisionTransformer, report: LoadReport,
                    ckpt_args: Optional[Dict[str, Any]] = None) -> None:
    """LocalMIM ``norm.{S-1}`` → ``norm`` for token models; drop every pre-trained final norm for avg-pool models.

    The final norm is the deepest stage norm present, the one applied after the last block (also in ViTFreeze's
    renumbered frozen checkpoints, see :func:`_stage_norm_detail`); which one was used is always reported."""
    stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r'^norm\.(\d+)\.weight$', k))})
    detail = ''
    if stages:
        depth = arch_from_state(sd).get('depth', 0)
        detail = _stage_norm_detail(stages, expected_stages(ckpt_args, depth))
    if stages:
        last = stages[-1]
        final = {s: sd[f'norm.{last}.{s}'] for s in ('weight', 'bias') if f'norm.{last}.{s}' in sd}
        for k in [k for k in sd if re.match(r'^norm\.\d+\.', k)]:
            if not k.startswith(f'norm.{last}.'):
                report.ignored.append(k)
            del sd[k]
        src = f'norm.{last}'
    else:
        final = {s: sd.pop(f'norm.{s}') for s in ('weight', 'bias') if f'norm.{s}' in sd}
        src = 'norm'
    if not final:
        return
    what = f'stage norm {src} (after the last block)' if stages else "the checkpoint's final norm 'norm'"
    if not isinstance(model.norm, nn.Identity):
        sd.update({f'norm.{s}': v for s, v in final.items()})
        report.final_norm = src
        report.notes.append(f'{what} loaded as the final norm{detail}')
    else:
        # MAE semantics for global pooling: fc_norm starts fresh, the pre-trained final norm is not used.
        report.ignored += [f'{src}.{s}' for s in final]
        report.notes.append(f'global pool: {what} not used, fc_norm starts fresh (MAE convention){detail}')


def _check_arch(sd: Dict[str, torch.Tensor], model: VisionTransformer, where: str,
                ckpt_args: Optional[Dict[str, Any]]) -> None:
    have, want = arch_from_state(sd), model_arch(model)
    hint = arch_from_args(ckpt_args)
    heads = _heads_hint(ckpt_args, have)
    if heads is not None:
        have['num_heads'] = heads
    bad = [k for k in ('embed_dim', 'depth', 'patch_size', 'num_heads') if k in have and have[k] != want[k]]
    msd = model.state_dict()
    if not bad:
        bad = [f'{k} {tuple(v.shape)} vs {tuple(msd[k].shape)}' for k, v in sd.items()
               if k in msd and k not in ('pos_embed',) and not k.startswith('head.') and v.shape != msd[k].shape]
    if bad:
        model_txt = f" (it was trained as --model {ckpt_args['model']})" if hint else ''
        raise UserError(f'{where}: checkpoint architecture does not match the model: checkpoint has '
                        f'{_describe(have)}, model has {_describe(want)}; pass matching --model/--embed_dim/'
                        f'--depth/--num_heads/--patch_size{model_txt}')


def _resample_pos_embed(sd: Dict[str, torch.Tensor], model: VisionTransformer, where: str,
                        report: LoadReport) -> None:
    pe = sd.get('pos_embed')
    if pe is None:
        return
    target = model.pos_embed
    if pe.shape == target.shape:
        return
    prefix = model.num_prefix_tokens
    old = math.isqrt(pe.shape[1] - prefix)
    if old * old != pe.shape[1] - prefix or pe.shape[2] != target.shape[2]:
        raise UserError(f'{where}: pos_embed {tuple(pe.shape)} is not a square grid of width {target.shape[2]}; '
                        f'cannot adapt it to {tuple(target.shape)}')
    new = tuple(int(g) for g in model.patch_embed.grid_size)
    # MAE's interpolate_pos_embed: bicubic, align_corners=False, no antialiasing. timm's default antialias=True is
    # PIL-style antialiased bicubic, another filter even when enlarging (up to 5e-2 off on a random 8x8 -> 12x12)
    sd['pos_embed'] = resample_abs_pos_embed(pe, new_size=list(new), old_size=[old, old], num_prefix_tokens=prefix,
                                             interpolation='bicubic', antialias=False)
    report.notes.append(f'pos_embed resampled from a {old}x{old} to a {new[0]}x{new[1]} patch grid (bicubic, as MAE)')


def load_encoder_state(model: VisionTransformer, state_dict: Dict[str, torch.Tensor], where: str = 'checkpoint',
                       ckpt_args: Optional[Dict[str, Any]] = None, head_init_std: Optional[float] = 2e-5,
                       verbose: bool = True) -> LoadReport:
    """Load an encoder state dict (LocalMIM, MAE, or our fine-tuned) into a timm ViT, non-strictly but checked.

    Args:
        model: target timm ViT (``global_pool`` 'avg' or 'token').
        state_dict: checkpoint tensors (see :func:`state_dict_from_checkpoint`); not modified.
        where: ``'--finetune PATH'``-style prefix for messages.
        ckpt_args: the checkpoint's ``args`` dict (used for num_heads, which shapes cannot reveal).
        head_init_std: if the head is not loaded, re-initialise ``head.weight`` ~ trunc-normal(std) and zero the bias
            (MAE: 2e-5 for fine-tuning, 0.01 for linear probing); None leaves timm's init.
        verbose: print the report.

    Raises:
        UserError: another architecture (width, depth, patch size, heads) or a non-square pos_embed.
    """
    sd = OrderedDict(state_dict)
    report = LoadReport()
    report.ignored = [k for k in sd if not k.startswith(_ENCODER_PREFIXES)]
    for k in report.ignored:
        del sd[k]
    _check_arch(sd, model, where, ckpt_args)
    _map_final_norm(sd, model, report, ckpt_args)
    msd = model.state_dict()
    for k in [k for k in sd if k.startswith('fc_norm.') and k not in msd]:
        report.ignored.append(k)
        del sd[k]
    head_ok = isinstance(model.head, nn.Linear) and all(
        f'head.{s}' in sd and sd[f'head.{s}'].shape == msd[f'head.{s}'].shape for s in ('weight', 'bias'))
    for k in [k for k in sd if k.startswith('head.')]:
        if not head_ok:
            report.ignored.append(k)
            del sd[k]
    if not head_ok and any(k.startswith('head.') for k in state_dict):
        report.notes.append('checkpoint head not used (different number of classes or no linear head)')
    _resample_pos_embed(sd, model, where, report)
    result = model.load_state_dict(sd, strict=False)
    report.loaded = list(sd)
    report.missing = list(result.missing_keys)
    report.head_loaded = head_ok
    if result.unexpected_keys:  # filtered above; anything left is a mapping bug, not a user error
        raise RuntimeError(f'unexpected keys after mapping: {result.unexpected_keys}')
    if not head_ok and head_init_std is not None and isinstance(model.head, nn.Linear):
        trunc_normal_(model.head.weight, std=head_init_std)
        nn.init.zeros_(model.head.bias)
    if verbose:
        print(f'{where}: loaded {len(report.loaded)} tensors; missing (fresh init): {report.missing or "none"}; '
              f'ignored: {_summarise(report.ignored) or "none"}', flush=True)
        for note in report.notes:
            print(f'  {note}', flush=True)
    unexpected_missing = [k for k in report.missing if not k.startswith(('head.', 'fc_norm.'))]
    if unexpected_missing:
        print(f'warning: {where}: {_summarise(unexpected_missing)} not in the checkpoint; left at random init',
              flush=True)
    return report


def checkpoint_args(ckpt: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """A checkpoint's ``args`` as a dict (ours store a dict; MAE/LocalMIM pickled a Namespace)."""
    a = ckpt.get('args')
    if isinstance(a, argparse.Namespace):
        return vars(a)
    return a if isinstance(a, dict) else None


ARCH_FLAGS = ('model',) + ARCH_KEYS + ('input_size',)
_WIDTH_PRESETS = {cfg['embed_dim']: name for name, cfg in VIT_CONFIGS.items()}  # every preset width is unique


def _recipe_args(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """The ``PATH.json`` recipe that ``tools/export.py`` writes next to an export, as checkpoint-style args."""
    if not path or not os.path.isfile(path + '.json'):
        return None
    try:
        with open(path + '.json') as f:
            spec = json.load(f)
        kw = dict(spec.get('kwargs', {}))
        out = dict(model=str(spec['timm_model']))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    base = vit_name(out['model'])
    if base is None:
        return None
    cfg = VIT_CONFIGS[base]
    out.update({k: int(kw.get(k, cfg[k])) for k in ARCH_KEYS})
    if 'img_size' in kw:
        out['input_size'] = int(kw['img_size'])
    return out


def checkpoint_arch(ckpt: Dict[str, Any], path: Optional[str] = None) -> Dict[str, Tuple[Any, str]]:
    """What a checkpoint says about its architecture: ``{flag: (value, source)}`` for the flags it reveals.

    Sources: ``tensor shapes`` (embed_dim, depth, patch_size, and input_size = pos_embed grid x patch: they win over
    anything recorded), ``checkpoint args`` (ours: a dict; MAE/LocalMIM: a pickled Namespace), ``export recipe``
    (the ``PATH.json`` of ``tools/export.py``), and for num_heads, which no shape shows, the named model's preset
    when width and depth are that preset's, else the standard ViT of that width (192 → 3, 384 → 6, 768 → 12,
    1024 / 1280 → 16). A width no standard ViT has leaves num_heads out.
    """
    cargs, label = checkpoint_args(ckpt), 'checkpoint args'
    if cargs is None:
        cargs, label = _recipe_args(path), 'export recipe'
    cargs = cargs or {}
    out: Dict[str, Tuple[Any, str]] = {}
    name = vit_name(cargs['model']) if isinstance(cargs.get('model'), str) else None
    if name:
        out['model'] = (name, label)
    for k in ARCH_KEYS + ('input_size',):
        if isinstance(cargs.get(k), int) and not isinstance(cargs.get(k), bool):
            out[k] = (int(cargs[k]), label)
    try:
        have = arch_from_state(state_dict_from_checkpoint(ckpt, 'checkpoint'))
    except UserError:
        have = {}
    for k in ('embed_dim', 'depth', 'patch_size'):
        if k in have:
            out[k] = (have[k], 'tensor shapes')
    if 'grid' in have and 'patch_size' in have and 'input_size' not in out:
        out['input_size'] = (have['grid'] * have['patch_size'], 'tensor shapes')
    width, depth = have.get('embed_dim'), have.get('depth')
    if 'num_heads' not in out:
        cfg = VIT_CONFIGS.get(name or '')
        if cfg and (width, depth) == (cfg['embed_dim'], cfg['depth']):
            out['num_heads'] = (cfg['num_heads'], f'{label}: {name} preset')
        elif width in _WIDTH_PRESETS:
            out['num_heads'] = (VIT_CONFIGS[_WIDTH_PRESETS[width]]['num_heads'],
                                f'width {width} = {_WIDTH_PRESETS[width]}')
    if 'model' not in out and width is not None:
        same = [n for n, c in VIT_CONFIGS.items() if (c['embed_dim'], c['depth']) == (width, depth)]
        if same or width in _WIDTH_PRESETS:
            out['model'] = (same[0] if same else _WIDTH_PRESETS[width], 'tensor shapes')
    return out


def resolve_arch(found: Dict[str, Tuple[Any, str]], typed: Dict[str, Any], current: Dict[str, Any], where: str,
                 default_model: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """The architecture to build: ``(values, sources)`` for :data:`ARCH_FLAGS`.

    ``typed`` are the flags on the command line (they win), ``found`` is :func:`checkpoint_arch` of the checkpoint
    (``{}`` without one), ``current`` the values the others have now (defaults, ``--demo``). A typed ``--model`` of
    another family than the checkpoint's keeps that model's own shapes, so the load reports the mismatch. A shape
    nobody gave is the model preset's; but heads are never guessed for a width that is not the preset's: that
    is a UserError asking for ``--num_heads``.
    """
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for k, v in typed.items():
        values[k], sources[k] = v, 'typed'
    model_found = found.get('model', (None, ''))[0]
    other_family = 'model' in typed and model_found is not None and vit_name(typed['model']) != model_found
    for k, (v, src) in found.items():
        if k in values or (other_family and k != 'input_size'):
            continue
        values[k], sources[k] = v, src
    if values.get('model') is None:
        values['model'], sources['model'] = current.get('model') or default_model, 'default'
    name = vit_name(values['model']) or values['model']
    preset = VIT_CONFIGS.get(name, {})
    for k in ARCH_KEYS + ('input_size',):
        if k in values:
            continue
        if current.get(k) is not None:
            values[k], sources[k] = current[k], 'default'
        elif k == 'num_heads' and values.get('embed_dim', preset.get('embed_dim')) != preset.get('embed_dim'):
            raise UserError(f"{where}: the number of attention heads is not recorded and width "
                            f"{values['embed_dim']} is no standard ViT's ({', '.join(map(str, sorted(_WIDTH_PRESETS)))})"
                            f"; pass --num_heads")
        elif k in preset:
            values[k], sources[k] = preset[k], f'{name} preset'
    return values, sources


def describe_arch(values: Dict[str, Any], sources: Dict[str, str]) -> str:
    """``architecture: model vit_tiny_patch16 (typed), patch_size 4 (tensor shapes), ...``"""
    return 'architecture: ' + ', '.join(f'{k} {values[k]} ({sources[k]})' for k in ARCH_FLAGS if k in values)


def load_pretrained(model: VisionTransformer, path: str, flag: str = '--finetune',
                    head_init_std: Optional[float] = 2e-5, verbose: bool = True,
                    ckpt: Optional[Dict[str, Any]] = None) -> Tuple[LoadReport, Dict[str, Any]]:
    """``--finetune PATH``: load a pre-training (LocalMIM/FreezeOut/MAE) or fine-tuning checkpoint's encoder.

    ``ckpt`` is the already-read file, if the caller has it. Returns ``(report, checkpoint dict)``. Raises
    UserError for a missing/unreadable/non-ViT file or another architecture. See :func:`load_encoder_state` for the
    mapping and ``head_init_std`` (MAE: 2e-5 fine-tuning, 0.01 linear probe).
    """
    if ckpt is None:
        ckpt = read_checkpoint(path, flag)
    where = f'{flag} {path}'
    sd = state_dict_from_checkpoint(ckpt, where)
    report = load_encoder_state(model, sd, where, checkpoint_args(ckpt), head_init_std, verbose)
    return report, ckpt


def encoder_from_mim_state(mim_state_dict: Dict[str, torch.Tensor], mim_args: Optional[Dict[str, Any]] = None,
                           num_heads: Optional[int] = None) -> VisionTransformer:
    """The encoder of a LocalMIM state dict as a timm ViT (cls-token pooling, final norm = last stage norm, no head).

    Width, depth, patch size and input size are read from the tensors; ``num_heads`` from the argument, else
    ``mim_args`` (``num_heads`` or the model name's default). Meant for online k-NN during pre-training; call
    ``.to(device).eval()`` on the result. Tensors are copied, so the pre-training model is not aliased.
    """
    sd = state_dict_from_checkpoint(dict(model=mim_state_dict), 'pre-training state')
    arch = arch_from_state(sd)
    hint = arch_from_args(mim_args)
    heads = num_heads or _heads_hint(mim_args, arch)
    if heads is None:
        raise UserError('encoder_from_mim_state: num_heads unknown (no args with a model name); pass num_heads')
    name = hint.get('model', 'vit_base_patch16')
    model = create_model(name, img_size=arch['grid'] * arch['patch_size'], patch_size=arch['patch_size'],
                         embed_dim=arch['embed_dim'], depth=arch['depth'], num_heads=int(heads), num_classes=0,
                         global_pool='token')
    load_encoder_state(model, sd, 'pre-training state', None, None, verbose=False)
    return model


def encoder_from_mim_model(mim_model: nn.Module) -> VisionTransformer:
    """:func:`encoder_from_mim_state` for a live ``models_mim.LocalMIM`` (unwrap DDP first), on its device."""
    heads = int(mim_model.blocks[0].attn.num_heads)
    device = mim_model.cls_token.device
    return encoder_from_mim_state(mim_model.state_dict(), None, num_heads=heads).to(device)




# ---------------------------------------------------------------------------------------------------------------------
# Resuming a LocalMIM or ViTFreeze pre-training checkpoint (run_pretrain.py --resume)
#
# Their run_pretrain.py saves {model, optimizer, epoch, scaler, args (a Namespace)}. The model's keys are ours except
# the HOG layers: ``hog_enc.k.conv.weight`` (the fixed Sobel pair; ours is a non-persistent buffer) and, with
# --hog_bias, ``hog_enc.k.conv.bias`` (ours: row k of the HOG target's ``bias``). LocalMIM's optimizer is timm's
# add_weight_decay: [no decay (ndim <= 1 or .bias), decay] over the trainable parameters in model order. ViTFreeze's
# FreezeOut optimizer (util/freezeout_utils.create_param_groups) has one group per parameter, those of FreezeOut
# layers first (tagged ``layer_index``: patch embed 0, block b b+1, a stage's norm/decoder its block's), then the
# rest (cls_token; patch embed under --dont_freeze_pe); a layer's groups and their state are deleted when it freezes,
# and the norm, decoder and HOG layer of a stage whose block froze are deleted from the model's ModuleLists, which
# renumbers the remaining stages from 0.

_REF_FIXED = re.compile(r'^(pos_embed|decoder\.\d+\.pos_embed|hog_enc\..*)$')  # requires_grad=False there


def _strip_prefixes(k: str) -> str:
    for prefix in ('module.', '_orig_mod.'):
        while k.startswith(prefix):
            k = k[len(prefix):]
    return k


def _names(keys: List[str], limit: int = 4) -> str:
    return ', '.join(keys[:limit]) + (f' and {len(keys) - limit} more' if len(keys) > limit else '')


def adopt_reference_pretrain(path: str, ckpt: Dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                             freezer: Optional[Any], steps_per_epoch: int) -> Dict[str, Any]:
    """``--resume`` of a LocalMIM or ViTFreeze pre-training checkpoint: the same checkpoint in this toolkit's layout,
    or a one-line UserError naming what is missing. Any other checkpoint is returned unchanged.

    Continued: the model (the removed stages' norms/decoders of a frozen ViTFreeze run keep this model's init; those
    stages are off), the AdamW state of every parameter that still trains (matched by name), the epoch and the
    scaler. The freeze state is recomputed from this run's schedule at the resumed optimizer step (``(epoch + 1) x
    steps_per_epoch``) and must freeze exactly the units, and switch off exactly the stages, the checkpoint had
    frozen. Not saved there, so not restored: the RNG state (the continuation is not bit-exact).

    Call after the optimizer is built and before the resume applies ``ckpt``; it applies the freeze state to
    ``model``/``optimizer`` itself (idempotent when applied again from the returned ``freezeout``).
    """
    sd = OrderedDict((_strip_prefixes(k), v) for k, v in (ckpt.get('model') or {}).items()
                     if isinstance(v, torch.Tensor))
    if not any(k.startswith('hog_enc.') for k in sd):
        return ckpt
    ns = checkpoint_args(ckpt) or {}
    opt = ckpt.get('optimizer')
    groups = opt.get('param_groups', []) if isinstance(opt, dict) else []
    layerwise = any('layer_index' in g for g in groups)
    name = 'ViTFreeze' if layerwise or any(k in ns for k in ('how_scale', 't_0')) else 'LocalMIM'

    def refuse(why: str) -> None:
        raise UserError(f'--resume {path}: this {name} pre-training checkpoint cannot be continued here: {why}')

    lacking = [k for k in ('optimizer', 'epoch') if k not in ckpt or (k == 'optimizer' and not groups)]
    if lacking:
        refuse(f"it has no {' and no '.join(lacking)} (a released model, not a training checkpoint); evaluate it "
               f"with --finetune {path} in run_knn.py / run_linprobe.py / run_finetune.py")
    epoch = int(ckpt['epoch'])
    stage_blocks = list(model.stage_blocks)
    present = sorted({int(m.group(1)) for k in sd if (m := re.match(r'^norm\.(\d+)\.weight$', k))})
    depth = arch_from_state(sd).get('depth', 0)
    theirs = depth if ns.get('all_stages') else 4
    if theirs != len(stage_blocks) or present != list(range(len(present))) or len(present) > theirs:
        refuse(f"it has {theirs} stages (norms {', '.join(f'norm.{i}' for i in present)}), this model "
               f"{len(stage_blocks)}; resume with the run's --model/--depth/--all_stages (a reference run has no "
               f"--stage_taps)")
    removed = theirs - len(present)  # frozen stages ViTFreeze deleted; the rest were renumbered from 0

    def ours(k: str) -> str:
        m = re.match(r'^(norm|decoder)\.(\d+)\.(.*)$', k)
        return f'{m.group(1)}.{int(m.group(2)) + removed}.{m.group(3)}' if m else k

    # ---- the parameters their optimizer holds, by (our) name
    pe_free = bool(ns.get('dont_freeze_pe'))
    if freezer is not None and freezer.dont_freeze_pe != pe_free:
        refuse(f"it was trained {'with' if pe_free else 'without'} --dont_freeze_pe; resume "
               f"{'with' if pe_free else 'without'} it")

    def layer(n: str) -> Optional[int]:  # ViTFreeze's layer_index of a parameter (None: not a FreezeOut layer)
        if n.startswith('patch_embed.'):
            return None if pe_free else 0
        m = re.match(r'^blocks\.(\d+)\.', n) or re.match(r'^(?:norm|decoder)\.(\d+)\.', n)
        if not m:
            return None
        block = int(m.group(1)) if n.startswith('blocks.') else stage_blocks[int(m.group(1))]
        return block + (0 if pe_free else 1)

    tensors = OrderedDict((ours(k), v) for k, v in sd.items() if not k.startswith('hog_enc.'))
    trainable = [ours(k) for k in sd if not _REF_FIXED.match(k)]
    if layerwise:
        kept = {g['layer_index'] for g in groups if 'layer_index' in g}
        order = [n for n in trainable if layer(n) in kept] + [n for n in trainable if layer(n) is None]
        if [g.get('layer_index') for g in groups] != [layer(n) for n in order] or \
                any(len(g['params']) != 1 for g in groups):
            refuse(f'its optimizer ({len(groups)} groups) is not the one-group-per-parameter layout ViTFreeze builds '
                   f'for these {len(order)} parameters (create_param_groups), so its state cannot be matched by name')
        ids = [g['params'][0] for g in groups]
        layers = sorted({layer(n) for n in trainable if layer(n) is not None})
        their_frozen = len([x for x in layers if x not in kept])
        if layers[:their_frozen] != [x for x in layers if x not in kept]:
            refuse('its frozen layers are not a prefix of the network')
    else:
        no_decay = [n for n in trainable if tensors[n].ndim <= 1 or n.endswith('.bias')]
        decay = [n for n in trainable if n not in set(no_decay)]
        if [len(g['params']) for g in groups] != [len(no_decay), len(decay)]:
            refuse(f"its optimizer holds {'+'.join(str(len(g['params'])) for g in groups)} parameters, the "
                   f'[no decay, decay] groups of its model {len(no_decay)}+{len(decay)}, so its state cannot be '
                   f'matched by name')
        order, ids, their_frozen = no_decay + decay, groups[0]['params'] + groups[1]['params'], 0
    state = opt.get('state', {})
    by_name = {n: state.get(i) for n, i in zip(order, ids)}
    bad = [n for n, st in by_name.items() if st and st['exp_avg'].shape != tensors[n].shape]
    if bad:
        refuse(f'its optimizer state does not fit its parameters ({_names(bad)})')

    # ---- the freeze state this run's schedule gives at the resumed step
    step = (epoch + 1) * steps_per_epoch
    n_frozen = freezer.num_frozen_at(step) if freezer is not None else 0
    if n_frozen != their_frozen:
        flags = ' '.join([f'--{k} {ns[k]}' for k in ('how_scale', 't_0') if ns.get(k) is not None]
                         + [f'--{k}' for k in ('non_layerwise_lr', 'dont_freeze_pe', 'all_stages')
                            if ns.get(k) is True])
        refuse(f'it had {their_frozen} frozen FreezeOut units after epoch {epoch}, these flags freeze {n_frozen} by '
               f'optimizer step {step}; resume with the schedule of that run'
               + (f' (its args: {flags})' if flags else ''))
    frozen_blocks = n_frozen if pe_free else max(0, n_frozen - 1)
    off = sum(1 for b in stage_blocks if b < frozen_blocks)
    if removed > off:
        refuse(f'the norm, decoder and HOG layer of {removed} stages are missing but only {off} stages are off at '
               f'this freeze state')

    # ---- the model in our layout
    mine = model.state_dict()
    biases = {int(m.group(1)) + removed: v for k, v in sd.items()
              if (m := re.match(r'^hog_enc\.(\d+)\.conv\.bias$', k))}
    # ours: the HOG target's bias, wherever the target seam puts the HOG module (``target.hog.bias`` today)
    bias_key = next((k for k in mine if k == 'hog.bias' or k.endswith('.hog.bias')), None)
    if bool(biases) != (bias_key is not None):
        refuse(f"it was trained {'with' if biases else 'without'} --hog_bias; resume {'with' if biases else 'without'} "
               f"it")
    if biases:
        b = mine[bias_key].clone()
        for k, v in biases.items():
            b[k] = v.reshape(-1)
        tensors[bias_key] = b
    extra = [k for k in tensors if k not in mine]
    if extra:
        refuse(f'this model has no {_names(extra)}; resume with the flags of that run')
    fresh = tuple(f'{m}.{k}.' for k in range(removed) for m in ('norm', 'decoder'))
    missing = [k for k in mine if k not in tensors and not k.startswith(fresh)]
    if missing:
        refuse(f'it lacks {_names(missing)}')
    shapes = [f'{k} {tuple(v.shape)} vs {tuple(mine[k].shape)}' for k, v in tensors.items() if v.shape != mine[k].shape]
    if shapes:
        refuse(f'other shapes than this model ({_names(shapes, 2)}); resume with the flags of that run')
    new_model = OrderedDict((k, tensors.get(k, v)) for k, v in mine.items())

    # ---- the optimizer in our layout (after this run's freeze state is applied)
    if freezer is not None:
        freezer.apply_frozen(optimizer, n_frozen)
    names = {id(p): n for n, p in model.named_parameters()}
    flat = [names[id(p)] for g in optimizer.param_groups for p in g['params']]
    absent = [n for n in flat if n not in by_name]
    if absent:
        refuse(f'its optimizer has no state for {_names(absent)}, which train here')
    new_state = {}
    for i, n in enumerate(flat):
        st = by_name[n]
        if st:  # AdamW: step, exp_avg, exp_avg_sq (fused AdamW keeps the step as a float tensor)
            new_state[i] = {k: (torch.tensor(float(v), dtype=torch.float32) if k == 'step' else v)
                            for k, v in st.items()}
    # e.g. cls_token: ViTFreeze trains it to the end, here it freezes with the embedding (docs/DESIGN.md)
    dropped = [n for n in order if n not in set(flat)]
    du.print0(f'--resume {path}: {name} pre-training checkpoint (epoch {epoch}) continued in this layout: model, '
              f'AdamW state of {len(new_state)} parameters, epoch, scaler; {n_frozen} frozen units at optimizer '
              f'step {step} (recomputed from the schedule)'
              + (f'; the {removed} removed stages keep a fresh norm/decoder and stay off' if removed else '')
              + (f'; frozen here but trained there: {_names(dropped)} (state dropped)' if dropped else '')
              + '; no RNG state in it, so the continuation is not bit-exact')
    return dict(model=new_model, optimizer=dict(state=new_state, param_groups=optimizer.state_dict()['param_groups']),
                epoch=epoch, scaler=ckpt.get('scaler'), args=ns, freezeout=freezer.state_dict() if freezer is not None else {})
