"""Reuse, on CPU, the memory of the expert weights' gradients from one backward to the next.

fairseq frees the gradients between updates (``p.grad = None``), so every backward allocates
the stacked ``[E, d_ff, d]`` gradients afresh. On CUDA the caching allocator hands the same
block back. On CPU a tensor that large (256 MB per weight at M15 sizes) is a fresh ``mmap``
each time, and the kernel page-faults in and zeroes every page on first touch: allocating and
zeroing one costs about 4x zeroing one that exists (``scripts/benchmark_cpu_gemm.py``). Under
skewed routing most experts are idle and their gradients are only zeroed, so that fault cost is
a large share of the step.

``GradBuffers`` keeps the tensors of the previous backward and gives one out again only when
nothing else holds its memory any more: the storage's only reference is the kept tensor (no
``p.grad``, no view, no alias; counted with torch's storage use count). A gradient still alive
(gradient accumulation over ``--update-freq``, a user's reference, a hook's copy) is never
written: a new tensor is allocated instead. Every element of a handed-out tensor is overwritten
by the backward (``ExpertGrads``: written, added, or zeroed for idle experts), so what is
computed does not depend on the reuse. The price is memory: between backwards the kept
gradients stay allocated (as ``zero_grad(set_to_none=False)`` would keep them). CUDA tensors are
never kept.
"""

from typing import List, Sequence

import torch
from torch import Tensor

_use_count = getattr(torch._C, "_storage_Use_Count", None)
CAN_COUNT = _use_count is not None  # else nothing is ever reused (here or in scratch.py)


def holders(t: Tensor) -> int:
    """How many tensors share ``t``'s memory (``t`` included), or a large number when this
    torch cannot count them (then nothing is ever reused)."""
    if _use_count is None:
        return 1 << 30
    storage = t.untyped_storage()  # this Python handle is one more reference while it lives
    return _use_count(storage._cdata) - 1


class GradBuffers:
    """The expert-weight gradient tensors of one ``StackedExperts``, kept between backwards
    (CPU only; see the module doc). Holds no state worth saving: copies and pickles start empty."""

    def __init__(self):
        self.kept: List[Tensor] = []

    def like(self, params: Sequence[Tensor]) -> List[Tensor]:
        """Uninitialised tensors shaped like ``params`` for their gradients: on CPU the kept
        ones that nothing else holds, new ones for the rest (kept from now on). The tensors
        returned are aliases of the kept ones (so autograd may take them as ``.grad`` without
        copying: ``AccumulateGrad`` steals a gradient only no other tensor object refers to)."""
        if not params or params[0].device.type != "cpu":
            self.kept = []  # (a model moved off the CPU keeps nothing)
            return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
        kept = list(self.kept) if len(self.kept) == len(params) else [None] * len(params)
        for i, p in enumerate(params):
            k = kept[i]
            if k is None or k.shape != p.shape or k.dtype != p.dtype or holders(k) != 1:
                kept[i] = torch.empty_like(p, memory_format=torch.contiguous_format)
        self.kept = kept
        return [k.detach() for k in kept]

    def __deepcopy__(self, memo):
        return GradBuffers()

    def __getstate__(self):
        return {"kept": []}
