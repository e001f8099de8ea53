"""Reconstruction targets: what each LocalMIM stage's decoder regresses, one value vector per cell of its grid.

The seam. A target is a :class:`Target` (an ``nn.Module``) with two methods::

    dim(stage) -> int                                   values per grid cell of ``stage``
    forward(images, stage) -> Tensor[B, cells, dim]     cells in row-major order of the stage's grid, whose cell
                                                        side in pixels is ``stage.cell_size``

``images`` is the normalised input batch [B, C, H, W] the encoder sees. The model describes each of its stages by a
:class:`Stage`, asks the target for ``dim(stage)`` to build the stage decoders, and calls it under ``no_grad`` (inside
the run's autocast) for the stages still being trained; a target is never trained (its parameters, if any, are
frozen). Optional hooks, with defaults that fit most targets: :meth:`Target.forward_stages` (several stages in one
pass; HOG shares its gradient pass), ``flop_counted`` (False: the FLOP plan times the target, because counters miss
its work), :meth:`Target.picture` (TensorBoard) and :meth:`Target.compile_regions` (``--compile``).

Registered targets: ``hog`` (the default: LocalMIM's HOG), ``pixel`` (MAE's norm_pix per cell), ``teacher`` (a
frozen encoder's features, ``target_teacher.py``; ``--teacher CKPT --teacher_layer N``). ``--target
module:Class`` takes any Target subclass importable from ``PYTHONPATH``; ``--stage_targets hog,hog,pixel,pixel``
gives each stage its own (stages naming the same target share one instance).

A plugin (the contract is ``targets.Target`` and the two methods)::

    import torch.nn.functional as F
    import targets

    class MeanColor(targets.Target):
        def dim(self, stage):
            return 3
        def forward(self, images, stage):
            return F.avg_pool2d(images, stage.cell_size).flatten(2).transpose(1, 2)

A target that needs settings defines ``__init__(self, stages, options)`` and calls ``super().__init__(stages,
options)``: ``stages`` is the model's full stage list, ``options`` a dict of the run's flags (``run_pretrain.py``
passes all of them) plus the model's ``hog_nbins``, ``hog_bias``, ``hog_bias_seed`` and ``in_chans``.
"""
import importlib
import inspect
import math
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.errors import UserError

__all__ = ['Stage', 'Target', 'HOGTargets', 'HOGTarget', 'PixelTarget', 'StageTargets', 'TARGETS', 'register',
           'resolve_target', 'parse_stage_targets', 'build_target', 'cells_to_maps', 'target_parts', 'LAZY_TARGETS']


# ---------------------------------------------------------------------------------------------------------------------
# The seam


@dataclass(frozen=True)
class Stage:
    """One decoder of the model, as a target sees it.

    Attributes:
        index: position in the model's stage list (0 = shallowest); the key of the stage's loss and target.
        block: 0-based encoder block whose output feeds the stage (its tap).
        scale: decoder cells per patch side (LocalMIM: 4, 2, 1, 0.5).
        cell_size: cell side in pixels, ``patch_size / scale``.
        grid: cells per image side, ``img_size / cell_size``; the stage has ``grid²`` cells.
        patch_size, img_size, in_chans: of the model's input.
    """
    index: int
    block: int
    scale: float
    cell_size: int
    grid: int
    patch_size: int
    img_size: int
    in_chans: int = 3

    @property
    def num_cells(self) -> int:
        return self.grid * self.grid


