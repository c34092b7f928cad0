"""Grouped GEMMs over rows sorted by expert: the expert computation with no padding.

Rows ``x_Rk`` hold ``counts[e]`` consecutive rows for each expert e of ``w_Vkm`` (``counts`` on
the host, sum R). Every function computes, for each expert, its own rows against its own
weights, and nothing else: no row is padded to the longest queue, so the cost follows the
assignments whatever the routing skew.

Two backends, picked per call by ``backend_for``:

* ``grouped``: ``torch._grouped_mm`` (what ``torch.nn.functional.grouped_mm`` calls), one
  kernel for all experts; used on CUDA for bf16 on compute capability 9.0+, where torch 2.13
  has its fast kernel (elsewhere it falls back to a loop of its own with a host sync);
* ``loop``: one ``addmm``/``mm`` per expert with rows, written straight into the output (bias
  fused, no host sync: the counts are host ints already). On CPU torch 2.13's grouped kernel
  is such a loop too (fp32/bf16/fp16 only, no bias), and measured no faster.

``force_backend`` overrides the choice (tests run the ``grouped`` path on CPU in fp32).
"""

from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
from torch import Tensor

_FORCED: List[Optional[str]] = [None]


@contextmanager
def force_backend(name: Optional[str]) -> Iterator[None]:
    assert name in (None, "loop", "grouped")
    old, _FORCED[0] = _FORCED[0], name
    try:
        yield
    finally:
        _FORCED[0] = old


def backend_for(x: Tensor, w: Optional[Tensor] = None) -> str:
    """``grouped`` where torch has its fast kernel for ``x`` (and the weights ``w``: its
    operands need 16-byte strides), else ``loop``."""
    if _FORCED[0] is not None:
        return _FORCED[0]
    aligned = all(t is None or t.size(-1) % 8 == 0 for t in (x, w))
    if (aligned and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0)):
        return "grouped"
    return "loop"


def _spans(counts: List[int]):
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, start, start + c
        start += c


def group_offsets(counts_V: Tensor) -> Tensor:
    """``torch._grouped_mm``'s ``offs`` (int32 end offsets) from device counts, with no host
    round trip (a host-to-device copy from pageable memory would wait for the stream)."""
    return counts_V.cumsum(0).to(torch.int32)


def grouped_linear(x_Rk: Tensor, w_Vkm: Tensor, counts: List[int], bias_Vm: Optional[Tensor] = None,
                   counts_V: Optional[Tensor] = None) -> Tensor:
    """``x_e @ w_e (+ b_e)`` for every expert's rows: ``[R, k] -> [R, m]``."""
    R, m = x_Rk.size(0), w_Vkm.size(2)
    if backend_for(x_Rk, w_Vkm) == "grouped":
        out = torch._grouped_mm(x_Rk, w_Vkm, offs=group_offsets(counts_V))
        if bias_Vm is not None:
            out += torch.repeat_interleave(bias_Vm, counts_V, dim=0, output_size=R)
        return out
    out = x_Rk.new_empty(R, m)
    for e, a, b in _spans(counts):
        if bias_Vm is None:
            torch.mm(x_Rk[a:b], w_Vkm[e], out=out[a:b])
        else:
            torch.addmm(bias_Vm[e], x_Rk[a:b], w_Vkm[e], out=out[a:b])
    return out


def grouped_linear_t(x_Rm: Tensor, w_Vkm: Tensor, counts: List[int],
                     counts_V: Optional[Tensor] = None) -> Tensor:
    """``x_e @ w_e^T`` for every expert's rows (the input gradient of ``grouped_linear``):
    ``[R, m] -> [R, k]``."""
    if backend_for(x_Rm, w_Vkm) == "grouped":
        return torch._grouped_mm(x_Rm, w_Vkm.transpose(1, 2), offs=group_offsets(counts_V))
    out = x_Rm.new_empty(x_Rm.size(0), w_Vkm.size(1))
    for e, a, b in _spans(counts):
        torch.mm(x_Rm[a:b], w_Vkm[e].t(), out=out[a:b])
    return out


def grouped_weight_grad(x_Rk: Tensor, g_Rm: Tensor, counts: List[int], gw_Vkm: Tensor, gb_Vm: Tensor,
                        fresh: int, counts_V: Optional[Tensor] = None) -> None:
    """Weight and bias gradients of ``grouped_linear``: ``gw_e = x_e^T g_e``, ``gb_e = sum g_e``,
    written into ``gw_Vkm[:fresh]`` / ``gb_Vm[:fresh]`` (experts with no gradient yet; 0 for an
    expert with no rows) and added into the rest, in place."""
    V = gw_Vkm.size(0)
    if backend_for(x_Rk, g_Rm) == "grouped":
        offs = group_offsets(counts_V)
        gw = torch._grouped_mm(x_Rk.t(), g_Rm, offs=offs)
        gb = torch.segment_reduce(g_Rm, "sum", lengths=counts_V, axis=0, unsafe=True, initial=0)
        gw_Vkm[:fresh].copy_(gw[:fresh])
        gb_Vm[:fresh].copy_(gb[:fresh])
        gw_Vkm[fresh:].add_(gw[fresh:])
        gb_Vm[fresh:].add_(gb[fresh:])
        return
    touched = [False] * V
    for e, a, b in _spans(counts):
        touched[e] = True
        if e < fresh:
            torch.mm(x_Rk[a:b].t(), g_Rm[a:b], out=gw_Vkm[e])
            torch.sum(g_Rm[a:b], 0, out=gb_Vm[e])
        else:
            gw_Vkm[e].addmm_(x_Rk[a:b].t(), g_Rm[a:b])
            gb_Vm[e].add_(g_Rm[a:b].sum(0))
    for e in range(fresh):
        if not touched[e]:
            gw_Vkm[e].zero_()
            gb_Vm[e].zero_()
