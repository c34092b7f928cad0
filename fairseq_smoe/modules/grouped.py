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


def _groups(counts: List[int], *tensors: Tensor):
    """(e, each tensor's rows of expert e) for the experts with rows; one split per tensor."""
    parts = [t.split(counts) for t in tensors]
    for e, c in enumerate(counts):
        if c:
            yield (e, *(p[e] for p in parts))


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
    w = w_Vkm.unbind(0)
    bias = bias_Vm.unbind(0) if bias_Vm is not None else None
    for e, x_e, out_e in _groups(counts, x_Rk, out):
        if bias is None:
            torch.mm(x_e, w[e], out=out_e)
        else:
            torch.addmm(bias[e], x_e, w[e], out=out_e)
    return out


def grouped_linear_t(x_Rm: Tensor, w_Vkm: Tensor, counts: List[int],
                     counts_V: Optional[Tensor] = None) -> Tensor:
    """``x_e @ w_e^T`` for every expert's rows (the input gradient of ``grouped_linear``):
    ``[R, m] -> [R, k]``."""
    if backend_for(x_Rm, w_Vkm) == "grouped":
        return torch._grouped_mm(x_Rm, w_Vkm.transpose(1, 2), offs=group_offsets(counts_V))
    out = x_Rm.new_empty(x_Rm.size(0), w_Vkm.size(1))
    w = w_Vkm.unbind(0)
    for e, x_e, out_e in _groups(counts, x_Rm, out):
        torch.mm(x_e, w[e].t(), out=out_e)
    return out


def grouped_weight_grad(x_Rk: Tensor, g_Rm: Tensor, counts: List[int], gw_Vkm: Tensor, gb_Vm: Tensor,
                        fresh: int, counts_V: Optional[Tensor] = None) -> None:
    """Weight and bias gradients of ``grouped_linear``: ``gw_e = x_e^T g_e``, ``gb_e = sum g_e``,
    written into ``gw_Vkm[:fresh]`` / ``gb_Vm[:fresh]`` (experts with no gradient yet; 0 for an
    expert with no rows) and added into the rest, in place."""
    if backend_for(x_Rk, g_Rm) == "grouped":
        offs = group_offsets(counts_V)
        gw = torch._grouped_mm(x_Rk.t(), g_Rm, offs=offs)
        gb = torch.segment_reduce(g_Rm, "sum", lengths=counts_V, axis=0, unsafe=True, initial=0)
        gw_Vkm[:fresh].copy_(gw[:fresh])
        gb_Vm[:fresh].copy_(gb[:fresh])
        gw_Vkm[fresh:].add_(gw[fresh:])
        gb_Vm[fresh:].add_(gb[fresh:])
        return
    gw, gb = gw_Vkm.unbind(0), gb_Vm.unbind(0)
    for e, x_e, g_e in _groups(counts, x_Rk, g_Rm):
        if e < fresh:
            torch.mm(x_e.t(), g_e, out=gw[e])
            torch.sum(g_e, 0, out=gb[e])
        else:
            gw[e].addmm_(x_e.t(), g_e)
            gb[e].add_(g_e.sum(0))
    for e in range(fresh):
        if counts[e] == 0:
            gw[e].zero_()
            gb[e].zero_()
