"""The SMoE block: a Transformer FFN sub-layer with stratified experts (spec §1.4-§1.8).

Every token enters stratum 0. At each pass the current stratum's router picks the token's
top-2 experts among that stratum and all later ones; the token then jumps to the stratum
after its top-1 expert's stratum, so it makes 1..L passes ("dynamic capacity"). One stratum
is a vanilla top-2 MoE with the standard pre-LN residual.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SMoEConfig
from .experts import StackedExperts
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
        N = T * B
        x_Nd = x_TBd.reshape(N, d)
        if padding_mask_BT is None or cfg.route_padding:
            routed_N = torch.ones(N, dtype=torch.bool, device=x_Nd.device)
        else:
            routed_N = ~padding_mask_BT.t().reshape(N)
        # Capacity slots go in batch-major token order (b, t), as in fairseq's MoE layer,
        # while activations stay in fairseq's time-major layout: priorities do the reorder.
        n_idx = torch.arange(N, device=x_Nd.device)
        prio_N = (n_idx % B) * T + n_idx // B

        L = cfg.num_strata
        state_N = torch.where(routed_N, 0, L)  # next stratum to visit; L = done
        passes_N = torch.zeros(N, dtype=torch.long, device=x_Nd.device)
        aux_sum = x_Nd.new_zeros((), dtype=torch.float32)
        dropped = torch.zeros((), dtype=torch.long, device=x_Nd.device)
        assigned = torch.zeros((), dtype=torch.long, device=x_Nd.device)
        num_passes = 0

        for c in range(L):
            active_N = state_N == c
            u_Nd = self.pre_norm(c)(x_Nd)
            first, V = cfg.first_expert(c), cfg.visible_experts(c)
            # Router in fp32 always (also under --fp16/--bf16).
            logits_NV = F.linear(u_Nd.float(), self.routers[c].weight.float())
            noisy = self.training or cfg.inference_noise
            probs_NV, experts_KN, gates_KN, keep_KN = select_experts(
                logits_NV, cfg.k, cfg.second_expert_policy, noisy
            )
            K = experts_KN.size(0)
            valid_KN = keep_KN & active_N.unsqueeze(0)
            expert_A = torch.where(valid_KN, experts_KN, V).reshape(-1)
            prio_A = (torch.arange(K, device=x_Nd.device).unsqueeze(1) * N + prio_N).reshape(-1)
            pos_A, counts = slot_positions(expert_A, prio_A, V + 1)

            # The one host sync of a pass: buffer shapes need the number of tokens at this
            # stratum (capacity) and the longest expert queue (no buffer row is wasted past it).
            num_active, max_load = torch.stack([active_N.sum(), counts[:V].max()]).tolist()
            if num_active == 0:
                continue  # no token at this stratum: skip it, as the official loop does
            num_passes += 1
            cap = expert_capacity(
                num_active, V, K, training=self.training,
                capacity_factor=cfg.capacity_factor,
                eval_fraction=cfg.eval_capacity_token_fraction,
            )
            C = max_load if cap is None else min(cap, max_load)
            kept_A = (expert_A < V) & (pos_A < C)
            kept_KN = kept_A.view(K, N)
            dropped = dropped + (valid_KN & ~kept_KN).sum()
            assigned = assigned + valid_KN.sum()

            g_KN = combine_weights(gates_KN, kept_KN, renormalize=(K == 2))
            if cfg.eom > 0:  # expert output masking, per token-expert assignment, no rescale
                if self.training:
                    g_KN = g_KN * (torch.rand_like(g_KN) >= cfg.eom)
                else:
                    g_KN = g_KN * (1.0 - cfg.eom)

            # Dispatch: each buffer slot reads its token's row; empty slots read a zero row.
            slot_A = torch.where(kept_A, expert_A * C + pos_A, V * C)  # V*C = discard slot
            token_A = n_idx.repeat(K)
            src_S = torch.full((V * C + 1,), N, dtype=torch.long, device=x_Nd.device)
            src_S = src_S.scatter(0, slot_A, token_A)[: V * C]
            buf_VCd = F.pad(u_Nd, (0, 0, 0, 1)).index_select(0, src_S).view(V, C, d)
            y_VCd = self.experts(buf_VCd, first=first)
            y_VCd = F.dropout(y_VCd, p=cfg.dropout, training=self.training)
            # Combine: each assignment reads its slot (dropped ones read a zero row).
            y_Sd = F.pad(y_VCd.reshape(V * C, d), (0, 0, 0, 1))
            y_KNd = y_Sd.index_select(0, slot_A).view(K, N, d)
            moe_Nd = (y_KNd * g_KN.to(y_KNd.dtype).unsqueeze(-1)).sum(0)

            residual_Nd = u_Nd if (cfg.residual == "official" and c > 0) else x_Nd
            x_Nd = torch.where(active_N.unsqueeze(1), moe_Nd + residual_Nd, x_Nd)
            next_N = self.stratum_of_expert[experts_KN[0] + first] + 1
            state_N = torch.where(active_N, next_N, state_N)
            passes_N = passes_N + active_N.long()
            aux_sum = aux_sum + balance_loss(probs_NV, experts_KN[0], active_N, num_active)

        if cfg.residual == "official" and L > 1:
            x_Nd = self.strata_norms[L - 1](x_Nd)
        self.aux_loss = aux_sum / max(num_passes, 1)
        self.passes_TB = passes_N.view(T, B)
        self.routed_TB = routed_N.view(T, B)
        self.dropped, self.assigned = dropped, assigned
        return x_Nd.view(T, B, d)
