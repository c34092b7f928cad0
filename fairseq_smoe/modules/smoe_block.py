"""The SMoE block: a Transformer FFN sub-layer with stratified experts (spec §1.4-§1.8).

Every token enters stratum 0. At each pass the current stratum's router picks the token's
top-2 experts among that stratum and all later ones; the token then jumps to the stratum
after its top-1 expert's stratum, so it makes 1..L passes ("dynamic capacity"). One stratum
is a vanilla top-2 MoE with the standard pre-LN residual.

Implementation (scripts/benchmark_layer.py measures it against a dense FFN over the same
rows and against fairseq's one-hot dispatch): a pass works only on the tokens at its stratum
(pass 0: all rows, padding masked); routing is a few small ops on [n, V] and [K*n] tensors;
there is one host sync per pass (the counts that fix the buffer shapes, see ``_route``); the
experts, the combine and the residual run in one autograd Function (``experts._ExpertMix``)
over a [V, C, d] slot buffer, C at most the longest kept queue. Memory grows with
tokens x k x d: no (tokens x experts x capacity) tensor, and no Python loop over tokens or
experts.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SMoEConfig
from .experts import PassPlan, StackedExperts
from .routing import balance_loss, combine_weights, expert_capacity, select_experts, slot_positions


class SMoEBlock(nn.Module):
    """FFN sub-layer ``x_TBd -> x_TBd`` including its residual connection(s).

    Residual semantics (``cfg.residual``), with u the normalised input of a pass:
      * ``official``: pass 0 is pre-LN (y = h + MoE(LN(h))); later passes add the residual
        to the *normalised* input (y = u + MoE(u)) and, with L > 1, every token leaves
        through an exit LayerNorm, reproducing the released code that made the paper's
        numbers (its residual aliasing, spec §1.5).
      * ``paper``: Eq. 4-7: y = x + MoE(LN_s(x)) at every pass, no exit LayerNorm.
    Norms: ``ffn_norm`` is stratum 0's pre-norm; ``strata_norms[s-1]`` is stratum s's
    pre-norm and, in ``official`` mode, ``strata_norms[L-1]`` is the exit norm.

    After each forward the block keeps detached statistics for the criterion and task:
    ``aux_loss`` (balance loss averaged over the passes run, with grad), ``passes_TB`` (passes
    per token, 0 for tokens that are not routed), ``routed_TB``, ``dropped`` and ``assigned``
    (expert assignments dropped by capacity / made).
    """

    def __init__(self, cfg: SMoEConfig):
        super().__init__()
        self.cfg = cfg
        d, L = cfg.embed_dim, cfg.num_strata
        self.ffn_norm = nn.LayerNorm(d)
        self.routers = nn.ModuleList(
            [nn.Linear(d, cfg.visible_experts(s), bias=False) for s in range(L)]
        )
        num_strata_norms = 0 if L == 1 else (L if cfg.residual == "official" else L - 1)
        self.strata_norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(num_strata_norms)])
        self.experts = StackedExperts(cfg.num_experts, d, cfg.ffn_dim, cfg.activation_dropout)
        stratum_of_expert = torch.repeat_interleave(
            torch.arange(L), torch.tensor(cfg.strata)
        )
        self.register_buffer("stratum_of_expert", stratum_of_expert, persistent=False)
        self.aux_loss: Optional[Tensor] = None
        self.passes_TB: Optional[Tensor] = None
        self.routed_TB: Optional[Tensor] = None
        self.dropped: Optional[Tensor] = None
        self.assigned: Optional[Tensor] = None

    def pre_norm(self, stratum: int) -> nn.Module:
        return self.ffn_norm if stratum == 0 else self.strata_norms[stratum - 1]

    def forward(self, x_TBd: Tensor, padding_mask_BT: Optional[Tensor] = None) -> Tensor:
        cfg = self.cfg
        T, B, d = x_TBd.shape
        N, L = T * B, cfg.num_strata
        dev = x_TBd.device
        x_Nd = x_TBd.reshape(N, d)
        routed_N = None  # None: every token is routed
        if padding_mask_BT is not None and not cfg.route_padding:
            routed_N = ~padding_mask_BT.t().reshape(N)
        # Capacity slots go in batch-major token order (b, t), as in fairseq's MoE layer,
        # while activations stay in fairseq's time-major layout: priorities do the reorder.
        n_idx = torch.arange(N, device=dev)
        prio_N = (n_idx % B) * T + n_idx // B

        weights = self.experts.weights()
        tokens_at = [N] + [0] * L  # tokens per stratum, on the host (see _route)
        state_N = None  # next stratum of every token (L = done), set by pass 0
        passes_N = torch.zeros(N, dtype=torch.long, device=dev)
        aux_sum = x_Nd.new_zeros((), dtype=torch.float32)
        dropped = torch.zeros((), dtype=torch.long, device=dev)
        assigned = torch.zeros((), dtype=torch.long, device=dev)
        num_passes = 0

        for c in range(L):
            # Pass 0 works on all N rows (padding rows are masked, not removed); pass c >= 1
            # gathers the n tokens at stratum c, whose count the previous pass's host sync
            # brought, so a static-size nonzero finds them without another sync.
            if c == 0:
                idx_n, x_nd, prio_n = None, x_Nd, prio_N
            else:
                if tokens_at[c] == 0:
                    continue  # no token at this stratum: skip it, as the official loop does
                idx_n = torch.nonzero_static(state_N == c, size=tokens_at[c]).squeeze(1)
                x_nd, prio_n = _GatherRows.apply(x_Nd, idx_n), prio_N[idx_n]
            u_nd = self.pre_norm(c)(x_nd)
            routed = self._route(c, u_nd, prio_n, routed_N if c == 0 else None, idx_n, state_N, tokens_at)
            if routed is None:
                break  # pass 0 and every token is padding
            probs_nV, top1_n, g_Kn, plan, state_N, num_active, assigned_c, kept_c = routed
            num_passes += 1
            assigned = assigned + assigned_c
            dropped = dropped + (assigned_c - kept_c)

            # Experts, combine and residual, fused (experts.py): out = residual + sum_k g_k y_k
            residual_nd = u_nd if (cfg.residual == "official" and c > 0) else x_nd
            out_nd = self.experts.mix(residual_nd, u_nd, g_Kn, weights, plan, dropout=cfg.dropout)
            if c == 0:
                x_Nd = out_nd  # padding rows: nothing added, they keep their input
                passes_N = passes_N + (1 if routed_N is None else routed_N.long())
            else:
                x_Nd = x_Nd.index_copy_(0, idx_n, out_nd)  # x_Nd is pass 0's output: ours
                passes_N.index_add_(0, idx_n, torch.ones_like(idx_n))

            # Balance loss over the tokens of this pass, written over all N rows (the other
            # rows masked) so that it reads the same at every pass.
            if idx_n is None:
                active_N = routed_N if routed_N is not None else torch.ones(N, dtype=torch.bool, device=dev)
                aux_sum = aux_sum + balance_loss(probs_nV, top1_n, active_N, num_active)
            else:
                V = probs_nV.size(1)
                probs_NV = probs_nV.new_zeros(N, V).index_copy(0, idx_n, probs_nV)
                top1_N = torch.zeros_like(prio_N).index_copy_(0, idx_n, top1_n)
                active_N = torch.zeros(N, dtype=torch.bool, device=dev).index_fill_(0, idx_n, True)
                aux_sum = aux_sum + balance_loss(probs_NV, top1_N, active_N, num_active)

        if cfg.residual == "official" and L > 1:
            x_Nd = self.strata_norms[L - 1](x_Nd)
        self.aux_loss = aux_sum / max(num_passes, 1)
        self.passes_TB = passes_N.view(T, B)
        self.routed_TB = (
            torch.ones(T, B, dtype=torch.bool, device=dev) if routed_N is None else routed_N.view(T, B)
        )
        self.dropped, self.assigned = dropped, assigned
        return x_Nd.view(T, B, d)

    def _route(self, c, u_nd, prio_n, valid_n, idx_n, state_N, tokens_at):
        """Route the n rows of pass ``c``: router, top-k, slots, capacity, the pass plan.

        ``valid_n``: which rows are routed (pass 0 with padding), else None (all). Updates
        ``tokens_at`` (host counts of the later strata) in place. Returns None if no row is
        routed, else (router probs, top-1 experts, combine weights [K, n], PassPlan, new
        ``state_N``, tokens routed, assignments made, assignments kept).
        """
        cfg = self.cfg
        n = u_nd.size(0)
        N = n if idx_n is None else state_N.numel()
        L = cfg.num_strata
        dev = u_nd.device
        first, V = cfg.first_expert(c), cfg.visible_experts(c)
        # Router in fp32 always (also under --fp16/--bf16).
        logits_nV = F.linear(u_nd.float(), self.routers[c].weight.float())
        noisy = self.training or cfg.inference_noise
        probs_nV, experts_Kn, gates_Kn, keep_Kn = select_experts(
            logits_nV, cfg.k, cfg.second_expert_policy, noisy
        )
        K = experts_Kn.size(0)
        A = K * n
        valid_Kn = keep_Kn if valid_n is None else keep_Kn & valid_n.unsqueeze(0)
        expert_A = torch.where(valid_Kn, experts_Kn, V).reshape(-1)  # V = not routed
        prio_A = (torch.arange(K, device=dev).unsqueeze(1) * N + prio_n).reshape(-1)
        pos_A, counts_B = slot_positions(expert_A, prio_A, V + 1, priority_bound=K * N)

        # The next stratum follows the top-1 expert, chosen before any capacity dropping.
        next_n = self.stratum_of_expert[experts_Kn[0] + first] + 1
        if idx_n is None:
            state_N = next_n if valid_n is None else torch.where(valid_n, next_n, L)
        else:
            state_N = state_N.index_copy(0, idx_n, next_n)

        # The one host sync of a pass. The buffer shape needs the capacity (from the number of
        # tokens at this stratum) and the longest expert queue (no buffer row is computed past
        # it); the same transfer brings the token count of every later stratum, so the later
        # passes gather their tokens without a sync of their own.
        host = [counts_B[:V], torch.bincount(state_N, minlength=L + 1)]
        if valid_n is not None:
            host.append(valid_n.sum().unsqueeze(0))
        host = torch.cat(host).tolist()
        loads = host[:V]
        tokens_at[c + 1 :] = host[V + c + 1 : V + L + 1]
        num_active = host[-1] if valid_n is not None else n
        if num_active == 0:
            return None
        cap = expert_capacity(
            num_active, V, K, training=self.training,
            capacity_factor=cfg.capacity_factor,
            eval_fraction=cfg.eval_capacity_token_fraction,
        )
        C = max(loads) if cap is None else min(cap, max(loads))
        kept_V = [min(load, C) for load in loads]  # host ints, V of them
        assigned, kept = sum(loads), sum(kept_V)
        kept_A = (expert_A < V) & (pos_A < C)

        g_Kn = combine_weights(gates_Kn, kept_A.view(K, n), renormalize=(K == 2))
        if cfg.eom > 0:  # expert output masking, per token-expert assignment, no rescale
            if self.training:
                g_Kn = g_Kn * (torch.rand_like(g_Kn) >= cfg.eom)
            else:
                g_Kn = g_Kn * (1.0 - cfg.eom)

        # Slots: expert e's kept assignments fill positions 0..kept_V[e]-1 of its C_buf slots.
        # Assignments that are not computed point at an empty slot (their weight is 0); when
        # every slot is full (possible with top-1 capacity or an eval capacity fraction), one
        # spare slot per expert provides it.
        C_buf = C
        if kept < A and kept == V * C:
            C_buf = C + 1
        empty = next((e * C_buf + kept_V[e] for e in range(V) if kept_V[e] < C_buf), 0)
        S = V * C_buf
        slot_A = torch.where(kept_A, expert_A * C_buf + pos_A, empty)
        asg_S = torch.full((S + 1,), A, dtype=torch.long, device=dev)
        asg_S = asg_S.scatter_(0, torch.where(kept_A, slot_A, S), torch.arange(A, device=dev))[:S]
        src_S = asg_S % n  # the row each slot reads; empty slots read row 0 (A % n == 0)
        plan = PassPlan(first=first, V=V, C=C_buf, src_S=src_S, slot_A=slot_A, asg_S=asg_S)
        return probs_nV, experts_Kn[0], g_Kn, plan, state_N, num_active, assigned, kept


class _GatherRows(torch.autograd.Function):
    """``x[idx]`` for distinct ``idx``; the backward writes rows (index_copy) instead of
    index_select's scatter-add."""

    @staticmethod
    def forward(ctx, x_Nd, idx_n):
        ctx.save_for_backward(idx_n)
        ctx.num_rows = x_Nd.size(0)
        return x_Nd.index_select(0, idx_n)

    @staticmethod
    def backward(ctx, grad_nd):
        (idx_n,) = ctx.saved_tensors
        grad = grad_nd.new_zeros((ctx.num_rows, grad_nd.size(1)))
        return grad.index_copy_(0, idx_n, grad_nd), None