class Target(nn.Module):
    """Base class of reconstruction targets (see the module docstring for the contract).

    Args:
        stages: every stage of the model (a target may be asked for any subset of them).
        options: the run's settings (flags), read by targets that need any; plugins may ignore both.
    """

    #: True when torch's FlopCounterMode sees this target's work (matmuls, convolutions); False makes the FLOP plan
    #: time the target against the rest of the forward and count it as FLOP-equivalents (HOG: binning, scatter).
    flop_counted: bool = True

    def __init__(self, stages: Sequence[Stage] = (), options: Optional[Mapping[str, Any]] = None):
        super().__init__()
        self.stages: List[Stage] = list(stages)
        self.options: Dict[str, Any] = dict(options or {})

    def dim(self, stage: Stage) -> int:
        """Values per grid cell of ``stage``."""
        raise NotImplementedError(f'{type(self).__name__} must define dim(stage)')

    def forward(self, images: torch.Tensor, stage: Stage) -> torch.Tensor:
        """images [B, C, H, W] -> [B, stage.grid², dim(stage)], cells row-major."""
        raise NotImplementedError(f'{type(self).__name__} must define forward(images, stage)')

    def forward_stages(self, images: torch.Tensor, stages: Sequence[Stage]) -> Dict[int, torch.Tensor]:
        """``{stage.index: forward(images, stage)}`` for ``stages``; override to share work between stages."""
        return {s.index: self(images, s) for s in stages}

    def uncounted_stages(self, stages: Sequence[Stage]) -> List[Stage]:
        """The stages of ``stages`` whose target work FLOP counters miss (the FLOP plan times those)."""
        return [] if self.flop_counted else list(stages)

    def picture(self, values: torch.Tensor, stage: Stage, prediction: bool = False, cell_px: int = 8
                ) -> torch.Tensor:
        """[B, cells, dim] target (or prediction) values -> [B, 1 or 3, grid·cell_px, grid·cell_px] in [0, 1].

        Default: 3 values per cell are drawn as colours, others as the per-cell L2 norm (grey), each image scaled
        to its own min..max."""
        maps = cells_to_maps(values.float(), stage.grid)
        if maps.shape[1] != 3:
            maps = maps.norm(dim=1, keepdim=True)
        return _upscale(_minmax(maps), cell_px)

    def compile_regions(self, **opts) -> None:
        """``torch.compile`` the target's work for ``--compile`` (default: the module's forward)."""
        self.compile(**opts)

    def plan_line(self, stages: Sequence[Stage], fwd_flops: Optional[float], step_flops: Optional[float]
                  ) -> Optional[str]:
        """A line for the FLOP plan (``--plan_only``) about this target's own compute, or None (the default).
        ``stages``: those using it; ``fwd_flops``: the counted forward FLOPs per image of its module;
        ``step_flops``: a training step's FLOPs per image with nothing frozen (FLOP model)."""
        return None


