"""Reuse, on CPU, the memory of the expert pass's large intermediate tensors across passes,
blocks and steps.

An expert pass makes a handful of row buffers: the gathered expert rows ``[R, d]``, the hidden
rows ``[R, d_ff]``, the expert outputs, their per-assignment gather, and the same again in the
backward. At training batch sizes they are tens to hundreds of MB (M4 at 4096 tokens: the first
pass's hidden rows are 64 MB), so glibc's malloc hands each one out as a fresh ``mmap`` and the
kernel page-faults in and zeroes every page on first touch: measured, about a seventh of a
training forward at M4 size (``scripts/benchmark_layer.py``: with malloc told to keep such
blocks, ``ours`` 402 ms against 462-483). On CUDA the caching allocator already reuses
memory, and small tensors are recycled by malloc itself, so only CPU tensors of at least
``MIN_BYTES`` come from here.

``ScratchPool`` keeps the flat buffers it made and hands one out again (as a view of its first
bytes) only when nothing else holds its memory: the buffer's storage has no other reference
(``grad_reuse.holders``: no tensor saved for a backward, no output still alive, no user
reference). Callers write every element of what they get (``out=`` of a GEMM over all rows, an
``index_select``, a ``zero_`` first), so results do not depend on the reuse. A request no free
buffer fits replaces the largest free buffer that is too small, or adds one: the pool holds at
most as many buffers as were in use at once, each as large as the largest request it served.
The price is that memory: between steps it stays allocated (on CUDA the caching allocator does
the same). ``clear()`` gives it back.
"""

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .grad_reuse import CAN_COUNT, holders

MIN_BYTES = 1 << 20  # smaller tensors: malloc recycles them without page faults


class ScratchPool:
    def __init__(self):
        self.kept: List[Tensor] = []  # flat uint8 CPU buffers

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """An uninitialised contiguous CPU tensor of ``shape`` and ``dtype`` on reused memory."""
        need = math.prod(shape) * dtype.itemsize
        # buffers and views are normal tensors even under inference_mode, so that a buffer
        # made while generating can serve training later
        with torch.inference_mode(False):
            best = small = None
            for i, t in enumerate(self.kept):
                if holders(t) != 1:
                    continue
                if t.numel() >= need:
                    if best is None or t.numel() < self.kept[best].numel():
                        best = i
                elif small is None or t.numel() > self.kept[small].numel():
                    small = i
            if best is None:
                buf = torch.empty(need, dtype=torch.uint8)
                if small is None:
                    self.kept.append(buf)
                else:
                    self.kept[small] = buf
            else:
                buf = self.kept[best]
            return buf[:need].view(dtype).view(tuple(shape))

    def clear(self) -> None:
        self.kept = []

    def kept_bytes(self) -> int:
        return sum(t.numel() for t in self.kept)


POOL = ScratchPool()  # one per process: the buffers of one block are free before the next runs


def scratch(shape: Sequence[int], like: Tensor, dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    """An uninitialised tensor of ``shape`` (dtype ``dtype`` or ``like``'s) from ``POOL`` where
    that pays (CPU, at least ``MIN_BYTES``), else None: the caller allocates as it would."""
    dtype = like.dtype if dtype is None else dtype
    if not CAN_COUNT or like.device.type != "cpu" or math.prod(shape) * dtype.itemsize < MIN_BYTES:
        return None
    return POOL.empty(shape, dtype)
