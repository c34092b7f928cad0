"""Precision rules of the MoE slots: routers and gates in fp32 always, experts in the autocast
dtype when autocast is on (``--amp``, ``torch.autocast``), else in the model's dtype."""

from contextlib import nullcontext

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's for ``x``'s device when autocast is on, else
    ``x``'s own (``--fp16``/``--bf16`` models are cast)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def autocast_off(x: Tensor):
    """A context with autocast disabled for ``x``'s device (a no-op context when it is off
    already, which is cheaper than re-entering autocast on every pass)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return nullcontext()


def bf16_autocast(device_type: str, enabled: bool):
    """``--smoe-bf16``: a training forward under ``torch.autocast(device_type, bfloat16)`` (CUDA or
    CPU), the weights, gradients and optimizer state staying fp32 and no loss scaling (bf16 has
    fp32's exponent range); a no-op context when not ``enabled``. Nested inside fairseq's own
    ``torch.cuda.amp.autocast`` it would take precedence, which is why --smoe-bf16 refuses --amp."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def cuda_bf16_capable(device=None) -> bool:
    """Whether this CUDA device computes bf16 natively (compute capability 8.0+: A100, H100, ...;
    ROCm devices: torch's own answer). torch's ``is_bf16_supported()`` also says True for the
    emulation on older GPUs, which is far slower than fp16 there."""
    if getattr(torch.version, "hip", None):
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_capability(device)[0] >= 8
