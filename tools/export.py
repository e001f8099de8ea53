"""Export an encoder as a plain timm ``VisionTransformer`` state dict plus a JSON recipe to rebuild it.

    python -m tools.export --checkpoint OUT/checkpoint-99.pth --output vit_b_localmim.pth
    # writes vit_b_localmim.pth and vit_b_localmim.pth.json = {"timm_model": "vit_base_patch16_224", "kwargs": {...}}

    import json, timm
    spec = json.load(open('vit_b_localmim.pth.json'))
    model = timm.create_model(spec['timm_model'], pretrained=False, checkpoint_path='vit_b_localmim.pth',
                              **spec['kwargs'])

Accepted checkpoints: pre-training (LocalMIM, FreezeOut, MAE ``{'model': ...}``), fine-tuning (head and pooling
kept) and linear probing (the BN(affine=False) + Linear head is folded into one exact Linear head). A pre-trained
encoder is exported without a head (``num_classes=0``) and with the last stage norm as timm's final ``norm``:
``--pool token`` (default) gives the cls token, ``--pool avg`` the mean patch token after that norm
(``global_pool='avg', fc_norm=False``). The export is verified by a strict load into ``timm.create_model``'s model
before anything is written; both files are written atomically, never over ``--checkpoint`` (also through a
symlink or hard link) and never over an existing file without ``--overwrite``.
"""
import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Tuple

if __name__ == '__main__' and not __package__:  # run as a file (python tools/x.py): rerun as python -m
    os.execv(sys.executable, [sys.executable, '-m', 'tools.export', *sys.argv[1:]])

import timm  # noqa: E402
import torch  # noqa: E402

import checkpoint_formats  # noqa: E402
import models_vit  # noqa: E402
from util.args import ArgumentParser, integer, run_main  # noqa: E402
from util.checkpoint import CheckpointWriteError, save_atomic  # noqa: E402
from util.errors import UserError, check  # noqa: E402

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


def _check_output(checkpoint: str, output: str, overwrite: bool) -> None:
    """Nothing is written over the input, nor over an existing file unless --overwrite says so."""
    for path in (output, output + '.json'):
        if os.path.isdir(path):
            raise UserError(f'--output {output}: {path} is a directory; pass a file name for the exported state dict')
        if os.path.exists(path) and os.path.exists(checkpoint) and os.path.samefile(path, checkpoint):
            raise UserError(f'--output {output}: {path} is the --checkpoint itself (same file, or a link to it); '
                            f'exporting over it would destroy the checkpoint; choose another --output')
    existing = [p for p in (output, output + '.json') if os.path.lexists(p)]
    if existing and not overwrite:
        raise UserError(f"--output {output}: {' and '.join(existing)} already exist(s); pass --overwrite to replace "
                        f"them, or choose another --output")
    for p in existing:
        print(f'note: --overwrite: replacing {p}', flush=True)


