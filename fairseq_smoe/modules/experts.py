"""E expert FFNs stored as stacked weights, so a stratum's visible experts are a slice, and
the fused expert pass of the SMoE block (dispatch, expert FFNs, combine; hand-written backward).
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .grouped import grouped_linear, grouped_linear_t, grouped_weight_grad
from .precision import autocast_off
from .routing import SlotLayout


class StackedExperts(nn.Module):
    """E independent FFNs d -> d_ff -> ReLU -> d, weights ``[E, d, d_ff]`` and ``[E, d_ff, d]``.

    Each expert is initialised like ``nn.Linear`` (uniform in +-1/sqrt(fan_in)), i.e. like
    fairseq's dense FFN, so a 1-expert block can be loaded from / compared with a dense FFN.
    """

    def __init__(self, num_experts: int, embed_dim: int, ffn_dim: int, activation_dropout: float = 0.0):
        super().__init__()
        self.num_experts, self.embed_dim, self.ffn_dim = num_experts, embed_dim, ffn_dim
        self.w1 = nn.Parameter(torch.empty(num_experts, embed_dim, ffn_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, ffn_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_dim, embed_dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, embed_dim))
        self.activation_dropout = activation_dropout
        self.reset_parameters()

    def reset_parameters(self):
        for w, b, fan_in in ((self.w1, self.b1, self.embed_dim), (self.w2, self.b2, self.ffn_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x_VCd: Tensor, first: int = 0) -> Tensor:
        """Run experts ``first .. E-1`` on their buffers: ``[V, C, d] -> [V, C, d]``."""
        h = torch.baddbmm(self.b1[first:].unsqueeze(1), x_VCd, self.w1[first:])
        h = F.relu(h)
        h = F.dropout(h, p=self.activation_dropout, training=self.training)
        return torch.baddbmm(self.b2[first:].unsqueeze(1), h, self.w2[first:])

    def weights(self, dtype: Optional[torch.dtype] = None) -> "PassWeights":
        """The weights as seen by the passes of one block forward (see ExpertGrads), in
        ``dtype`` (default: their own), cast once per forward rather than once per pass."""
        params = (self.w1, self.b1, self.w2, self.b2)
        if dtype is not None:
            params = tuple(p.to(dtype) for p in params)
        if not torch.is_grad_enabled():  # no backward: no gradient bookkeeping either
            return PassWeights(None, *params)
        grads = ExpertGrads()
        return PassWeights(grads, *_WeightsEntry.apply(grads, *params))

    def mix(self, res_nd: Tensor, u_nd: Tensor, g_Kn: Tensor, weights: "PassWeights",
            slots: SlotLayout, dropout: float = 0.0) -> Tensor:
        """One pass: ``res + sum_k g_k * FFN_{e_k}(u)`` for the n rows of ``u`` (see _ExpertMix);
        ``dropout`` applies to the expert outputs (training only). The experts compute in the
        weights' dtype; the combine and the result are in ``res``'s dtype."""
        p_act = self.activation_dropout if self.training else 0.0
        p_out = dropout if self.training else 0.0
        if weights.grads is None:  # no autograd (evaluation, generation): the forward alone
            return expert_mix(res_nd, u_nd, g_Kn, weights, slots, p_act, p_out)[0]
        return _ExpertMix.apply(
            res_nd, u_nd, g_Kn, weights.w1, weights.b1, weights.w2, weights.b2,
            weights.grads, slots, p_act, p_out,
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, embed_dim={self.embed_dim}, ffn_dim={self.ffn_dim}"


@dataclass
class PassWeights:
    grads: "ExpertGrads"
    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor


class ExpertGrads:
    """Accumulates the expert weight gradients of all passes of one block forward.

    Each pass uses the experts ``first..E-1`` (a suffix); letting autograd return a full-size
    gradient per pass would allocate, zero and add ``[E, d, d_ff]`` tensors at every pass.
    Instead each pass's backward writes (first time) or adds (later) its slice in place, with
    the GEMM itself (``grouped.grouped_weight_grad``), and ``_WeightsEntry``, whose outputs
    every pass consumes and whose backward therefore runs after all of theirs, hands the
    totals to autograd.
    """

    def __init__(self):
        self.tensors = None
        self.lo = None  # rows lo..E-1 are initialised (a union of suffixes is a suffix)

    def add(self, slots: SlotLayout, buf_Rd, h_Rf, grad_h_Rf, grad_y_Rd, like):
        if self.tensors is None:
            self.tensors = [torch.empty_like(p) for p in like]
            self.lo = like[0].size(0)
        gw1, gb1, gw2, gb2 = self.tensors
        first = slots.first
        fresh = max(0, self.lo - first)  # local experts 0..fresh-1 have no gradient yet
        grouped_weight_grad(buf_Rd, grad_h_Rf, slots.counts, gw1[first:], gb1[first:], fresh, slots.counts_V)
        grouped_weight_grad(h_Rf, grad_y_Rd, slots.counts, gw2[first:], gb2[first:], fresh, slots.counts_V)
        self.lo = min(self.lo, first)

    def take(self):
        tensors, lo = self.tensors, self.lo
        self.tensors = self.lo = None
        if tensors is None:
            return [None] * 4
        if lo > 0:
            for t in tensors:
                t[:lo].zero_()  # experts no pass reached
        return tensors


class _WeightsEntry(torch.autograd.Function):
    """Identity on the four expert weights; its backward returns ``ExpertGrads``' totals."""

    @staticmethod
    def forward(ctx, grads, w1, b1, w2, b2):
        ctx.grads = grads
        ctx.set_materialize_grads(False)
        return w1.view_as(w1), b1.view_as(b1), w2.view_as(w2), b2.view_as(b2)

    @staticmethod
    def backward(ctx, *unused):
        return (None, *ctx.grads.take())


