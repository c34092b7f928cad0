"""The SMoE block: a Transformer FFN sub-layer with stratified experts (spec §1.4-§1.8).

Every token enters stratum 0. At each pass the current stratum's router picks the token's
top-2 experts among that stratum and all later ones; the token then jumps to the stratum
after its top-1 expert's stratum, so it makes 1..L passes ("dynamic capacity"). One stratum
is a vanilla top-2 MoE with the standard pre-LN residual.

``SMoEBlock.forward`` is the stratified loop and nothing else: what a pass does with its
router's logits is ``routing.plan_pass`` (a pure function: slots, capacity, combine weights,
next strata, with the pass's one host read), the experts, the combine and the residual run in
one autograd Function (``experts._ExpertMix``), and what the forward measured comes back as
``BlockStats`` next to the output (nothing is kept on the module). A pass works only on the
tokens at its stratum (pass 0: all rows, padding masked); memory grows with tokens x k x d: no
(tokens x experts x capacity) tensor, and no Python loop over tokens or experts.
"""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SMoEConfig
from .expert_parallel import ExpertParallel
from .experts import StackedExperts
from .precision import autocast_off, compute_dtype
from .routing import CapacityRule, balance_loss, expert_output_mask, plan_pass, stratum_map
from .stats import BlockStats, PassTrace


