"""E expert FFNs stored as stacked weights, so a stratum's visible experts are a slice, and
the fused expert pass of the SMoE block (dispatch, expert FFNs, combine; hand-written backward).

The expert pass of a stratum maps the pass's expert rows (its kept assignments sorted by
expert, ``routing.SlotLayout``) to their FFN outputs. That map is the one seam of expert
parallelism (``expert_parallel.py``): with it on, the rows travel to the ranks holding their
experts and the outputs come back (``_rows_forward`` / ``_rows_backward``); everything around it
(routing, the combine, the residual) is the same code on one process or many.
"""

import math
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .expert_parallel import ExpertParallel, received_chunks, split_sizes
from .grad_reuse import GradBuffers
from .grouped import grouped_linear, grouped_linear_t, grouped_weight_grad, per_expert
from .precision import autocast_off
from .routing import SlotLayout
from .scratch import scratch


# The stored layout of the expert weights. 2: nn.Linear's [out, in] (w1 [E, d_ff, d], w2 [E, d,
# d_ff]), the official code's, and the fast one for the forward on CPU: MKL's GEMM over an expert's
# few rows is up to 2x slower with an [in, out] row-major weight (scripts/benchmark_cpu_gemm.py).
# Before it: [in, out], in checkpoints with no ``weight_layout`` key (see upgrade_weight_layout).
WEIGHT_LAYOUT = 2
LAYOUT_KEY = "weight_layout"  # the buffer marking it in state dicts
_WEIGHT = re.compile(r"w[12](_\d+)?")


def is_expert_weight(name: str) -> bool:
    """``name`` (a StackedExperts parameter's own name) is one of its weights: w1, w2, w1_0, ..."""
    return _WEIGHT.fullmatch(name) is not None


def upgrade_weight_layout(state_dict: dict, prefix: str = "") -> bool:
    """The expert weights of ``StackedExperts`` at ``prefix`` in ``state_dict``, saved before
    ``WEIGHT_LAYOUT`` 2 (``[in, out]``: there is no ``prefix + "weight_layout"`` key), transposed to
    ours in place, and the key added. True if it upgraded anything."""
    if prefix + LAYOUT_KEY in state_dict or prefix + "w1" not in state_dict and prefix + "w1_0" not in state_dict:
        return False
    for key in list(state_dict):
        if key.startswith(prefix) and is_expert_weight(key[len(prefix):]):
            state_dict[key] = state_dict[key].transpose(1, 2).contiguous()
    state_dict[prefix + LAYOUT_KEY] = torch.tensor(WEIGHT_LAYOUT)
    return True


def _upgrade_on_load(module, state_dict, prefix, *unused):  # a load_state_dict pre-hook
    upgrade_weight_layout(state_dict, prefix)