def expert_mix(res_nd, u_nd, g_Kn, weights: PassWeights, slots: SlotLayout, p_act: float, p_out: float):
    """The forward of ``_ExpertMix``: (out, and what its backward needs: the expert input
    rows, the hidden rows, each assignment's output row, the output dropout mask)."""
    first, counts, counts_V = slots.first, slots.counts, slots.counts_V
    w1, b1, w2, b2 = weights.w1, weights.b1, weights.w2, weights.b2
    n = u_nd.size(0)
    K = g_Kn.size(0)
    # Autocast is off in here: the experts run in the weights' dtype (compute_dtype), the
    # combine in the residual's, and the backward casts at the same two places.
    with autocast_off(u_nd):
        buf = u_nd.index_select(0, slots.src_R).to(w1.dtype)
        h = grouped_linear(buf, w1[first:], counts, b1[first:], counts_V).relu_()
        if p_act > 0:
            h = F.dropout(h, p=p_act, training=True, inplace=True)
        y = grouped_linear(h, w2[first:], counts, b2[first:], counts_V)
        mask = None
        if p_out > 0:
            y, mask = torch.ops.aten.native_dropout(y, p_out, True)
        y_Ad = y.index_select(0, slots.slot_A).to(res_nd.dtype)
        g = g_Kn.to(res_nd.dtype).unsqueeze(2)
        out = torch.addcmul(res_nd, y_Ad[:n], g[0])
        if K == 2:
            out.addcmul_(y_Ad[n:], g[1])
    return out, buf, h, y_Ad, mask


class _ExpertMix(torch.autograd.Function):
    """out = res + sum_k g_k * FFN_{e_k}(u), the expert part of one pass, fused.

    Forward: gather u's rows into the expert rows (sorted by expert, no padding: ``SlotLayout``),
    two grouped GEMMs (bias, ReLU in place, the dropouts), gather each assignment's output row,
    and two ``addcmul`` into the residual, in choice order. Backward: gathers, ReLU backward in
    place, the grouped GEMMs' transposes, the weight gradients accumulated in place across passes
    (ExpertGrads), and one ``index_add`` of the expert rows' input gradients into their tokens
    (at most K = 2 rows per token: the sum does not depend on the order). Nothing of size
    tokens x experts x capacity is ever built.
    """

    @staticmethod
    def forward(ctx, res_nd, u_nd, g_Kn, w1, b1, w2, b2, grads, slots, p_act, p_out):
        weights = PassWeights(grads, w1, b1, w2, b2)
        out, buf, h, y_Ad, mask = expert_mix(res_nd, u_nd, g_Kn, weights, slots, p_act, p_out)
        ctx.save_for_backward(buf, h, y_Ad, g_Kn, w1, b1, w2, b2, mask)
        ctx.slots, ctx.grads, ctx.p_act, ctx.p_out = slots, grads, p_act, p_out
        ctx.u_dtype = u_nd.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        buf, h, y_Ad, g_Kn, w1, b1, w2, b2, mask = ctx.saved_tensors
        slots = ctx.slots
        first, counts, counts_V = slots.first, slots.counts, slots.counts_V
        K, n = g_Kn.shape
        d = buf.size(1)
        grad_out = grad_out.contiguous()
        grad_res = grad_out if ctx.needs_input_grad[0] else None
        grad_g = None
        if ctx.needs_input_grad[2]:  # d out / d g_k = the assignment's expert output row
            grad_g = torch.linalg.vecdot(y_Ad.view(K, n, d), grad_out.unsqueeze(0)).to(g_Kn.dtype)
        # d out / d y at each expert row: its token's output gradient times its combine weight
        w_R = g_Kn.detach().reshape(-1).to(grad_out.dtype).index_select(0, slots.asg_R)
        grad_y = grad_out.index_select(0, slots.src_R).mul_(w_R.unsqueeze(1)).to(buf.dtype)
        if mask is not None:
            grad_y = torch.ops.aten.native_dropout_backward(grad_y, mask, 1.0 / (1.0 - ctx.p_out))
        grad_h = grouped_linear_t(grad_y, w2[first:], counts, counts_V)
        # ReLU (and activation dropout) backward in place: h > 0 exactly where both passed
        torch.ops.aten.threshold_backward.grad_input(grad_h, h, 0, grad_input=grad_h)
        if ctx.p_act > 0:
            grad_h.mul_(1.0 / (1.0 - ctx.p_act))
        if any(ctx.needs_input_grad[3:7]):  # into ExpertGrads, handed over by _WeightsEntry
            ctx.grads.add(slots, buf, h, grad_h, grad_y, (w1, b1, w2, b2))
        grad_u = None
        if ctx.needs_input_grad[1]:
            grad_buf = grouped_linear_t(grad_h, w1[first:], counts, counts_V)
            grad_u = grad_buf.new_zeros(n, d).index_add_(0, slots.src_R, grad_buf).to(ctx.u_dtype)
        return grad_res, grad_u, grad_g, None, None, None, None, None, None, None, None
