"""Grouped GEMMs over rows sorted by expert: the expert computation with no padding.

Rows come in ``chunks``: a list of ``(expert, rows)`` in row order, e.g. ``[(0, 3), (1, 0),
(2, 5)]`` for 3 rows of expert 0 then 5 of expert 2 (host ints). Every function computes, for
each chunk, its rows against its expert's weights, and nothing else: no row is padded to the
longest queue, so the cost follows the assignments whatever the routing skew. (With expert
parallelism an expert's rows arrive as one chunk per sending rank.)

Two backends, picked per call by ``backend_for``:

* ``grouped``: ``torch._grouped_mm`` (what ``torch.nn.functional.grouped_mm`` calls), one
  kernel for all experts, only where torch 2.13 runs its fast kernel (``fast_grouped_mm``:
  CUDA, not ROCm, compute capability major 9 or 10, bf16, a build with the kernel; elsewhere
  torch falls back to a loop of its own that copies the offsets to the host at every call, or
  raises), and only for one chunk per expert in expert order, some rows, under 1024 experts;
* ``loop``: one ``addmm``/``mm`` per chunk with rows, written straight into the output (bias
  fused, no host sync: the counts are host ints already). On CPU torch 2.13's grouped kernel
  is such a loop too (fp32/bf16/fp16 only, no bias), and measured no faster.

Experts with no rows: the forward and input-gradient layouts (2d x 3d, rows ragged, the rows
given row-major: column-major, torch's kernel asserts 16-byte aligned groups) accept empty and
odd groups; the weight gradient (2d x 2d, the contraction ragged) accepts them only with
its first operand column-major and its second row-major (torch's ``prepare_grouped_gemm_data``
asserts non-empty groups for the other three layouts), which ``grouped_weight_grad`` always
passes; and since what the kernel writes for an empty group is not reliable on every
architecture (zero-K groups on sm100, pytorch#172439), an idle expert's gradient is written 0
(or left as it is) from the host counts, never taken from the kernel.

``force_backend`` overrides the choice (tests run the ``grouped`` path on CPU).
"""

import sys
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

Chunks = Sequence[Tuple[int, int]]
_FORCED: List[Optional[str]] = [None]


@contextmanager
def force_backend(name: Optional[str]) -> Iterator[None]:
    assert name in (None, "loop", "grouped")
    old, _FORCED[0] = _FORCED[0], name
    try:
        yield
    finally:
        _FORCED[0] = old


def per_expert(counts: List[int]) -> List[Tuple[int, int]]:
    """The chunks of rows sorted by expert with ``counts[e]`` rows of expert e."""
    return list(enumerate(counts))


# torch's bf16 grouped kernel takes fewer than this many groups (GroupMM.cu: TORCH_CHECK)
MAX_GROUPS = 1024
_FAST: Dict[torch.device, bool] = {}


def fast_grouped_mm(device: torch.device) -> bool:
    """Whether ``torch._grouped_mm`` runs torch's fast bf16 kernel (no host sync) on ``device``.

    Exactly torch 2.13's own condition (``_grouped_mm_cuda`` in ATen's cuda/GroupedBlas.cpp:
    ``_scaled_mm_allowed_device(sm90_only, sm100_only)``, i.e. compute capability major 9 or
    10, and not ROCm) and the kernel's build condition (``BUILD_GG_KERNEL`` in GroupMM.cu: CUDA
    12 or later, not Windows; without it the call raises). Elsewhere (sm 8.x, 11.x, 12.x, ROCm)
    torch runs ``_grouped_mm_fallback``, which copies the offsets to the host at every call.
    ROCm's CK kernel (gfx942/gfx950 builds with CK) is not taken: not tested here. The bf16
    condition is the caller's (``backend_for``). Decided once per device."""
    if device.type != "cuda":
        return False
    fast = _FAST.get(device)
    if fast is None:
        fast = _FAST[device] = _fast_grouped_mm(device)
    return fast


def _fast_grouped_mm(device: torch.device) -> bool:
    cuda = torch.version.cuda
    if torch.version.hip or not cuda or sys.platform == "win32" or int(cuda.split(".")[0]) < 12:
        return False
    if not hasattr(torch, "_grouped_mm") or not torch._C._dispatch_has_kernel_for_dispatch_key(
            "aten::_grouped_mm", "CUDA"):
        return False
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def backend_for(x: Tensor, w: Optional[Tensor], chunks: Chunks, counts_V: Optional[Tensor]) -> str:
    """``grouped`` where torch has its fast kernel for ``x`` (``fast_grouped_mm``, bf16 ``x``
    and weights ``w``, whose rows need 16-byte strides), the chunks are one per expert with
    device counts given, fewer than ``MAX_GROUPS``, with some rows; else ``loop``."""
    one_per_expert = counts_V is not None and all(e == i for i, (e, _) in enumerate(chunks))
    if _FORCED[0] is not None:
        return "grouped" if (_FORCED[0] == "grouped" and one_per_expert) else "loop"
    if not (one_per_expert and x.dtype == torch.bfloat16 and (w is None or w.dtype == torch.bfloat16)):
        return "loop"
    aligned = all(t is None or t.size(-1) % 8 == 0 for t in (x, w))
    if aligned and 0 < len(chunks) < MAX_GROUPS and any(c for _, c in chunks) and fast_grouped_mm(x.device):
        return "grouped"
    return "loop"


