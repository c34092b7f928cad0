"""Routing for one SMoE pass, as small pure functions (spec §1.6, §2).

Shapes: N tokens, V visible experts of the current stratum (local ids 0..V-1), K = 1 or 2
expert choices per token, A = K*N assignments ordered choice-major (all first choices, then
all second choices), which is what gives first choices priority for capacity slots.
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def select_experts(
    logits_NV: Tensor,
    k: int,
    policy: str = "all",
    noisy: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pick each token's experts.

    Returns ``probs_NV`` (fp32 softmax), ``experts_KN`` (local ids), ``gates_KN`` (the raw
    probabilities of the chosen experts) and ``keep_KN`` (False where the ``random`` policy
    dropped a second expert). The first choice is always the argmax; it alone decides the
    next stratum. With ``noisy`` (training, or ``--moe-inference-noise``) the second choice
    follows ``policy``: ``sampling`` = argmax of logits + Gumbel noise, ``random`` = keep the
    second expert only when 2*g2 > U(0,1), ``all`` = plain second argmax. Without ``noisy``
    every policy is the deterministic second argmax, so evaluation is reproducible.
    """
    logits_NV = logits_NV.float()
    probs_NV = torch.softmax(logits_NV, dim=-1)
    top1_N = probs_NV.argmax(dim=-1)
    k = min(k, logits_NV.size(-1))
    if k == 1:
        experts_KN = top1_N.unsqueeze(0)
        gates_KN = probs_NV.gather(1, top1_N.unsqueeze(1)).t()
        return probs_NV, experts_KN, gates_KN, torch.ones_like(gates_KN, dtype=torch.bool)

    scores_NV = logits_NV
    if noisy and policy == "sampling":
        # Gumbel-max: argmax(logits + G) samples from softmax(logits)
        u = torch.rand_like(scores_NV)
        neg_log_u = (-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20)  # -log(u) > 0
        scores_NV = scores_NV - torch.log(neg_log_u)
    scores_NV = scores_NV.scatter(1, top1_N.unsqueeze(1), float("-inf"))
    top2_N = scores_NV.argmax(dim=-1)
    experts_KN = torch.stack([top1_N, top2_N])
    gates_KN = probs_NV.gather(1, experts_KN.t()).t()
    keep_KN = torch.ones_like(gates_KN, dtype=torch.bool)
    if noisy and policy == "random":
        keep_KN[1] = 2.0 * gates_KN[1] > torch.rand_like(gates_KN[1])
    return probs_NV, experts_KN, gates_KN, keep_KN


def expert_capacity(
    num_tokens: int,
    num_visible: int,
    k: int,
    *,
    training: bool,
    capacity_factor: float = 1.0,
    eval_fraction: Optional[float] = None,
) -> Optional[int]:
    """Slots per expert for one pass over ``num_tokens`` tokens, or None for unlimited.

    Training: top-2 gets 2*ceil(S/V) (official code; the capacity factor is not used), top-1
    gets int(cf * ceil(S/V)). Evaluation: ceil(f*S) if a fraction f > 0 is given, else no
    limit, so no token is ever dropped at validation or generation by default.
    """
    if not training:
        if eval_fraction is None or eval_fraction <= 0:
            return None
        return max(1, math.ceil(eval_fraction * num_tokens))
    per_expert = math.ceil(num_tokens / num_visible)
    if k >= 2:
        return 2 * per_expert
    return max(1, int(capacity_factor * per_expert))


def slot_positions(
    expert_A: Tensor, priority_A: Tensor, num_bins: int, priority_bound: Optional[int] = None
) -> Tuple[Tensor, Tensor]:
    """Position of each assignment in its expert's queue, and the queue lengths.

    Assignments are queued per expert in increasing ``priority_A`` (unique per assignment,
    in ``[0, priority_bound)``; the bound defaults to the number of assignments). Invalid
    assignments carry the sentinel expert id ``num_bins - 1`` and queue last. One sort and one
    bincount: no (tokens x experts x capacity) tensor, no host sync.
    """
    A = expert_A.numel()
    span = A if priority_bound is None else priority_bound
    order_A = torch.argsort(expert_A * span + priority_A)
    counts_B = torch.bincount(expert_A, minlength=num_bins)
    starts_B = counts_B.cumsum(0) - counts_B
    pos_sorted_A = torch.arange(A, device=expert_A.device) - starts_B[expert_A[order_A]]
    pos_A = torch.empty_like(pos_sorted_A).scatter_(0, order_A, pos_sorted_A)
    return pos_A, counts_B


def combine_weights(gates_KN: Tensor, kept_KN: Tensor, renormalize: bool) -> Tensor:
    """Zero the dropped assignments' gates and, for top-2, renormalise the rest to sum to 1
    (after dropping, as the official code does; a token with both dropped gets 0)."""
    g_KN = gates_KN * kept_KN.to(gates_KN.dtype)
    if renormalize:
        g_KN = g_KN / g_KN.sum(0, keepdim=True).clamp_min(torch.finfo(g_KN.dtype).eps)
    return g_KN


def balance_loss(probs_NV: Tensor, top1_N: Tensor, active_N: Tensor, num_active: int) -> Tensor:
    """GShard load-balancing loss over the active tokens: V * sum_e f_e * P_e.

    f_e: fraction of active tokens whose first choice (before capacity dropping) is e;
    P_e: mean router probability of e. Equals 1 for perfectly balanced routing.
    """
    V = probs_NV.size(1)
    m_N = active_N.to(probs_NV.dtype)
    P_V = (probs_NV * m_N.unsqueeze(1)).sum(0) / num_active
    f_V = torch.zeros(V, dtype=probs_NV.dtype, device=probs_NV.device).index_add_(0, top1_N, m_N)
    return V * (f_V / num_active * P_V).sum()
