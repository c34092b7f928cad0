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