def _groups(chunks: Chunks, *tensors: Tensor):
    """(expert, each tensor's rows of the chunk) for the chunks with rows; one split per tensor."""
    parts = [t.split([c for _, c in chunks]) for t in tensors]
    for i, (e, c) in enumerate(chunks):
        if c:
            yield (e, *(p[i] for p in parts))


def _row_major(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def group_offsets(counts_V: Tensor) -> Tensor:
    """``torch._grouped_mm``'s ``offs`` (int32 end offsets) from device counts, with no host
    round trip (a host-to-device copy from pageable memory would wait for the stream)."""
    return counts_V.cumsum(0).to(torch.int32)


def grouped_linear(x_Rk: Tensor, w_Vmk: Tensor, chunks: Chunks, bias_Vm: Optional[Tensor] = None,
                   counts_V: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """``x_e @ w_e^T (+ b_e)`` for every chunk's rows, ``w`` in nn.Linear's ``[out, in]`` layout:
    ``[R, k] -> [R, m]`` (into ``out`` if given)."""
    R, m = x_Rk.size(0), w_Vmk.size(1)
    if backend_for(x_Rk, w_Vmk, chunks, counts_V) == "grouped":
        # rows ragged: x row-major (given column-major, the kernel asserts 16-byte aligned groups)
        y = torch._grouped_mm(_row_major(x_Rk), w_Vmk.transpose(1, 2), offs=group_offsets(counts_V))
        if bias_Vm is not None:
            y += torch.repeat_interleave(bias_Vm, counts_V, dim=0, output_size=R)
        return y if out is None else out.copy_(y)
    out = x_Rk.new_empty(R, m) if out is None else out
    w = w_Vmk.unbind(0)
    bias = bias_Vm.unbind(0) if bias_Vm is not None else None
    for e, x_e, out_e in _groups(chunks, x_Rk, out):
        if bias is None:
            torch.mm(x_e, w[e].t(), out=out_e)
        else:
            torch.addmm(bias[e], x_e, w[e].t(), out=out_e)
    return out


def grouped_linear_t(x_Rm: Tensor, w_Vmk: Tensor, chunks: Chunks,
                     counts_V: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """``x_e @ w_e`` for every chunk's rows (the input gradient of ``grouped_linear``):
    ``[R, m] -> [R, k]`` (into ``out`` if given)."""
    if backend_for(x_Rm, w_Vmk, chunks, counts_V) == "grouped":
        y = torch._grouped_mm(_row_major(x_Rm), w_Vmk, offs=group_offsets(counts_V))
        return y if out is None else out.copy_(y)
    out = x_Rm.new_empty(x_Rm.size(0), w_Vmk.size(2)) if out is None else out
    w = w_Vmk.unbind(0)
    for e, x_e, out_e in _groups(chunks, x_Rm, out):
        torch.mm(x_e, w[e], out=out_e)
    return out


def grouped_weight_grad(x_Rk: Tensor, g_Rm: Tensor, chunks: Chunks, gw_Vmk: Tensor, gb_Vm: Tensor,
                        fresh: List[bool], counts_V: Optional[Tensor] = None) -> None:
    """Weight and bias gradients of ``grouped_linear``: ``gw_e = g_e^T x_e``, ``gb_e = sum g_e``
    over the chunks of expert e, in place: written over the experts with ``fresh[e]`` (no
    gradient yet; 0 for one with no rows), added to the others. Clears ``fresh`` for the
    experts it wrote."""
    gw, gb = gw_Vmk.unbind(0), gb_Vm.unbind(0)
    if backend_for(x_Rk, g_Rm, chunks, counts_V) == "grouped":
        offs = group_offsets(counts_V)
        # 2d x 2d, rows (the contraction) ragged: g^T column-major, x row-major, the one layout
        # whose kernel takes empty groups
        g_Rm, x_Rk = _row_major(g_Rm), _row_major(x_Rk)
        full_w = torch._grouped_mm(g_Rm.t(), x_Rk, offs=offs).unbind(0)
        # bias: 1^T g_e by the same kernel, which accumulates in fp32 (torch.segment_reduce
        # sums in the input dtype: 4096 ones give 256 in bf16); 8 rows of ones for the
        # operand's 16-byte stride, row 0 kept
        ones = g_Rm.new_ones(g_Rm.size(0), 8).t()
        full_b = torch._grouped_mm(ones, g_Rm, offs=offs)[:, 0].unbind(0)
        for e, (_, rows) in enumerate(chunks):
            if not rows:  # no rows: 0 so far, whatever the kernel wrote for the empty group
                if fresh[e]:
                    gw[e].zero_()
                    gb[e].zero_()
            elif fresh[e]:
                gw[e].copy_(full_w[e])
                gb[e].copy_(full_b[e])
            else:
                gw[e].add_(full_w[e])
                gb[e].add_(full_b[e])
            fresh[e] = False
        return
    for e, x_e, g_e in _groups(chunks, x_Rk, g_Rm):
        if fresh[e]:
            torch.mm(g_e.t(), x_e, out=gw[e])
            torch.sum(g_e, 0, out=gb[e])
            fresh[e] = False
        else:
            gw[e].addmm_(g_e.t(), x_e)
            gb[e].add_(g_e.sum(0))
    for e, _ in chunks:
        if fresh[e]:  # an expert of the pass with no rows: gradient 0 so far
            gw[e].zero_()
            gb[e].zero_()
            fresh[e] = False
