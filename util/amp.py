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


def set_cuda_speed_flags(device: torch.device, tf32: bool = True, cudnn_benchmark: bool = True) -> dict:
    """What a careful CUDA user sets; a no-op on other devices. Returns what was set (for the log).

    ``tf32``: fp32 matmuls and convolutions (the parts autocast leaves in fp32, all of ``--amp none``) use TF32
    tensor cores on Ampere and newer (10-bit mantissa inputs, fp32 accumulation). ``cudnn_benchmark``: cuDNN times
    its algorithms once per shape and keeps the fastest: every shape here is fixed (drop_last batches, fixed
    decoder heads), so the search is paid once per freeze state. Both trade bit-reproducibility across runs for
    speed; CPU runs (the bit-exact-resume guarantee) are untouched.
    """
    if device.type != 'cuda':
        return {}
    torch.set_float32_matmul_precision('high' if tf32 else 'highest')
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    return {'tf32': bool(tf32), 'cudnn_benchmark': bool(cudnn_benchmark)}


def fused_attention_report(model: torch.nn.Module) -> str:
    """'' when every timm attention module uses fused scaled_dot_product_attention, else one note line naming how
    many do not (timm reads ``TIMM_FUSED_ATTN``; 0 turns the fused kernel off)."""
    mods = [m for m in model.modules() if hasattr(m, 'fused_attn')]
    slow = [m for m in mods if not m.fused_attn]
    if not slow:
        return ''
    return (f'note: {len(slow)}/{len(mods)} attention modules run unfused attention (explicit softmax(QK^T)V, '
            f'more memory, slower); unset TIMM_FUSED_ATTN=0 to use scaled_dot_product_attention')
