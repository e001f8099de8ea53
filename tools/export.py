"""Export an encoder as a plain timm ``VisionTransformer`` state dict plus a JSON recipe to rebuild it.

    python tools/export.py --checkpoint OUT/checkpoint-99.pth --output vit_b_localmim.pth
    # writes vit_b_localmim.pth and vit_b_localmim.pth.json = {"timm_model": "vit_base_patch16_224", "kwargs": {...}}

    import json, timm
    spec = json.load(open('vit_b_localmim.pth.json'))
    model = timm.create_model(spec['timm_model'], pretrained=False, checkpoint_path='vit_b_localmim.pth',
                              **spec['kwargs'])

Accepted checkpoints: pre-training (LocalMIM, FreezeOut, MAE ``{'model': ...}``), fine-tuning (head and pooling
kept) and linear probing (the BN(affine=False) + Linear head is folded into one exact Linear head). A pre-trained
encoder is exported without a head (``num_classes=0``) and with the last stage norm as timm's final ``norm``:
``--pool token`` (default) gives the cls token, ``--pool avg`` the mean patch token after that norm
(``global_pool='avg', fc_norm=False``). The file is verified by loading it strictly with ``timm.create_model``.
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

if __package__ in (None, ''):
    # Run as ``python tools/export.py``: make the repo root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import timm  # noqa: E402
import torch  # noqa: E402

import models_vit  # noqa: E402
from util.args import run_main  # noqa: E402
from util.errors import check  # noqa: E402

# timm registry names of the standard configurations: (patch, width, depth, heads) -> name.
TIMM_NAMES: Dict[Tuple[int, int, int, int], str] = {
    (16, 192, 12, 3): 'vit_tiny_patch16_224',
    (16, 384, 12, 6): 'vit_small_patch16_224',
    (16, 768, 12, 12): 'vit_base_patch16_224',
    (16, 1024, 24, 16): 'vit_large_patch16_224',
    (14, 1280, 32, 16): 'vit_huge_patch14_224',
}


def timm_recipe(arch: Dict[str, int], num_classes: int, global_pool: str, fc_norm: Optional[bool]
                ) -> Tuple[str, Dict[str, Any]]:
    """``(timm name, kwargs)`` that build ``arch`` (patch_size, embed_dim, depth, num_heads, img_size) in timm.

    A standard configuration is named directly (only non-default kwargs listed); any other shape uses the
    registered model with the same width, else the model's own family (``vit_tiny_patch16`` →
    ``vit_tiny_patch16_224``), else ViT-B, with every differing field in kwargs.
    """
    key = (arch['patch_size'], arch['embed_dim'], arch['depth'], arch['num_heads'])
    family = f"{arch.get('model')}_224"
    name = TIMM_NAMES.get(key) or next((n for k, n in TIMM_NAMES.items() if k[1] == arch['embed_dim']),
                                       family if family in TIMM_NAMES.values() else 'vit_base_patch16_224')
    base = next(k for k, n in TIMM_NAMES.items() if n == name)
    kwargs: Dict[str, Any] = {}
    if arch['img_size'] != 224:
        kwargs['img_size'] = arch['img_size']
    for field, default in zip(('patch_size', 'embed_dim', 'depth', 'num_heads'), base):
        if arch[field] != default:
            kwargs[field] = arch[field]
    kwargs['num_classes'] = num_classes
    if global_pool != 'token':
        kwargs['global_pool'] = global_pool
    if fc_norm is not None:
        kwargs['fc_norm'] = fc_norm
    return name, kwargs


def _fold_probe_head(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """BN(affine=False, eps 1e-6, eval statistics) followed by Linear == one Linear: W/σ, b − W·μ/σ."""
    mean, var = sd['head.0.running_mean'].double(), sd['head.0.running_var'].double()
    w, b = sd['head.1.weight'].double(), sd['head.1.bias'].double()
    inv = (var + 1e-6).rsqrt()
    return {'head.weight': (w * inv).float(), 'head.bias': (b - (w * inv) @ mean).float()}


def export_encoder(checkpoint: str, output: str, pool: str = 'token', num_heads: Optional[int] = None,
                   verify: bool = True) -> Tuple[str, Dict[str, Any]]:
    """Write ``output`` (timm state dict) and ``output.json``; returns ``(timm name, kwargs)``."""
    ckpt = models_vit.read_checkpoint(checkpoint, '--checkpoint')
    where = f'--checkpoint {checkpoint}'
    raw = ckpt.get('model') if isinstance(ckpt.get('model'), dict) else None
    extra: Dict[str, torch.Tensor] = {}
    if raw is not None and any(k.startswith('encoder.blocks.') for k in raw):  # a run_linprobe.py checkpoint
        extra = _fold_probe_head(raw)
        ckpt = dict(ckpt, model={k[len('encoder.'):]: v for k, v in raw.items() if k.startswith('encoder.')})
    sd = models_vit.state_dict_from_checkpoint(ckpt, where)
    sd.update(extra)
    arch = models_vit.arch_from_checkpoint(ckpt)
    if num_heads is not None:
        arch['num_heads'] = num_heads
    check('num_heads' in arch, f'{where}: the number of attention heads is not recorded; pass --num_heads')
    grid = models_vit.arch_from_state(sd).get('grid')
    check(grid is not None, f'{where}: pos_embed is not a square patch grid')
    arch['img_size'] = grid * arch['patch_size']
    fine_tuned = 'head.weight' in sd
    num_classes = int(sd['head.weight'].shape[0]) if fine_tuned else 0
    if 'fc_norm.weight' in sd:
        global_pool, fc_norm = 'avg', None
    elif fine_tuned or pool == 'token':
        global_pool, fc_norm = 'token', None
    else:
        global_pool, fc_norm = 'avg', False
    if fine_tuned and pool != 'token':
        print(f'note: {where} has a trained head; its own pooling ({global_pool}) is kept, --pool ignored')
    model = models_vit.create_model(arch.get('model', 'vit_base_patch16'), img_size=arch['img_size'],
                                    patch_size=arch['patch_size'], embed_dim=arch['embed_dim'],
                                    depth=arch['depth'], num_heads=arch['num_heads'], num_classes=num_classes,
                                    global_pool=global_pool, **({} if fc_norm is None else dict(fc_norm=fc_norm)))
    report = models_vit.load_encoder_state(model, sd, where, models_vit.checkpoint_args(ckpt), head_init_std=None)
    check(not report.missing, f'{where}: tensors missing for a complete encoder: {report.missing}')
    name, kwargs = timm_recipe(arch, num_classes, global_pool, fc_norm)
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    torch.save(model.state_dict(), output)
    with open(output + '.json', 'w') as f:
        json.dump({'timm_model': name, 'kwargs': kwargs}, f, indent=1)
        f.write('\n')
    if verify:  # strict load: every tensor of the timm model must come from the file
        timm.create_model(name, pretrained=False, checkpoint_path=output, **kwargs)
    return name, kwargs


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Export an encoder as a timm VisionTransformer', add_help=False)
    parser.add_argument('--checkpoint', required=True, type=str,
                        help='pre-training, fine-tuning or linear-probe checkpoint')
    parser.add_argument('--output', required=True, type=str,
                        help='state dict to write; the timm recipe goes to OUTPUT.json')
    parser.add_argument('--pool', default='token', choices=['token', 'avg'],
                        help='features of an exported pre-trained encoder: cls token, or mean patch token after the '
                             'final norm (default: token)')
    parser.add_argument('--num_heads', default=None, type=int,
                        help='attention heads, if the checkpoint does not record them (default: from its args)')
    return parser


def main(args: argparse.Namespace) -> None:
    name, kwargs = export_encoder(args.checkpoint, args.output, args.pool, args.num_heads)
    print(f'wrote {args.output} and {args.output}.json')
    print(f"timm.create_model({name!r}, pretrained=False, checkpoint_path={args.output!r}, "
          f"**{json.dumps(kwargs)})")


if __name__ == '__main__':
    run_main(main, argparse.ArgumentParser('tools/export.py', parents=[get_args_parser()]))
