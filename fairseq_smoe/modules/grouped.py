"""Grouped GEMMs over rows sorted by expert: the expert computation with no padding.

Rows come in ``chunks``: a list of ``(expert, rows)`` in row order, e.g. ``[(0, 3), (1, 0),
(2, 5)]`` for 3 rows of expert 0 then 5 of expert 2 (host ints). Every function computes, for
each chunk, its rows against its expert's weights, and nothing else: no row is padded to the
longest queue, so the cost follows the assignments whatever the routing skew. (With expert
parallelism an expert's rows arrive as one chunk per sending rank.)

Two backends, picked per call by ``backend_for``:

* ``grouped``: ``torch._grouped_mm`` (what ``torch.nn.functional.grouped_mm`` calls), one
  kernel for all experts; used on CUDA for bf16 on compute capability 9.0+, where torch 2.13
  has its fast kernel (elsewhere it falls back to a loop of its own with a host sync), and only
  for one chunk per expert in expert order;
* ``loop``: one ``addmm``/``mm`` per chunk with rows, written straight into the output (bias
  fused, no host sync: the counts are host ints already). On CPU torch 2.13's grouped kernel
  is such a loop too (fp32/bf16/fp16 only, no bias), and measured no faster.

``force_backend`` overrides the choice (tests run the ``grouped`` path on CPU in fp32).
"""

from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

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


def backend_for(x: Tensor, w: Optional[Tensor], chunks: Chunks, counts_V: Optional[Tensor]) -> str:
    """``grouped`` where torch has its fast kernel for ``x`` (and the weights ``w``: its
    operands need 16-byte strides) and the chunks are one per expert with device counts given,
    else ``loop``."""
    one_per_expert = counts_V is not None and all(e == i for i, (e, _) in enumerate(chunks))
    if _FORCED[0] is not None:
        return "grouped" if (_FORCED[0] == "grouped" and one_per_expert) else "loop"
    aligned = all(t is None or t.size(-1) % 8 == 0 for t in (x, w))
    if (one_per_expert and aligned and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0)):
        return "grouped"
    return "loop"


def _groups(chunks: Chunks, *tensors: Tensor):
    """(expert, each tensor's rows of the chunk) for the chunks with rows; one split per tensor."""
    parts = [t.split([c for _, c in chunks]) for t in tensors]
    for i, (e, c) in enumerate(chunks):
        if c:
            yield (e, *(p[i] for p in parts))


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
        y = torch._grouped_mm(x_Rk, w_Vmk.transpose(1, 2), offs=group_offsets(counts_V))
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
        y = torch._grouped_mm(x_Rm, w_Vmk, offs=group_offsets(counts_V))
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
        full_w = torch._grouped_mm(g_Rm.t(), x_Rk, offs=offs).unbind(0)
        full_b = torch.segment_reduce(g_Rm, "sum", lengths=counts_V, axis=0, unsafe=True, initial=0).unbind(0)
        for e in range(len(chunks)):
            (gw[e].copy_ if fresh[e] else gw[e].add_)(full_w[e])
            (gb[e].copy_ if fresh[e] else gb[e].add_)(full_b[e])
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