def _write_json_atomic(obj: Any, path: str) -> None:
    """Temp file in the same folder, fsync, rename: a crash leaves the old file or the new one, never half."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f'.{os.path.basename(path)}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1)
            f.write('\n')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_encoder(checkpoint: str, output: str, pool: str = 'token', num_heads: Optional[int] = None,
                   model_name: Optional[str] = None, overwrite: bool = False) -> Tuple[str, Dict[str, Any]]:
    """Write ``output`` (timm state dict) and ``output.json``; returns ``(timm name, kwargs)``.

    ``model_name``/``num_heads`` are what the user typed (the rest of the architecture comes from the checkpoint,
    see :func:`checkpoint_formats.checkpoint_arch`). The export is checked by a strict load into the timm model
    before anything is written, and both files are written atomically.
    """
    ckpt = checkpoint_formats.read_checkpoint(checkpoint, '--checkpoint')
    _check_output(checkpoint, output, overwrite)
    where = f'--checkpoint {checkpoint}'
    sd = checkpoint_formats.state_dict_from_checkpoint(ckpt, where)
    typed = {k: v for k, v in (('model', model_name), ('num_heads', num_heads)) if v is not None}
    found = checkpoint_formats.checkpoint_arch(ckpt, checkpoint)
    arch, sources = checkpoint_formats.resolve_arch(found, typed, {}, where, 'vit_base_patch16')
    grid = checkpoint_formats.arch_from_state(sd).get('grid')
    check(grid is not None, f'{where}: pos_embed is not a square patch grid')
    arch['img_size'] = arch['input_size'] = grid * arch['patch_size']
    sources['input_size'] = 'tensor shapes'
    print(checkpoint_formats.describe_arch(arch, sources), flush=True)
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
    model = models_vit.create_model(arch['model'], img_size=arch['img_size'], patch_size=arch['patch_size'],
                                    embed_dim=arch['embed_dim'], depth=arch['depth'], num_heads=arch['num_heads'],
                                    num_classes=num_classes, global_pool=global_pool,
                                    **({} if fc_norm is None else dict(fc_norm=fc_norm)))
    report = checkpoint_formats.load_encoder_state(model, sd, where, checkpoint_formats.checkpoint_args(ckpt),
                                                   head_init_std=None)
    check(not report.missing, f'{where}: tensors missing for a complete encoder: {report.missing}')
    name, kwargs = timm_recipe(arch, num_classes, global_pool, fc_norm)
    state = model.state_dict()
    # strict: every tensor of the timm model must come from the export (checked before anything is written)
    timm.create_model(name, pretrained=False, **kwargs).load_state_dict(state, strict=True)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        save_atomic(state, output)
        _write_json_atomic({'timm_model': name, 'kwargs': kwargs}, output + '.json')
    except CheckpointWriteError as e:  # disk full, file-size limit, permissions: temp file gone, old files kept
        raise UserError(f'--output {output}: cannot write the export ({e.cause}); any previous file there is '
                        f'unchanged') from None
    except OSError as e:  # the small JSON beside it
        raise UserError(f'--output {output}: cannot write the export ({e.strerror or e}); any previous file there '
                        f'is unchanged') from None
    return name, kwargs


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser('Export an encoder as a timm VisionTransformer', add_help=False)
    parser.add_argument('--checkpoint', required=True, type=str,
                        help='pre-training, fine-tuning or linear-probe checkpoint (ours, MAE, LocalMIM)')
    parser.add_argument('--output', required=True, type=str,
                        help='state dict to write; the timm recipe goes to OUTPUT.json. Never the --checkpoint '
                             'itself; an existing file only with --overwrite')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing OUTPUT / OUTPUT.json (default: refuse)')
    parser.add_argument('--pool', default='token', choices=['token', 'avg'],
                        help='features of an exported pre-trained encoder: cls token, or mean patch token after the '
                             'final norm (default: token)')
    parser.add_argument('--model', default=None, type=str, metavar='NAME',
                        help=f"{', '.join(models_vit.MODEL_NAMES)}: the family of a checkpoint that records none "
                             f"(default: from its args, else the standard ViT of its width)", defines_run=True)
    parser.add_argument('--num_heads', default=None, type=int,
                        help='attention heads, if the checkpoint does not record them (default: from its args, else '
                             'the standard ViT of its width)', domain=integer(1))
    return parser


def main(args: argparse.Namespace) -> None:
    name, kwargs = export_encoder(args.checkpoint, args.output, args.pool, args.num_heads, args.model,
                                  args.overwrite)
    print(f'wrote {args.output} and {args.output}.json')
    print(f"timm.create_model({name!r}, pretrained=False, checkpoint_path={args.output!r}, "
          f"**{json.dumps(kwargs)})")


if __name__ == '__main__':
    run_main(main, ArgumentParser('tools/export.py', parents=[get_args_parser()]))
