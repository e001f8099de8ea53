"""The ``teacher`` reconstruction target (MaskFeat / data2vec / MILAN family): features of a frozen encoder.

``--target teacher --teacher CKPT [--teacher_layer N]`` (or a ``teacher`` entry of ``--stage_targets``): the value
vector of a cell is the output of the first ``N`` blocks of the encoder in ``CKPT`` run on the full, unmasked image,
patch tokens only (the cls token is dropped), LayerNorm'ed without affine over the feature dimension. ``dim`` is the
teacher's width for every stage.

Loading. ``CKPT`` is anything the evaluators read as ``--finetune`` (ours, MAE, LocalMIM, a fine-tuned or probe
checkpoint, a ``tools/export.py`` timm export with its ``.json`` recipe): the architecture comes from
``checkpoint_formats.checkpoint_arch`` and the weights through ``checkpoint_formats.load_pretrained``, with the
teacher built at the run's ``--input_size`` (its position embedding resampled as the evaluators do when the
checkpoint's grid differs). Blocks after ``N``, the final norm and the head are dropped, so no deeper block runs.

Grids. The teacher's token map (``input_size / teacher_patch`` per side) is mapped onto a stage's cell grid by
``adaptive_avg_pool2d`` over the 2-D token map, then LayerNorm'ed per cell: a coarser stage averages the tokens of
its cell (a block mean when the grids divide), a finer stage (its grid a multiple of the teacher's) repeats the
token covering its cell; equal grids are the per-token LayerNorm'ed features unchanged. LayerNorm comes after the
resampling so every stage's target cells have zero mean and unit variance whatever the grid ratio.

Frozen, and out of the checkpoint. The teacher's tensors are held as non-persistent buffers: it has no parameters,
so it is never in the optimizer, the DDP reducer, the FreezeOut units or ``model.parameters()``, and its weights do
not go into the student's checkpoints (they would double a ViT-B checkpoint and the evaluators would have to skip
them). What the checkpoint does hold is the teacher's identity: the SHA-256 of the ``CKPT`` file and ``N`` as two
persistent buffers, so a resume rebuilds the teacher from the path in the run's flags and refuses, in one line, a
file whose contents or a layer that changed (the targets would no longer be the run's).

Cost. One teacher forward per training step on the full batch, shared by all stages using it
(:meth:`TeacherTarget.forward_stages`); its matmuls are seen by FLOP counters, so the FLOP plan counts it in the
shared work (``flop_counted``) and :meth:`TeacherTarget.plan_line` prints its share in ``--plan_only``.
"""
import hashlib
import os
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import targets
from util.errors import UserError

__all__ = ['TeacherTarget', 'file_sha256', 'load_teacher', 'uses_teacher', 'check_teacher_flags']

LN_EPS = 1e-6  # the teacher ViT's own LayerNorm eps (models_vit: nn.LayerNorm(eps=1e-6))