def cells_to_maps(x: torch.Tensor, side: int) -> torch.Tensor:
    """[B, side², F] (row-major cells) -> [B, F, side, side]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def _upscale(x: torch.Tensor, px: int) -> torch.Tensor:
    return x.repeat_interleave(px, dim=2).repeat_interleave(px, dim=3)


# ---------------------------------------------------------------------------------------------------------------------
# Registry and resolver

TARGETS: Dict[str, Type[Target]] = {}
# Registered names whose class lives in its own module, imported on first use (``teacher`` pulls in the checkpoint
# readers and timm, which the other targets do not need).
LAZY_TARGETS: Dict[str, str] = {'teacher': 'target_teacher'}


def register(name: str):
    """Class decorator: make a Target available as ``--target NAME``."""
    def deco(cls: Type[Target]) -> Type[Target]:
        TARGETS[name] = cls
        return cls
    return deco


def resolve_target(spec: Union[str, Type[Target]], flag: str = '--target') -> Type[Target]:
    """A registered name or ``module:Class`` (importable from PYTHONPATH) -> the Target subclass; UserError else."""
    if isinstance(spec, type):
        if not issubclass(spec, Target):
            raise UserError(f'{flag} {spec.__name__}: not a subclass of targets.Target')
        return spec
    name = str(spec).strip()
    if name not in TARGETS and name in LAZY_TARGETS:
        importlib.import_module(LAZY_TARGETS[name])  # registers it
    if name in TARGETS:
        return TARGETS[name]
    mod_name, sep, cls_name = name.partition(':')
    if not sep:
        known = ', '.join(dict.fromkeys([*TARGETS, *LAZY_TARGETS]))
        raise UserError(f'{flag} {name!r}: unknown target; choose {known} or module:Class (a targets.Target '
                        f'subclass importable from PYTHONPATH)')
    if not mod_name or not cls_name.isidentifier():
        raise UserError(f'{flag} {name!r}: write module:Class, e.g. my_target:MeanColor')
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is reported the same way
        raise UserError(f'{flag} {name}: cannot import {mod_name!r} ({type(e).__name__}: {e}); put the folder '
                        f'holding {mod_name}.py on PYTHONPATH') from None
    cls = getattr(mod, cls_name, None)
    if cls is None:
        raise UserError(f"{flag} {name}: module {mod_name!r} ({getattr(mod, '__file__', '?')}) has no {cls_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Target)):
        raise UserError(f'{flag} {name}: {cls_name} is not a subclass of targets.Target')
    return cls


def parse_stage_targets(spec: Union[str, Sequence[str]], num_stages: int, flag: str = '--stage_targets'
                        ) -> List[str]:
    """``'hog,hog,pixel,pixel'`` -> one name per stage; a single name applies to all stages."""
    items = [s.strip() for s in (spec.split(',') if isinstance(spec, str) else spec)]
    if not items or any(not s for s in items):
        raise UserError(f'{flag} {spec!r}: give a comma list of target names, e.g. hog,hog,pixel,pixel')
    if len(items) == 1:
        return items * num_stages
    if len(items) != num_stages:
        raise UserError(f'{flag} {spec!r}: {len(items)} targets for {num_stages} stages; give one per stage '
                        f'(shallow to deep) or a single one for all')
    return items


def _instantiate(spec: Union[str, Type[Target], Target], stages: Sequence[Stage], options: Mapping[str, Any],
                 flag: str) -> Target:
    if isinstance(spec, Target):
        return spec
    cls = resolve_target(spec, flag)
    name = spec if isinstance(spec, str) else f'{cls.__module__}:{cls.__name__}'
    try:
        inspect.signature(cls).bind(list(stages), dict(options))
    except TypeError:
        raise UserError(f'{flag} {name}: {cls.__name__}.__init__ must accept (stages, options) and pass them to '
                        f'targets.Target.__init__') from None
    target = cls(list(stages), dict(options))
    target.target_name = name
    return target


def build_target(target: Union[str, Type[Target], Target] = 'hog', stage_targets: Union[str, Sequence[str], None] = None,
                 stages: Sequence[Stage] = (), options: Optional[Mapping[str, Any]] = None) -> Target:
    """The model's target: ``target`` for every stage, or with ``stage_targets`` one per stage (a
    :class:`StageTargets` when they differ). Every dim is checked to be a positive int."""
    options = dict(options or {})
    if stage_targets is None:
        out = _instantiate(target, stages, options, '--target')
    else:
        specs = parse_stage_targets(stage_targets, len(stages))
        distinct = list(dict.fromkeys(specs))
        parts = [_instantiate(s, stages, options, '--stage_targets') for s in distinct]
        out = parts[0] if len(parts) == 1 else StageTargets(parts, [distinct.index(s) for s in specs], stages)
    for s in stages:
        d = out.dim(s)
        try:
            ok = operator.index(d) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise UserError(f'target {target_name(out, s)}: dim(stage {s.index}) = {d!r}; must be a positive int')
    out.requires_grad_(False)  # targets are computed under no_grad and never trained
    return out


def target_parts(target: Target, stages: Sequence[Stage]) -> List[Tuple[Target, List[Stage]]]:
    """``[(target, the stages using it)]``: the parts of a :class:`StageTargets`, else ``target`` for all."""
    if isinstance(target, StageTargets):
        return target._grouped(stages)
    return [(target, list(stages))]


def target_name(target: Target, stage: Optional[Stage] = None) -> str:
    """The name a target was built from (``hog``, ``module:Class``), for messages and logs."""
    if isinstance(target, StageTargets) and stage is not None:
        target = target.part(stage)
    return getattr(target, 'target_name', type(target).__name__)


class StageTargets(Target):
    """Different targets per stage (``--stage_targets``); stages naming the same target share one instance.

    Args:
        parts: the distinct targets.
        stage_part: for every stage, the index of its part.
        stages: every stage of the model.
    """

    def __init__(self, parts: Sequence[Target], stage_part: Sequence[int], stages: Sequence[Stage]):
        super().__init__(stages)
        self.parts = nn.ModuleList(parts)
        self.stage_part = [int(i) for i in stage_part]
        self.target_name = ','.join(target_name(self.parts[i]) for i in self.stage_part)

    def part(self, stage: Stage) -> Target:
        return self.parts[self.stage_part[stage.index]]

    def dim(self, stage: Stage) -> int:
        return self.part(stage).dim(stage)

    def forward(self, images: torch.Tensor, stage: Stage) -> torch.Tensor:
        return self.part(stage)(images, stage)

    def _grouped(self, stages: Sequence[Stage]) -> List[Tuple[Target, List[Stage]]]:
        groups: Dict[int, List[Stage]] = {}
        for s in stages:
            groups.setdefault(self.stage_part[s.index], []).append(s)
        return [(self.parts[i], ss) for i, ss in groups.items()]

    def forward_stages(self, images: torch.Tensor, stages: Sequence[Stage]) -> Dict[int, torch.Tensor]:
        out: Dict[int, torch.Tensor] = {}
        for part, ss in self._grouped(stages):
            out.update(part.forward_stages(images, ss))
        return {s.index: out[s.index] for s in stages if s.index in out}

    def uncounted_stages(self, stages: Sequence[Stage]) -> List[Stage]:
        return [s for part, ss in self._grouped(stages) for s in part.uncounted_stages(ss)]

    def picture(self, values: torch.Tensor, stage: Stage, prediction: bool = False, cell_px: int = 8
                ) -> torch.Tensor:
        return self.part(stage).picture(values, stage, prediction, cell_px)

    def compile_regions(self, **opts) -> None:
        for p in self.parts:
            p.compile_regions(**opts)


# ---------------------------------------------------------------------------------------------------------------------
# HOG (LocalMIM)


class HOGTargets(nn.Module):
    """Multi-scale HOG maps of an image batch, computed in one pass (reference maths, different order of work).

    Per colour channel: Sobel (reflect padding) -> magnitude and atan2(ch0, ch1) -> unsigned hard binning
    ``floor(phi / pi * nb) mod nb`` -> mean magnitude per bin per ``c×c`` cell -> L2 normalisation of each cell's
    nb-vector -> R, G, B concatenated. No Gaussian window, no block normalisation, no interpolation between bins.

    The reference builds a full-resolution one-hot [B, nb, H, W] and average-pools it once per stage. Here the
    gradients and bins are computed once, the finest requested cell histogram is built by a scatter-add into
    cells, and coarser cell sizes that are multiples of it are sum-pooled from it (averaging averages of equal-size
    cells is exact), so the cost is one full-resolution pass regardless of the number of stages.

    With ``bias=True`` (``--hog_bias``) each stage has its own frozen random gradient bias drawn from U(-1/3, 1/3)
    (PyTorch's default conv-bias init for fan-in 9, as the reference's four HOG layers get). The bias changes the
    bins, so then the Sobel convolution is still shared but binning runs once per stage.

    This is the engine of the ``hog`` :class:`HOGTarget`; it indexes stages by their position in ``cell_sizes``.

    Args:
        nbins: orientation bins over [0, pi).
        cell_sizes: cell size in pixels for each stage.
        bias: add a frozen random bias to the gradients (``--hog_bias``).
        bias_seed: seed of the bias draw, the same on every rank (default 0).
    """

    def __init__(self, nbins: int, cell_sizes: Sequence[int], bias: bool = False, bias_seed: int = 0):
        super().__init__()
        self.nbins = nbins
        self.cell_sizes = [int(c) for c in cell_sizes]
        sobel = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
        self.register_buffer('weight', torch.stack([sobel, sobel.t()]).unsqueeze(1), persistent=False)  # [2,1,3,3]
        if bias:
            g = torch.Generator().manual_seed(bias_seed)
            b = (torch.rand(len(self.cell_sizes), 2, generator=g) * 2 - 1) / 3.0
            self.register_buffer('bias', b)  # in the state dict, so a run's targets can be reproduced exactly
        else:
            self.bias = None
        self._cell_index_cache: Dict[Tuple[int, int, int, str], torch.Tensor] = {}

    def _cell_index(self, h: int, w: int, cell: int, device: torch.device) -> torch.Tensor:
        key = (h, w, cell, str(device))
        idx = self._cell_index_cache.get(key)
        if idx is None:
            rows = torch.arange(h, device=device) // cell
            cols = torch.arange(w, device=device) // cell
            idx = (rows[:, None] * (w // cell) + cols[None, :]).reshape(-1)
            self._cell_index_cache[key] = idx
        return idx

    def _histogram(self, mag: torch.Tensor, bins: torch.Tensor, cell: int) -> torch.Tensor:
        """[N,H,W] magnitudes and bins -> [N, H/c, W/c, nb] mean magnitude per cell and bin."""
        n, h, w = mag.shape
        hc, wc = h // cell, w // cell
        if hc * cell != h or wc * cell != w:
            mag, bins = mag[:, :hc * cell, :wc * cell], bins[:, :hc * cell, :wc * cell]
            h, w = hc * cell, wc * cell
        index = self._cell_index(h, w, cell, mag.device)[None, :] * self.nbins + bins.reshape(n, -1)
        hist = mag.new_zeros(n, hc * wc * self.nbins)
        hist.scatter_add_(1, index, mag.reshape(n, -1))
        return (hist / float(cell * cell)).view(n, hc, wc, self.nbins)

    def _bins(self, gxy: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        if bias is not None:
            gxy = gxy + bias.view(1, 2, 1, 1)
        mag = torch.hypot(gxy[:, 0], gxy[:, 1])  # 2-3x faster than vector_norm over dim 1 on CPU, same values
        phase = torch.atan2(gxy[:, 0], gxy[:, 1])
        bins = torch.floor(phase / math.pi * self.nbins).long().remainder_(self.nbins)
        return mag, bins

    @torch.no_grad()
    def maps(self, imgs: torch.Tensor, stages: Optional[Sequence[int]] = None) -> Dict[int, torch.Tensor]:
        """HOG maps ``{stage: [B, 3·nb, H/c, W/c]}`` (channel-first, R bins then G then B) for ``stages``."""
        return {k: h.permute(0, 1, 4, 2, 3).flatten(1, 2) for k, h in self._per_image(imgs, stages).items()}

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor, stages: Optional[Sequence[int]] = None) -> Dict[int, torch.Tensor]:
        """Targets ``{stage: [B, (H/c)·(W/c), 3·nb]}`` in row-major cell order, ready for the loss."""
        return {k: h.permute(0, 2, 3, 1, 4).flatten(3).flatten(1, 2) for k, h in self._per_image(imgs, stages).items()}

    def _per_image(self, imgs: torch.Tensor, stages: Optional[Sequence[int]]) -> Dict[int, torch.Tensor]:
        """``{stage: [B, C, H/c, W/c, nb]}`` normalised cell histograms."""
        stages = list(range(len(self.cell_sizes))) if stages is None else list(stages)
        b = imgs.shape[0]
        return {k: h.view(b, -1, *h.shape[1:]) for k, h in self._cell_histograms(imgs, stages).items()}

    def _cell_histograms(self, imgs: torch.Tensor, stages: List[int]) -> Dict[int, torch.Tensor]:
        """Normalised [B·C, H/c, W/c, nb] histograms for each requested stage."""
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            x = imgs.float()
            b, c, h, w = x.shape
            x = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode='reflect')
            gxy = F.conv2d(x, self.weight.to(x.device))  # [B·C, 2, H, W]
            raw: Dict[int, torch.Tensor] = {}
            if self.bias is None:
                mag, bins = self._bins(gxy, None)
                base = min(self.cell_sizes[k] for k in stages) if stages else 1
                finest = None
                for k in sorted(stages, key=lambda s: self.cell_sizes[s]):
                    cell = self.cell_sizes[k]
                    if cell % base == 0 and finest is not None and h % cell == 0 and w % cell == 0:
                        f = cell // base
                        n, hc, wc, nb = finest.shape
                        raw[k] = finest.view(n, hc // f, f, wc // f, f, nb).mean(dim=(2, 4))
                    else:
                        raw[k] = self._histogram(mag, bins, cell)
                        if cell == base:
                            finest = raw[k]
            else:
                for k in stages:
                    mag, bins = self._bins(gxy, self.bias[k].to(gxy.device))
                    raw[k] = self._histogram(mag, bins, self.cell_sizes[k])
            return {k: F.normalize(v, p=2, dim=-1) for k, v in raw.items()}


@register('hog')
class HOGTarget(Target):
    """LocalMIM's target: per cell and colour channel an L2-normalised histogram of ``hog_nbins`` gradient
    orientations (:class:`HOGTargets`), ``in_chans · hog_nbins`` values, fp32. All requested stages share one
    gradient pass. Options: ``hog_nbins`` (9), ``hog_bias`` (False), ``hog_bias_seed`` (0)."""

    flop_counted = False  # binning and scatter: FLOP counters see only the Sobel convolution

    def __init__(self, stages: Sequence[Stage] = (), options: Optional[Mapping[str, Any]] = None):
        super().__init__(stages, options)
        o = self.options
        self.nbins = int(o.get('hog_nbins', 9))
        self.hog = HOGTargets(self.nbins, [s.cell_size for s in self.stages], bias=bool(o.get('hog_bias', False)),
                              bias_seed=int(o.get('hog_bias_seed', 0)))

    def dim(self, stage: Stage) -> int:
        return stage.in_chans * self.nbins

    def forward(self, images: torch.Tensor, stage: Stage) -> torch.Tensor:
        return self.hog(images, [stage.index])[stage.index]

    def forward_stages(self, images: torch.Tensor, stages: Sequence[Stage]) -> Dict[int, torch.Tensor]:
        return self.hog(images, [s.index for s in stages])

    def picture(self, values: torch.Tensor, stage: Stage, prediction: bool = False, cell_px: int = 8
                ) -> torch.Tensor:
        """Orientation glyphs (util.vis.hog_glyphs); a prediction is clamped at 0 and L2-normalised per cell and
        colour like the targets, so both sides of a pair use the same scale."""
        from util.vis import hog_glyphs
        maps = cells_to_maps(values.float(), stage.grid)
        if prediction:
            b, f, g, _ = maps.shape
            maps = F.normalize(maps.clamp_min(0).view(b, -1, self.nbins, g, g), dim=2).view(b, f, g, g)
        return hog_glyphs(maps, self.nbins, cell_px)

    def compile_regions(self, **opts) -> None:
        self.hog.compile(**{**opts, 'fullgraph': False})  # its cell-index cache is Python state


# ---------------------------------------------------------------------------------------------------------------------
# Pixels (MAE)


PIXEL_EPS = 1e-6


@register('pixel')
class PixelTarget(Target):
    """MAE's ``norm_pix_loss`` target at the stage's cell size: each cell's pixels, ordered (row, column, channel)
    as MAE's ``patchify``, ``cell_size² · in_chans`` values, normalised by the cell's own statistics:
    ``(x - mean) / sqrt(var + 1e-6)`` (mean and unbiased variance over the cell's values, as MAE). fp32."""

    def __init__(self, stages: Sequence[Stage] = (), options: Optional[Mapping[str, Any]] = None):
        super().__init__(stages, options)
        for s in self.stages:
            if self.dim(s) < 2:
                raise UserError(f'pixel target at stage {s.index}: a {s.cell_size}-px cell of {s.in_chans} channel '
                                f'has one value, so its normalisation is undefined; use another target there '
                                f'(--stage_targets)')

    def dim(self, stage: Stage) -> int:
        return stage.in_chans * stage.cell_size ** 2

    def forward(self, images: torch.Tensor, stage: Stage) -> torch.Tensor:
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = images.float()
            b, c = x.shape[:2]
            s, g = stage.cell_size, stage.grid
            x = x.reshape(b, c, g, s, g, s).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, s * s * c)
            mean = x.mean(dim=-1, keepdim=True)
            var = x.var(dim=-1, keepdim=True)
            return (x - mean) / (var + PIXEL_EPS) ** 0.5

    def picture(self, values: torch.Tensor, stage: Stage, prediction: bool = False, cell_px: int = 8
                ) -> torch.Tensor:
        """The normalised cells put back in place (every cell stretched to its own contrast), scaled to
        ``grid · cell_px`` pixels."""
        b = values.shape[0]
        s, g, c = stage.cell_size, stage.grid, stage.in_chans
        img = values.float().reshape(b, g, g, s, s, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * s, g * s)
        img = _minmax(img)
        return F.interpolate(img, size=(g * cell_px, g * cell_px), mode='nearest')
