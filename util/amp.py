"""Mixed precision that follows the device: bf16 autocast on CUDA where supported, fp16 + GradScaler otherwise,
plain fp32 on CPU (``--amp`` overrides)."""
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from util.errors import UserError


@dataclass
class Amp:
    device_type: str
    dtype: Optional[torch.dtype]  # None = fp32, autocast off
    scaler: Optional[torch.amp.GradScaler]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[self.dtype]


def make_amp(device: torch.device, mode: str = 'auto') -> Amp:
    """``mode``: auto | bf16 | fp16 | none. ``auto`` = bf16 on CUDA if supported, else fp16; fp32 on CPU."""
    if mode not in ('auto', 'bf16', 'fp16', 'none'):
        raise UserError(f'--amp {mode}: choose one of auto, bf16, fp16, none')
    if device.type != 'cuda':
        if mode in ('fp16',):
            raise UserError('--amp fp16 needs a CUDA device; on CPU use --amp none (default) or bf16')
        dtype = torch.bfloat16 if mode == 'bf16' else None
        return Amp(device.type, dtype, None)
    if mode == 'none':
        return Amp('cuda', None, None)
    if mode == 'bf16' or (mode == 'auto' and torch.cuda.is_bf16_supported()):
        return Amp('cuda', torch.bfloat16, None)
    return Amp('cuda', torch.float16, torch.amp.GradScaler('cuda'))