def file_sha256(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for piece in iter(lambda: f.read(1 << 24), b''):
            h.update(piece)
    return h.digest()


def _freeze_as_buffers(module: nn.Module) -> None:
    """Turn every parameter of ``module`` into a non-persistent buffer of the same name (see the module docstring)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            del m._parameters[name]
            if p is not None:
                m.register_buffer(name, p.detach().clone(), persistent=False)


def load_teacher(path: str, layer: Optional[int], input_size: int, flag: str = '--teacher') -> nn.Module:
    """The frozen timm ViT of ``path`` (blocks[:layer], no final norm, no head) at ``input_size``, in eval mode;
    its ``load_notes`` say what loading changed (a resampled position embedding). ``layer`` None: every block.
    One-line UserErrors for a missing/unreadable file or ``layer`` out of range."""
    import checkpoint_formats
    import models_vit

    if not os.path.isfile(path):
        raise UserError(f'{flag} {path}: ' + ('is a directory, not a checkpoint file' if os.path.isdir(path)
                                              else 'file not found'))
    ckpt = checkpoint_formats.read_checkpoint(path, flag)
    where = f'{flag} {path}'
    found = checkpoint_formats.checkpoint_arch(ckpt, path)
    values, _ = checkpoint_formats.resolve_arch(found, {'input_size': int(input_size)}, {}, where,
                                                'vit_base_patch16')
    patch = int(values['patch_size'])
    if input_size % patch:
        raise UserError(f'{where}: the teacher\'s patch size {patch} does not divide --input_size {input_size}; '
                        f'use a teacher whose patch divides the input size')
    depth = int(values['depth'])
    if layer is not None and not 1 <= layer <= depth:
        raise UserError(f'--teacher_layer {layer}: the teacher {path} has {depth} blocks; choose 1..{depth}')
    model = models_vit.create_model(values['model'], img_size=int(input_size), patch_size=patch,
                                    embed_dim=int(values['embed_dim']), depth=depth,
                                    num_heads=int(values['num_heads']), num_classes=0, global_pool='token')
    report, _ = checkpoint_formats.load_pretrained(model, path, flag, head_init_std=None, verbose=False, ckpt=ckpt)
    n = depth if layer is None else int(layer)
    absent = [k for k in report.missing
              if k.startswith(('cls_token', 'pos_embed', 'patch_embed.'))
              or any(k.startswith(f'blocks.{i}.') for i in range(n))]
    if absent:
        raise UserError(f'{where}: {len(absent)} teacher tensors are not in the file (e.g. {absent[0]}); pass a '
                        f'checkpoint with the whole encoder')
    model.blocks = model.blocks[:n]  # deeper blocks are never run
    model.norm = nn.Identity()  # the target's own LayerNorm (no affine) replaces the final norm
    model.head = nn.Identity()
    _freeze_as_buffers(model)
    model.load_notes = [n for n in report.notes if n.startswith('pos_embed')]  # the final norm is not used
    return model.eval()


@targets.register('teacher')
class TeacherTarget(targets.Target):
    """Per-cell features of a frozen encoder's ``teacher_layer``-th block (module docstring). Options:
    ``teacher`` (path, required), ``teacher_layer`` (1..depth, default: the last), ``input_size``."""

    def __init__(self, stages: Sequence[targets.Stage] = (), options: Optional[Mapping[str, Any]] = None):
        super().__init__(stages, options)
        o = self.options
        path = o.get('teacher')
        if not path:
            raise UserError('--target teacher: needs --teacher CKPT, the frozen encoder whose features are the '
                            'target (any checkpoint run_knn.py --finetune reads)')
        layer = o.get('teacher_layer')
        size = int(o.get('input_size') or (self.stages[0].img_size if self.stages else 224))
        self.path = str(path)
        self.encoder = load_teacher(self.path, None if layer is None else int(layer), size)
        self.layer = len(self.encoder.blocks)
        self.width = int(self.encoder.embed_dim)
        self.token_grid = size // int(self.encoder.patch_embed.patch_size[0])
        digest = file_sha256(self.path)
        self.sha_hex = digest.hex()
        self.register_buffer('teacher_sha256', torch.tensor(list(digest), dtype=torch.uint8))
        self.register_buffer('teacher_layer', torch.tensor(self.layer, dtype=torch.int64))

    def train(self, mode: bool = True) -> 'TeacherTarget':
        super().train(mode)
        self.encoder.eval()  # a teacher is always in inference mode (no dropout / drop-path)
        return self

    def dim(self, stage: targets.Stage) -> int:
        return self.width

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the teacher's patch tokens after ``teacher_layer`` blocks, [B, D, g, g] (no norm)."""
        x = self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens:]
        b, n, d = x.shape
        return x.transpose(1, 2).reshape(b, d, self.token_grid, self.token_grid)

    @staticmethod
    def cells(maps: torch.Tensor, grid: int) -> torch.Tensor:
        """[B, D, g, g] token map -> [B, grid², D]: adaptive average pool to the stage grid, LayerNorm per cell."""
        with torch.autocast(device_type=maps.device.type, enabled=False):
            x = maps.float()
            if x.shape[-1] != grid:
                x = F.adaptive_avg_pool2d(x, grid)
            x = x.flatten(2).transpose(1, 2)
            return F.layer_norm(x, (x.shape[-1],), eps=LN_EPS)

    def forward(self, images: torch.Tensor, stage: targets.Stage) -> torch.Tensor:
        return self.forward_stages(images, [stage])[stage.index]

    def forward_stages(self, images: torch.Tensor, stages: Sequence[targets.Stage]) -> Dict[int, torch.Tensor]:
        if not stages:
            return {}
        maps = self.tokens(images)  # once per call, whatever the number of stages
        return {s.index: self.cells(maps, s.grid) for s in stages}

    def compile_regions(self, **opts) -> None:
        for b in self.encoder.blocks:  # forward_stages, not __call__, is what the model runs: compile the blocks
            b.compile(**opts)

    def plan_line(self, stages: Sequence[targets.Stage], fwd_flops: Optional[float],
                  step_flops: Optional[float]) -> Optional[str]:
        """The FLOP plan's line: which teacher, for which stages, its forward FLOPs per image and share of a step."""
        cost = ''
        if fwd_flops is not None:
            cost = f'; forward {fwd_flops / 1e6:.2f} MFLOP/image under no_grad (no backward)'
            if step_flops:
                cost += (f' = {100 * fwd_flops / step_flops:.1f}% of a training step with nothing frozen '
                         f'(FLOP model, backward = 2x forward; counted in its shared work, every step)')
        return (f'teacher target: {self.path} (sha256 {self.sha_hex[:12]}), blocks '
                f'1-{self.layer}, width {self.width}, {self.token_grid}x{self.token_grid} tokens -> stage grids '
                f'{[s.grid for s in stages]} of stages {[s.index for s in stages]} (adaptive average pool, '
                f'LayerNorm per cell)' + ''.join(f'; {n}' for n in getattr(self.encoder, 'load_notes', [])) + cost)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        sha, lay = state_dict.get(prefix + 'teacher_sha256'), state_dict.get(prefix + 'teacher_layer')
        if sha is not None and not torch.equal(sha.to(self.teacher_sha256), self.teacher_sha256):
            raise UserError(f'--teacher {self.path}: not the teacher this run was trained with (file SHA-256 '
                            f'{bytes(sha.tolist()).hex()[:12]} in the checkpoint, '
                            f'{self.sha_hex[:12]} now); resume with the original file')
        if lay is not None and int(lay) != self.layer:
            raise UserError(f'--teacher_layer {self.layer}: the checkpoint was trained on teacher block {int(lay)}; '
                            f'resume with --teacher_layer {int(lay)}')
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def uses_teacher(target: nn.Module) -> bool:
    return any(isinstance(m, TeacherTarget) for m in target.modules())


def check_teacher_flags(args: Any, target: nn.Module) -> None:
    """``--teacher``/``--teacher_layer`` given while no stage uses the teacher target: one line (they would be
    silently ignored)."""
    if uses_teacher(target):
        return
    for flag in ('teacher', 'teacher_layer'):
        if getattr(args, flag, None) is not None:
            raise UserError(f'--{flag} {getattr(args, flag)}: no stage uses the teacher target; add --target '
                            f'teacher or a teacher entry in --stage_targets (e.g. hog,hog,teacher,teacher), or '
                            f'drop --{flag}')
