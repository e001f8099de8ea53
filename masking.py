"""Mask curriculum by token distance (``--mask_curriculum START:END``): block-wise masks whose difficulty rises
linearly over training. Without the flag the model keeps MAE's random masking (``LocalMIM.random_masking``).

Difficulty of a mask on the g x g patch grid: the mean, over its masked tokens, of the Euclidean distance (in
patches, between grid positions) from the token to its nearest visible token; a batch's difficulty is the mean over
its masks (every mask has the same number of masked tokens). Random masking at ratio 0.75 has ~1.2 (most masked
tokens touch a visible one); larger masked blocks push masked tokens away from anything visible.

Generator (:func:`block_shuffle`): tile the grid with s x s blocks at a random offset per image, order the blocks at
random, and keep the first ``keep = int(L (1 - ratio))`` tokens of that order (tokens in random order within a
block) visible: every masked region is a union of s x s blocks, and exactly ``keep`` tokens stay visible as in
random masking. Side 1 is random masking's distribution. The expected difficulty E(s) of side s at the run's ratio
and grid is measured once at model build (:func:`calibrate`, a private RNG, a few hundred masks per side) for s =
1, 2, ... while it increases. A target difficulty D between E(s_j) and E(s_{j+1}) draws each image's side from
{s_j, s_{j+1}} with P(s_{j+1}) = (D - E(s_j)) / (E(s_{j+1}) - E(s_j)), so the expected difficulty is D.

Schedule: at optimizer step j of T, D = START + (END - START) j / T (END is reached at step T, like
--stage_weights_end). The engine passes the progress j / T at optimizer-step boundaries (``LocalMIM.set_progress``),
so the step reaches the generator as a host float: no device value is read. Masks draw from the global torch RNG
(a fixed number of draws per batch), which the checkpoint restores: a resume is exact.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch

from util.errors import UserError

CALIBRATION_SEED = 0


def grid_distances(grid: int, device=None) -> torch.Tensor:
    """[L, L] Euclidean distances between the positions of a g x g grid (row-major), in patches."""
    idx = torch.arange(grid * grid, device=device)
    pos = torch.stack([idx // grid, idx % grid], dim=1).float()
    return torch.cdist(pos, pos)


def nearest_visible_distance(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """mask [B, L] (1 = masked) -> [B, L]: each token's distance to the nearest visible token (0 if visible)."""
    d = grid_distances(grid, mask.device)
    out = []
    for m in mask.split(max(1, (1 << 22) // d.numel())):  # bounded memory: chunk x L x L
        vis = m < 0.5
        out.append(torch.where(vis[:, None, :], d[None], torch.full_like(d, math.inf)[None]).amin(dim=-1))
    return torch.cat(out)


def mask_difficulty(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """mask [B, L] (1 = masked) -> [B]: mean distance of a masked token to its nearest visible token (0 without
    masked tokens; inf without visible ones)."""
    dist = nearest_visible_distance(mask, grid)
    masked = mask > 0.5
    return torch.where(masked, dist, torch.zeros_like(dist)).sum(1) / masked.sum(1).clamp_min(1)


def block_shuffle(sides: torch.Tensor, grid: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """ids_shuffle [B, L] of block-wise masks: image b's tokens ordered by a random order of s_b x s_b blocks (the
    tiling shifted by a random offset in [0, s_b)^2), then at random within a block. ``sides`` [B] (int, >= 1).
    Draws, per image: 2 offsets, (g+1)^2 block keys and L token keys, whatever the sides."""
    b, dev, n = sides.shape[0], sides.device, grid * grid
    s = sides.long().view(b, 1)
    off = (torch.rand(b, 2, device=dev, generator=generator) * s).long()  # [B, 2] in [0, s)
    idx = torch.arange(n, device=dev).view(1, n)
    row, col = idx // grid, idx % grid
    block = ((row + off[:, :1]) // s) * (grid + 1) + (col + off[:, 1:]) // s  # < (g+1)^2
    block_key = torch.rand(b, (grid + 1) ** 2, device=dev, generator=generator)
    token_key = torch.rand(b, n, device=dev, generator=generator)
    by_token = torch.argsort(token_key, dim=1)
    by_block = torch.argsort(torch.gather(torch.gather(block_key, 1, block), 1, by_token), dim=1, stable=True)
    return torch.gather(by_token, 1, by_block)  # sorted by (block key, token key)


def shuffle_to_mask(x: torch.Tensor, ids_shuffle: torch.Tensor, mask_ratio: float
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's bookkeeping for a token order: x [B,L,D] -> (kept [B,keep,D], mask [B,L] 1=removed, ids_restore)."""
    d = x.shape[-1]
    keep = int(x.shape[1] * (1 - mask_ratio))
    kept = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, d))
    return (kept, *order_to_mask(ids_shuffle, mask_ratio))


def order_to_mask(ids_shuffle: torch.Tensor, mask_ratio: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask [B,L] 1=removed, ids_restore) of a token order, without the tokens (a cached prefix supplies them)."""
    b, n = ids_shuffle.shape
    keep = int(n * (1 - mask_ratio))
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(b, n, device=ids_shuffle.device)
    mask[:, :keep] = 0
    return torch.gather(mask, 1, ids_restore), ids_restore


def calibrate(grid: int, mask_ratio: float, up_to: float = math.inf, samples: Optional[int] = None
              ) -> Tuple[List[int], List[float]]:
    """``(sides, E(side))``: the mean difficulty of block masks of side 1, 2, ... on a g x g grid at ``mask_ratio``,
    kept while it increases, until it exceeds ``up_to`` (or the side reaches g). Deterministic (a private CPU RNG)."""
    n = grid * grid
    samples = samples or max(128, -(-(1 << 16) // n))
    gen = torch.Generator().manual_seed(CALIBRATION_SEED)
    x = torch.zeros(samples, n, 1)
    sides, levels = [], []
    for s in range(1, grid + 1):
        ids = block_shuffle(torch.full((samples,), s), grid, gen)
        level = float(mask_difficulty(shuffle_to_mask(x, ids, mask_ratio)[1], grid).mean())
        if levels and level <= levels[-1]:
            break
        sides.append(s)
        levels.append(level)
        if level > up_to:
            break
    return sides, levels


def parse_curriculum(spec: str, flag: str = '--mask_curriculum') -> Tuple[str, str]:
    """'START:END' -> the two fields (each a number > 0, or min/max: the easiest/hardest block masks)."""
    parts = spec.split(':')
    if len(parts) != 2:
        raise UserError(f"{flag} {spec!r}: expected START:END, two mask difficulties (mean distance in patches of a "
                        f"masked token to its nearest visible one) or min/max, e.g. 1.2:2.5")
    for p in parts:
        if p not in ('min', 'max'):
            try:
                v = float(p)
            except ValueError:
                v = math.nan
            if not (math.isfinite(v) and v > 0):
                raise UserError(f"{flag} {spec!r}: {p!r} is not a difficulty (a number > 0, or min/max)")
    return parts[0], parts[1]


def check_mask_curriculum(flag: str, value: str) -> Optional[str]:
    """The string domain of --mask_curriculum (util.args.domain_errors): the syntax; the reachable range depends on
    the patch grid and is checked when the model is built."""
    try:
        parse_curriculum(value, flag)
    except UserError:
        return (f"{flag} {value!r}: expected START:END, each a difficulty > 0 (mean distance in patches of a masked "
                f"token to its nearest visible one) or min/max, e.g. min:2.5")
    return None


class BlockMaskCurriculum:
    """Block-wise masking whose expected difficulty moves linearly from ``start`` to ``end`` over training.

    ``__call__(x, mask_ratio)`` has random masking's contract: x [B,L,D] -> (kept [B,keep,D], mask [B,L] 1=removed,
    ids_restore [B,L]); :meth:`set_progress` (step / T) sets the difficulty. Values out of the range the generator
    reaches at the build ratio (``levels[0]`` = random masking's difficulty .. ``levels[-1]``) are a UserError.
    """

    def __init__(self, spec: str, grid: int, mask_ratio: float):
        lo_s, hi_s = parse_curriculum(spec)
        self.spec, self.grid, self.mask_ratio = spec, grid, mask_ratio
        nums = [float(v) for v in (lo_s, hi_s) if v not in ('min', 'max')]
        need = math.inf if 'max' in (lo_s, hi_s) else max(nums, default=0.0)  # calibrate only as far as needed
        self._tables: Dict[float, Tuple[List[int], List[float]]] = {mask_ratio: calibrate(grid, mask_ratio, need)}
        sides, levels = self._tables[mask_ratio]
        ends = []
        for name, v in (('START', lo_s), ('END', hi_s)):
            d = levels[0] if v == 'min' else levels[-1] if v == 'max' else float(v)
            if not levels[0] - 5e-4 <= d <= levels[-1] + 5e-4:
                raise UserError(f'--mask_curriculum {spec}: {name} {d:g} is out of reach at --mask_ratio '
                                f'{mask_ratio:g} on a {grid}x{grid} patch grid: block masks give difficulties in '
                                f'[{levels[0]:.3f}, {levels[-1]:.3f}] (the lower end is random masking; blocks up '
                                f'to {sides[-1]}x{sides[-1]}); min/max name the ends')
            ends.append(min(max(d, levels[0]), levels[-1]))
        self.start, self.end = ends
        self.progress = 0.0

    def set_progress(self, progress: float) -> None:
        self.progress = float(progress)

    @property
    def difficulty(self) -> float:
        """The target (expected) difficulty now: START + (END - START) * progress."""
        return self.start + (self.end - self.start) * self.progress

    def side_mix(self, difficulty: float, mask_ratio: Optional[float] = None) -> Tuple[int, int, float]:
        """``(s_lo, s_hi, P(s_hi))`` whose mixture has expected difficulty ``difficulty`` (clamped to the range)."""
        sides, levels = self._table(self.mask_ratio if mask_ratio is None else mask_ratio)
        if difficulty <= levels[0] or len(sides) == 1:
            return sides[0], sides[0], 0.0
        for j in range(len(sides) - 1):
            if difficulty <= levels[j + 1]:
                return sides[j], sides[j + 1], (difficulty - levels[j]) / (levels[j + 1] - levels[j])
        return sides[-1], sides[-1], 0.0

    def mean_side(self) -> float:
        lo, hi, p = self.side_mix(self.difficulty)
        return lo + (hi - lo) * p

    def _table(self, ratio: float) -> Tuple[List[int], List[float]]:
        if ratio not in self._tables:  # another ratio (a caller's own forward): calibrate it once
            self._tables[ratio] = calibrate(self.grid, ratio)
        return self._tables[ratio]

    def sample_sides(self, batch: int, device, mask_ratio: Optional[float] = None,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        lo, hi, p = self.side_mix(self.difficulty, mask_ratio)
        u = torch.rand(batch, device=device, generator=generator)  # drawn whatever p: the RNG stream stays aligned
        return torch.where(u < p, hi, lo)

    def __call__(self, x: torch.Tensor, mask_ratio: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sides = self.sample_sides(x.shape[0], x.device, mask_ratio)
        return shuffle_to_mask(x, block_shuffle(sides, self.grid), mask_ratio)

    def describe(self) -> str:
        sides, levels = self._tables[self.mask_ratio]
        return (f'mask curriculum: block masks, difficulty (mean distance in patches of a masked token to its nearest '
                f'visible one) {self.start:.3f} -> {self.end:.3f} linearly over the optimizer steps; at --mask_ratio '
                f'{self.mask_ratio:g} on the {self.grid}x{self.grid} grid block side s gives '
                + ', '.join(f'{s}: {v:.3f}' for s, v in zip(sides, levels)) + ' (side 1 = random masking)')

    def record(self) -> Dict[str, float]:
        """Per-epoch log fields: the target difficulty now and the mean block side drawn for it."""
        return {'mask_difficulty': self.difficulty, 'mask_block_side': self.mean_side()}