class SMoEBlock(nn.Module):
    """FFN sub-layer ``x_TBd -> (x_TBd, BlockStats)`` including its residual connection(s).

    Residual semantics (``cfg.residual``), with u the normalised input of a pass:
      * ``official``: pass 0 is pre-LN (y = h + MoE(LN(h))); later passes add the residual
        to the *normalised* input (y = u + MoE(u)) and, with L > 1, every token leaves
        through an exit LayerNorm, reproducing the released code that made the paper's
        numbers (its residual aliasing, spec §1.5).
      * ``paper``: Eq. 4-7: y = x + MoE(LN_s(x)) at every pass, no exit LayerNorm.
    ``cfg.exit_norm`` adds the exit LayerNorm where the mode has none (one stratum: the
    official code's ``--hmoe-layer 1`` vanilla MoE; paper mode).
    Norms: ``ffn_norm`` is stratum 0's pre-norm; ``strata_norms[s-1]`` is stratum s's
    pre-norm and ``strata_norms[-1]`` the exit norm when there is one.
    """

    def __init__(self, cfg: SMoEConfig, ep: Optional[ExpertParallel] = None):
        super().__init__()
        self.cfg = cfg
        d, L = cfg.embed_dim, cfg.num_strata
        self.ffn_norm = nn.LayerNorm(d)
        self.routers = nn.ModuleList(
            [nn.Linear(d, cfg.visible_experts(s), bias=False) for s in range(L)]
        )
        self.strata_norms = nn.ModuleList(
            [nn.LayerNorm(d) for _ in range(L - 1 + int(cfg.has_exit_norm))]
        )
        self.experts = StackedExperts(cfg.num_experts, d, cfg.ffn_dim, cfg.activation_dropout, ep=ep,
                                      widths=cfg.expert_widths())
        self.register_buffer("stratum_of_expert", stratum_map(cfg.strata), persistent=False)
        self.max_passes: Optional[int] = None  # the compute dial (set_max_passes); None = L

    def set_max_passes(self, k: Optional[int]) -> None:
        """Evaluation and generation forwards stop every token after ``k`` passes (1..L; None:
        no cap, the model as trained); in ``official`` mode it still leaves through the exit
        LayerNorm. Training forwards are not capped (see ``cfg.elastic_passes``)."""
        L = self.cfg.num_strata
        if k is not None and not 1 <= k <= L:
            raise ValueError(f"--smoe-max-passes must be in 1..{L} (the strata of this model), got {k}")
        self.max_passes = k

    def _pass_budget(self, N: int, dev) -> Optional[Tensor]:
        """Per row, the passes it may make: the dial's K at evaluation, a random K in 1..L per
        token in training with ``elastic_passes``, else None (no cap)."""
        L = self.cfg.num_strata
        if self.training:
            if not self.cfg.elastic_passes or L == 1:
                return None
            return torch.randint(1, L + 1, (N,), device=dev)
        if self.max_passes is None or self.max_passes >= L:
            return None
        return torch.full((N,), self.max_passes, dtype=torch.long, device=dev)

    def pre_norm(self, stratum: int) -> nn.Module:
        return self.ffn_norm if stratum == 0 else self.strata_norms[stratum - 1]

    def _pre_norm_touching_later_strata(self, x_nd: Tensor) -> Tensor:
        """Stratum 0's pre-norm, its weight passed through ``_TouchIdle`` with the routers and
        pre-norms of strata 1.. (data-parallel training only): the same values, and an exact
        zero gradient for each of those parameters on top of whatever the passes give them, so
        that a step in which no token reaches a stratum still gives every parameter a gradient.
        torch's DDP (fairseq's default --ddp-backend pytorch_ddp) otherwise stops at the next
        step with "Expected to have finished reduction in the prior iteration"; legacy_ddp fills
        a missing gradient with the same zeros."""
        norm = self.ffn_norm
        later = [p for s in range(1, self.cfg.num_strata)
                 for p in (self.routers[s].weight, *self.pre_norm(s).parameters())]
        weight = _TouchIdle.apply(norm.weight, *later)
        return F.layer_norm(x_nd, norm.normalized_shape, weight, norm.bias, norm.eps)

    def router_logits(self, stratum: int, u_nd: Tensor) -> Tensor:
        """Router logits in fp32 always (also under --fp16/--bf16 and autocast)."""
        with autocast_off(u_nd):
            return F.linear(u_nd.float(), self.routers[stratum].weight.float())

    def capacity_rule(self) -> CapacityRule:
        cfg = self.cfg
        return CapacityRule(
            training=self.training, capacity_factor=cfg.capacity_factor,
            eval_fraction=cfg.eval_capacity_token_fraction, dropless=cfg.dropless,
        )

    def forward(
        self, x_TBd: Tensor, padding_mask_BT: Optional[Tensor] = None, trace: bool = False,
        stats: bool = True,
    ) -> Tuple[Tensor, Optional[BlockStats]]:
        """``stats=False`` (nobody will read them, e.g. generation): no balance loss and no
        per-token bookkeeping, and None in place of the BlockStats."""
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

        rule = self.capacity_rule()
        noisy = self.training or cfg.inference_noise
        weights = self.experts.weights(compute_dtype(x_TBd))
        ep = self.experts.ep
        tokens_at = [N] + [0] * L  # rows per stratum, on the host (from each plan's counts)
        group_at = [1] + [0] * L  # the same summed over the expert-parallel group (lockstep)
        state_N = None  # next stratum of every row (L = done), set by pass 0
        passes_N = torch.zeros(N, dtype=torch.long, device=dev)
        aux_sum = x_Nd.new_zeros((), dtype=torch.float32)
        assigned = kept = num_passes = 0
        expert_rows = [0] * cfg.num_experts
        passes_trace: Optional[List[PassTrace]] = [] if trace else None
        left_N = self._pass_budget(N, dev)  # passes each row may still make (None: no cap)
        touch = L > 1 and self.training and torch.is_grad_enabled() and _data_parallel()

        for c in range(L):
            # Pass 0 works on all N rows (padding rows are masked, not removed); pass c >= 1
            # gathers the rows at stratum c, whose count an earlier plan brought to the host,
            # so a static-size nonzero finds them without a read of its own.
            # With expert parallelism every rank of the group takes part in a pass that any of
            # them needs, with no rows of its own if it has none there.
            if c == 0:
                idx_n, x_nd, prio_n = None, x_Nd, prio_N
            else:
                if group_at[c] == 0:
                    continue  # no token at this stratum: skip it, as the official loop does
                idx_n = torch.nonzero_static(state_N == c, size=tokens_at[c]).squeeze(1)
                x_nd, prio_n = _GatherRows.apply(x_Nd, idx_n), prio_N[idx_n]
            if c == 0 and touch:
                u_nd = self._pre_norm_touching_later_strata(x_nd)
            else:
                u_nd = self.pre_norm(c)(x_nd)
            plan = plan_pass(
                self.router_logits(c, u_nd), prio_n, stratum=c, strata=cfg.strata, rule=rule,
                k=cfg.k, policy=cfg.second_expert_policy, noisy=noisy,
                valid_n=routed_N if c == 0 else None, priority_bound=N,
                stratum_of_expert=self.stratum_of_expert, ep=ep,
                exit_n=None if left_N is None else (left_N if c == 0 else left_N[idx_n]) <= 1,
            )
            if plan is None:
                break  # pass 0 and every token is padding
            assigned, kept = assigned + plan.assigned, kept + plan.kept
            for s in range(c + 1, L):
                tokens_at[s] += plan.next_counts[s]
                group_at[s] += plan.group_next_counts[s]

            # Experts, combine and residual, fused (experts.py): out = residual + sum_k g_k y_k
            g_Kn = expert_output_mask(plan.g_Kn, cfg.eom, self.training)
            residual_nd = u_nd if (cfg.residual == "official" and c > 0) else x_nd
            out_nd = self.experts.mix(residual_nd, u_nd, g_Kn, weights, plan.slots, dropout=cfg.dropout)
            if c == 0:
                x_Nd, state_N = out_nd, plan.next_n  # padding rows keep their input, leave
            else:
                x_Nd = x_Nd.index_copy_(0, idx_n, out_nd)  # x_Nd is pass 0's output: ours
                state_N = state_N.index_copy(0, idx_n, plan.next_n)
            if left_N is not None:
                left_N = left_N - 1 if c == 0 else left_N.index_add(0, idx_n, torch.full_like(idx_n, -1))
            if not stats or plan.num_active == 0:
                continue  # (no rows here: this rank only served the others' exchange)
            num_passes += 1
            for j, rows in enumerate(plan.slots.counts):
                expert_rows[plan.slots.first + j] += rows
            if c == 0:
                passes_N = passes_N + (1 if routed_N is None else routed_N.long())
            else:
                passes_N.index_add_(0, idx_n, torch.ones_like(idx_n))
            aux_sum = aux_sum + balance_loss(
                plan.probs_nV, plan.top1_n, routed_N if c == 0 else None, plan.num_active
            )
            if passes_trace is not None:
                passes_trace.append(PassTrace(
                    stratum=c, first=plan.slots.first, rows_n=idx_n,
                    experts_Kn=plan.experts_Kn + plan.slots.first, kept_Kn=plan.kept_Kn,
                    probs_nV=plan.probs_nV.detach(),
                ))

        if cfg.has_exit_norm:
            x_Nd = self.strata_norms[-1](x_Nd)
        if not stats:
            return x_Nd.view(T, B, d), None
        stats = BlockStats(
            aux_loss=aux_sum / max(num_passes, 1),
            passes_TB=passes_N.view(T, B),
            routed_TB=(torch.ones(T, B, dtype=torch.bool, device=dev) if routed_N is None
                       else routed_N.view(T, B)),
            dropped=assigned - kept,
            assigned=assigned,
            trace=passes_trace, expert_rows=expert_rows,
        )
        return x_Nd.view(T, B, d), stats


def _data_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _TouchIdle(torch.autograd.Function):
    """``w`` (a copy; ``[d]``), and a zero gradient for every tensor of ``params`` (see
    ``SMoEBlock._pre_norm_touching_later_strata``). The zeros do not depend on the parameters'
    values, so they are exact whatever those hold; they cost one small allocation per parameter
    (routers ``[visible experts, d]``, norms ``[d]``) per backward."""

    @staticmethod
    def forward(ctx, w, *params):
        ctx.like = [(p.shape, p.dtype, p.device) for p in params]
        return w.clone()

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.like))


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