class StackedExperts(nn.Module):
    """E independent FFNs d -> d_ff -> ReLU -> d, weights in nn.Linear's layout ``[E, d_ff, d]``
    and ``[E, d, d_ff]``; a checkpoint of the earlier ``[E, d, d_ff]`` layout is transposed as it
    loads (``upgrade_weight_layout``; the buffer ``weight_layout`` marks the layout in state dicts).

    Each expert is initialised like ``nn.Linear`` (uniform in +-1/sqrt(fan_in)), i.e. like
    fairseq's dense FFN, so a 1-expert block can be loaded from / compared with a dense FFN.
    With expert parallelism (``ep``) the module holds only this rank's experts ``[lo, hi)``
    (parameters ``[hi - lo, ...]``, tagged ``expert`` so that fairseq's legacy_ddp does not
    all-reduce them) and initialises them exactly as a single process would: the random stream
    of all E experts is drawn and the local ones kept, so the model is the same at any world size.

    ``widths``: experts of different FFN widths (``--smoe-strata-ffn``): ``[(experts, d_ff),
    ...]`` in expert order, one group per width, stored as ``w1_g, b1_g, w2_g, b2_g`` of shape
    ``[experts, d_ff_g, d]`` etc.; no expert is padded to the widest. One group (the default)
    keeps the names ``w1, b1, w2, b2``.
    """

    def __init__(self, num_experts: int, embed_dim: int, ffn_dim: int, activation_dropout: float = 0.0,
                 ep: Optional[ExpertParallel] = None, widths: Optional[List[Tuple[int, int]]] = None):
        super().__init__()
        self.num_experts, self.embed_dim, self.ffn_dim = num_experts, embed_dim, ffn_dim
        self.ep = ep
        widths = widths if widths is not None else [(num_experts, ffn_dim)]
        assert sum(n for n, _ in widths) == num_experts
        if ep is not None and len(widths) > 1:
            raise ValueError("--moe-expert-parallel cannot be combined with --smoe-strata-ffn (experts of "
                             "different widths): give every stratum the same FFN width")
        self.local_range = ep.layout.local_experts if ep is not None else (0, num_experts)
        m = self.local_range[1] - self.local_range[0]
        # (first global expert, experts, d_ff) per width group, on this rank
        self.groups: List[Tuple[int, int, int]] = []
        start = self.local_range[0]
        for n, f in (widths if ep is None else [(m, ffn_dim)]):
            self.groups.append((start, n, f))
            start += n
        for g, (_, n, f) in enumerate(self.groups):
            suffix = "" if len(self.groups) == 1 else f"_{g}"
            self.register_parameter("w1" + suffix, nn.Parameter(torch.empty(n, f, embed_dim)))
            self.register_parameter("b1" + suffix, nn.Parameter(torch.empty(n, f)))
            self.register_parameter("w2" + suffix, nn.Parameter(torch.empty(n, embed_dim, f)))
            self.register_parameter("b2" + suffix, nn.Parameter(torch.empty(n, embed_dim)))
        if ep is not None:
            for p in self.parameters():
                p.expert = True  # fairseq's legacy_ddp skips these; see expert_parallel.py
                p.expert_shard = (*self.local_range, num_experts)
        self.activation_dropout = activation_dropout
        self.register_buffer(LAYOUT_KEY, torch.tensor(WEIGHT_LAYOUT))
        self.register_load_state_dict_pre_hook(_upgrade_on_load)
        self.grad_buffers = GradBuffers()  # CPU: the weight gradients' memory, reused (grad_reuse.py)
        self.reset_parameters()

    def group_params(self) -> List[Tuple[Tensor, Tensor, Tensor, Tensor]]:
        """(w1, b1, w2, b2) of every width group, in expert order."""
        if len(self.groups) == 1:
            return [(self.w1, self.b1, self.w2, self.b2)]
        return [tuple(getattr(self, f"{n}_{g}") for n in ("w1", "b1", "w2", "b2"))
                for g in range(len(self.groups))]

    def reset_parameters(self):
        """Uniform in +-1/sqrt(fan_in); each weight drawn as the earlier ``[in, out]`` layout's
        tensor and stored transposed, so a seed gives the same experts as before the layout
        change (and with expert parallelism, one expert at a time: the stream of a full draw)."""
        lo, hi = self.local_range
        for (_, _, f), (w1, b1, w2, b2) in zip(self.groups, self.group_params()):
            for w, b, fan_in in ((w1, b1, self.embed_dim), (w2, b2, f)):
                bound = 1.0 / math.sqrt(fan_in)
                for p, drawn in ((w, (w.size(2), w.size(1))), (b, tuple(b.shape[1:]))):
                    with torch.no_grad():
                        if self.ep is None:
                            t = torch.empty(p.size(0), *drawn, dtype=p.dtype).uniform_(-bound, bound)
                            p.copy_(t.transpose(-2, -1) if p is w else t)
                            continue
                        for e in range(self.num_experts):
                            t = torch.empty(drawn, dtype=p.dtype).uniform_(-bound, bound)
                            if lo <= e < hi:
                                p[e - lo].copy_(t.transpose(-2, -1) if p is w else t)

    def forward(self, x_VCd: Tensor, first: int = 0) -> Tensor:
        """Run experts ``first .. E-1`` on their buffers: ``[V, C, d] -> [V, C, d]`` (all experts
        local; the one-hot baseline of scripts/benchmark_layer.py uses it)."""
        h = torch.baddbmm(self.b1[first:].unsqueeze(1), x_VCd, self.w1[first:].transpose(1, 2))
        h = F.relu(h)
        h = F.dropout(h, p=self.activation_dropout, training=self.training)
        return torch.baddbmm(self.b2[first:].unsqueeze(1), h, self.w2[first:].transpose(1, 2))

    def weights(self, dtype: Optional[torch.dtype] = None) -> "PassWeights":
        """The weights as seen by the passes of one block forward (see ExpertGrads), in
        ``dtype`` (default: their own), cast once per forward rather than once per pass."""
        params = [p for group in self.group_params() for p in group]
        if dtype is not None:
            params = [p.to(dtype) for p in params]
        if not torch.is_grad_enabled():  # no backward: no gradient bookkeeping either
            return PassWeights(None, params, self.groups, ep=self.ep)
        grads = ExpertGrads(self.ep, self.grad_buffers)
        return PassWeights(grads, list(_WeightsEntry.apply(grads, *params)), self.groups, ep=self.ep)

    def mix(self, res_nd: Tensor, u_nd: Tensor, g_Kn: Tensor, weights: "PassWeights",
            slots: SlotLayout, dropout: float = 0.0) -> Tensor:
        """One pass: ``res + sum_k g_k * FFN_{e_k}(u)`` for the n rows of ``u`` (see _ExpertMix);
        ``dropout`` applies to the expert outputs (training only). The experts compute in the
        weights' dtype; the combine and the result are in ``res``'s dtype."""
        p_act = self.activation_dropout if self.training else 0.0
        p_out = dropout if self.training else 0.0
        if weights.grads is None:  # no autograd (evaluation, generation): the forward alone
            return expert_mix(res_nd, u_nd, g_Kn, weights, slots, p_act, p_out)[0]
        return _ExpertMix.apply(res_nd, u_nd, g_Kn, weights, slots, p_act, p_out, *weights.params)

    def extra_repr(self) -> str:
        text = f"num_experts={self.num_experts}, embed_dim={self.embed_dim}, ffn_dim={self.ffn_dim}"
        if self.ep is not None:
            text += f", local_experts={self.local_range}"
        return text


@dataclass
class PassWeights:
    """The expert weights of one block forward: ``params`` = w1, b1, w2, b2 of every width
    group in turn; ``groups`` = (first expert, experts, d_ff) of each group."""

    grads: Optional["ExpertGrads"]
    params: List[Tensor]
    groups: List[Tuple[int, int, int]]
    ep: Optional[ExpertParallel] = None

    def group(self, g: int) -> List[Tensor]:
        return self.params[4 * g:4 * g + 4]

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype


class ExpertGrads:
    """Accumulates the expert weight gradients of all passes of one block forward.

    Letting autograd return a full-size gradient per pass would allocate, zero and add
    ``[E, d_ff, d]`` tensors at every pass. Instead each pass's backward writes (an expert's
    first time) or adds (later) its experts' gradients in place, with the GEMM itself
    (``grouped.grouped_weight_grad``), and ``_WeightsEntry``, whose outputs every pass consumes
    and whose backward therefore runs after all of theirs, hands the totals to autograd (with
    expert parallelism, after ``ExpertParallel.finish_expert_grads``). The totals' memory comes
    from ``buffers`` (on CPU the previous backward's, when nothing holds it any more:
    ``grad_reuse.py``); every element is written, so it may hold anything before.
    """

    def __init__(self, ep: Optional[ExpertParallel], buffers: GradBuffers):
        self.ep, self.buffers = ep, buffers
        self.tensors = None  # one gradient per parameter of PassWeights.params
        self.fresh: List[List[bool]] = []  # per group, per expert: no gradient written yet

    def add(self, g: int, first: int, chunks, buf_Rd, h_Rf, grad_h_Rf, grad_y_Rd, like):
        """The gradients of one pass in width group ``g``, whose chunks index its experts from
        ``first``; ``like``: the parameters the gradients are for."""
        if self.tensors is None:
            self.tensors = self.buffers.like(like)
            self.fresh = [[True] * like[4 * i].size(0) for i in range(len(like) // 4)]
        gw1, gb1, gw2, gb2 = (t[first:] for t in self.tensors[4 * g:4 * g + 4])
        fresh = self.fresh[g][first:]
        counts_V = getattr(chunks, "counts_V", None)
        grouped_weight_grad(buf_Rd, grad_h_Rf, chunks, gw1, gb1, list(fresh), counts_V)
        grouped_weight_grad(h_Rf, grad_y_Rd, chunks, gw2, gb2, fresh, counts_V)
        self.fresh[g][first:] = fresh

    def take(self, count: int):
        tensors, fresh = self.tensors, self.fresh
        self.tensors, self.fresh = None, []
        if tensors is None:
            tensors = [None] * count
        else:
            for g, flags in enumerate(fresh):
                for e, untouched in enumerate(flags):
                    if untouched:  # an expert no pass reached
                        for t in tensors[4 * g:4 * g + 4]:
                            t[e].zero_()
        if self.ep is not None:  # every rank, in the same order: all blocks run on all ranks
            self.ep.finish_expert_grads(tensors)
        return tensors


class _WeightsEntry(torch.autograd.Function):
    """Identity on the expert weights; its backward returns ``ExpertGrads``' totals."""

    @staticmethod
    def forward(ctx, grads, *params):
        ctx.grads, ctx.count = grads, len(params)
        ctx.set_materialize_grads(False)
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *unused):
        return (None, *ctx.grads.take(ctx.count))


class _Chunks(list):
    """A chunk list that also carries the device counts (one chunk per expert, single process),
    so the grouped backend can build its offsets without a host round trip."""

    def __init__(self, chunks, counts_V=None):
        super().__init__(chunks)
        self.counts_V = counts_V


@dataclass
class _Part:
    """The rows of one width group in a pass: rows ``[a, b)`` of the expert rows, chunks
    indexing the group's experts from ``first``."""

    group: int
    first: int
    chunks: _Chunks
    a: int
    b: int


def _new(like: Tensor, shape) -> Tensor:
    """An uninitialised tensor like ``like`` (dtype, device), from scratch memory where that pays."""
    out = scratch(shape, like)
    return like.new_empty(shape) if out is None else out


def _gather(x_nd: Tensor, idx: Tensor, dtype: torch.dtype) -> Tensor:
    """``x_nd[idx]`` in ``dtype`` (into scratch memory where that pays)."""
    out = scratch((idx.numel(), x_nd.size(1)), x_nd) if x_nd.dtype == dtype else None
    if out is None:
        return x_nd.index_select(0, idx).to(dtype)
    return torch.index_select(x_nd, 0, idx, out=out)


def _pass_parts(weights: PassWeights, slots: SlotLayout):
    """(the pass's parts, exchange plan or None) on this rank: on one process the visible
    experts of each width group (their rows are consecutive: rows are sorted by expert); with
    expert parallelism the rows this rank receives for its experts (one group)."""
    first = slots.first
    if weights.ep is None:
        parts, row = [], 0
        for g, (g_first, g_size, _) in enumerate(weights.groups):
            lo, hi = max(g_first, first), g_first + g_size
            if lo >= hi:
                continue
            counts = slots.counts[lo - first:hi - first]
            chunks = _Chunks(per_expert(counts), slots.counts_V[lo - first:hi - first])
            parts.append(_Part(g, lo - g_first, chunks, row, row + sum(counts)))
            row += sum(counts)
        return parts, None
    layout = weights.ep.layout
    lo, hi = layout.local_experts
    first_local = min(max(first, lo), hi) - lo
    lo_vis = lo + first_local
    send = split_sizes(slots.counts, first, layout)
    recv = [sum(c[e - first] for e in range(lo_vis, hi)) for c in slots.peer_counts]
    chunks = [(e - first_local, c) for e, c in received_chunks(slots.peer_counts, first, layout)]
    return [_Part(0, first_local, _Chunks(chunks), 0, sum(recv))], (send, recv)


def _rows_forward(buf_Rd, weights: PassWeights, slots: SlotLayout, p_act: float):
    """The expert FFNs over the pass's expert rows: (y rows, what the backward needs: the
    input rows and each part's hidden rows)."""
    parts, xchg = _pass_parts(weights, slots)
    x = buf_Rd if xchg is None else weights.ep.exchange(buf_Rd, *xchg)
    y = _new(x, (x.size(0), x.size(1))) if len(parts) != 1 else None
    hs = []
    for part in parts:
        w1, b1, w2, b2 = (w[part.first:] for w in weights.group(part.group))
        counts_V = part.chunks.counts_V
        h = grouped_linear(x[part.a:part.b], w1, part.chunks, b1, counts_V,
                           out=scratch((part.b - part.a, w1.size(1)), x)).relu_()
        if p_act > 0:
            h = F.dropout(h, p=p_act, training=True, inplace=True)
        if y is None:  # one part covers every row
            y = grouped_linear(h, w2, part.chunks, b2, counts_V, out=scratch((h.size(0), w2.size(1)), h))
        else:
            grouped_linear(h, w2, part.chunks, b2, counts_V, out=y[part.a:part.b])
        hs.append(h)
    if y is None:  # no part at all: this rank's experts are not visible in this pass
        y = x.new_empty(x.size(0), x.size(1))
    if xchg is not None:
        y = weights.ep.exchange(y, xchg[1], xchg[0])
    return y, (x, *hs)


def _rows_backward(grad_y_Rd, saved, weights: PassWeights, slots: SlotLayout, p_act: float, grads):
    """Gradient of ``_rows_forward`` w.r.t. its input rows; the weights' into ``grads``."""
    x, *hs = saved
    parts, xchg = _pass_parts(weights, slots)
    if xchg is not None:
        grad_y_Rd = weights.ep.exchange(grad_y_Rd, *xchg)
    grad_x = _new(grad_y_Rd, x.shape) if len(parts) != 1 else None
    for part, h in zip(parts, hs):
        w1, _, w2, _ = (w[part.first:] for w in weights.group(part.group))
        counts_V = part.chunks.counts_V
        grad_y = grad_y_Rd[part.a:part.b]
        grad_h = grouped_linear_t(grad_y, w2, part.chunks, counts_V,
                                  out=scratch((grad_y.size(0), w2.size(2)), grad_y))
        # ReLU (and activation dropout) backward in place: h > 0 exactly where both passed
        torch.ops.aten.threshold_backward.grad_input(grad_h, h, 0, grad_input=grad_h)
        if p_act > 0:
            grad_h.mul_(1.0 / (1.0 - p_act))
        if grads is not None:  # into ExpertGrads, handed over by _WeightsEntry
            grads.add(part.group, part.first, part.chunks, x[part.a:part.b], h, grad_h, grad_y, weights.params)
        if grad_x is None:
            grad_x = grouped_linear_t(grad_h, w1, part.chunks, counts_V,
                                      out=scratch((grad_h.size(0), w1.size(2)), grad_h))
        else:
            grouped_linear_t(grad_h, w1, part.chunks, counts_V, out=grad_x[part.a:part.b])
    if grad_x is None:  # no part at all: this rank's experts are not visible in this pass
        grad_x = grad_y_Rd.new_empty(x.shape)
    if xchg is not None:
        grad_x = weights.ep.exchange(grad_x, xchg[1], xchg[0])
    return grad_x


def expert_mix(res_nd, u_nd, g_Kn, weights: PassWeights, slots: SlotLayout, p_act: float, p_out: float):
    """The forward of ``_ExpertMix``: (out, and what its backward needs)."""
    n = u_nd.size(0)
    K = g_Kn.size(0)
    # Autocast is off in here: the experts run in the weights' dtype (compute_dtype), the
    # combine in the residual's, and the backward casts at the same two places.
    with autocast_off(u_nd):
        buf = _gather(u_nd, slots.src_R, weights.dtype)
        y, saved = _rows_forward(buf, weights, slots, p_act)
        mask = None
        if p_out > 0:
            y, mask = torch.ops.aten.native_dropout(y, p_out, True)
        if y.size(0) > 0:
            y_Ad = _gather(y, slots.slot_A, res_nd.dtype)
        else:  # no row computed here (every row padding: a rank serving only the others)
            y_Ad = res_nd.new_zeros(slots.slot_A.numel(), res_nd.size(1))
        g = g_Kn.to(res_nd.dtype).unsqueeze(2)
        out = torch.addcmul(res_nd, y_Ad[:n], g[0])
        if K == 2:
            out.addcmul_(y_Ad[n:], g[1])
    return out, saved, y_Ad, mask


class _ExpertMix(torch.autograd.Function):
    """out = res + sum_k g_k * FFN_{e_k}(u), the expert part of one pass, fused.

    Forward: gather u's rows into the expert rows (sorted by expert, no padding: ``SlotLayout``),
    the expert FFNs over them (``_rows_forward``: grouped GEMMs, bias, ReLU in place, the
    dropouts; with expert parallelism the rows go to their experts' ranks and back), gather each
    assignment's output row, and two ``addcmul`` into the residual, in choice order. Backward:
    gathers, the grouped GEMMs' transposes (``_rows_backward``), the weight gradients accumulated
    in place across passes (ExpertGrads), and one ``index_add`` of the expert rows' input
    gradients into their tokens (at most K = 2 rows per token: the sum does not depend on the
    order). Nothing of size tokens x experts x capacity is ever built.
    """

    @staticmethod
    def forward(ctx, res_nd, u_nd, g_Kn, weights, slots, p_act, p_out, *params):
        pass_weights = PassWeights(weights.grads, list(params), weights.groups, ep=weights.ep)
        out, saved, y_Ad, mask = expert_mix(res_nd, u_nd, g_Kn, pass_weights, slots, p_act, p_out)
        ctx.save_for_backward(y_Ad, g_Kn, mask, *params, *saved)
        ctx.num_params = len(params)
        ctx.slots, ctx.weights, ctx.p_act, ctx.p_out = slots, weights, p_act, p_out
        ctx.u_dtype = u_nd.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y_Ad, g_Kn, mask, *rest = ctx.saved_tensors
        params, saved = rest[:ctx.num_params], rest[ctx.num_params:]
        slots = ctx.slots
        K, n = g_Kn.shape
        d = y_Ad.size(1)
        grad_out = grad_out.contiguous()
        grad_res = grad_out if ctx.needs_input_grad[0] else None
        grad_g = None
        if ctx.needs_input_grad[2]:  # d out / d g_k = the assignment's expert output row
            # one batched GEMV per token ([K, d] x [d]): no [K, n, d] product temporary, as
            # linalg.vecdot makes (2.6x faster on CPU at n 4096, d 1024)
            grad_nK1 = torch.bmm(y_Ad.view(K, n, d).transpose(0, 1), grad_out.unsqueeze(2))
            grad_g = grad_nK1.view(n, K).t().contiguous().to(g_Kn.dtype)
        # d out / d y at each expert row: its token's output gradient times its combine weight
        w_R = g_Kn.detach().reshape(-1).to(grad_out.dtype).index_select(0, slots.asg_R)
        grad_y = _gather(grad_out, slots.src_R, grad_out.dtype).mul_(w_R.unsqueeze(1)).to(params[0].dtype)
        if mask is not None:
            grad_y = torch.ops.aten.native_dropout_backward(grad_y, mask, 1.0 / (1.0 - ctx.p_out))
        weights = PassWeights(ctx.weights.grads, list(params), ctx.weights.groups, ep=ctx.weights.ep)
        grads = weights.grads if any(ctx.needs_input_grad[7:]) else None
        grad_buf = _rows_backward(grad_y, saved, weights, slots, ctx.p_act, grads)
        grad_u = None
        if ctx.needs_input_grad[1]:
            grad_u = _new(grad_buf, (n, d)).zero_().index_add_(0, slots.src_R, grad_buf).to(ctx.u_dtype)
        return (grad_res, grad_u, grad_g, None, None, None, None) + (None,) * ctx.num_params
