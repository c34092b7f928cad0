"""Routing for one SMoE pass, as small pure functions (spec §1.6, §2), and ``plan_pass``, which
composes them into the plan of one pass: who goes to which expert slot, with which weight, and
where each token goes next.

Shapes: N tokens, V visible experts of the current stratum (local ids 0..V-1), K = 1 or 2
expert choices per token, A = K*N assignments ordered choice-major (all first choices, then
all second choices), which is what gives first choices priority for capacity slots.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .host_sync import read_to_host


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


def queue_order(
    expert_A: Tensor, priority_A: Tensor, num_bins: int, priority_bound: Optional[int] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """The assignments queued expert by expert, each expert's queue in increasing
    ``priority_A`` (unique per assignment, in ``[0, priority_bound)``; the bound defaults to the
    number of assignments). Invalid assignments carry the sentinel expert id ``num_bins - 1``
    and queue last. Returns ``order_A`` (the assignments in queue order), ``rank_A`` (each
    assignment's place in that order: its inverse) and ``counts_B`` (queue lengths). One sort
    and one count: no (tokens x experts x capacity) tensor, no host sync."""
    A = expert_A.numel()
    span = A if priority_bound is None else priority_bound
    order_A = torch.argsort(expert_A * span + priority_A)
    rank_A = torch.empty_like(order_A).scatter_(0, order_A, torch.arange(A, device=expert_A.device))
    return order_A, rank_A, count_per_bin(expert_A, num_bins)


def slot_positions(
    expert_A: Tensor, priority_A: Tensor, num_bins: int, priority_bound: Optional[int] = None
) -> Tuple[Tensor, Tensor]:
    """Position of each assignment in its expert's queue (see ``queue_order``), and the queue
    lengths."""
    _, rank_A, counts_B = queue_order(expert_A, priority_A, num_bins, priority_bound)
    starts_B = counts_B.cumsum(0) - counts_B
    return rank_A - starts_B[expert_A], counts_B


def combine_weights(gates_KN: Tensor, kept_KN: Tensor, renormalize: bool) -> Tensor:
    """Zero the dropped assignments' gates and, for top-2, renormalise the rest to sum to 1
    (after dropping, as the official code does; a token with both dropped gets 0)."""
    g_KN = gates_KN * kept_KN.to(gates_KN.dtype)
    if renormalize:
        g_KN = g_KN / g_KN.sum(0, keepdim=True).clamp_min(torch.finfo(g_KN.dtype).eps)
    return g_KN


def balance_loss(probs_NV: Tensor, top1_N: Tensor, active_N: Optional[Tensor], num_active: int) -> Tensor:
    """GShard load-balancing loss over the active tokens: V * sum_e f_e * P_e.

    f_e: fraction of active tokens whose first choice (before capacity dropping) is e;
    P_e: mean router probability of e. Equals 1 for perfectly balanced routing.
    ``active_N`` None means every row is active.
    """
    V = probs_NV.size(1)
    if active_N is None:
        P_V = probs_NV.sum(0) / num_active
        m_N = torch.ones_like(top1_N, dtype=probs_NV.dtype)
    else:
        m_N = active_N.to(probs_NV.dtype)
        P_V = (probs_NV * m_N.unsqueeze(1)).sum(0) / num_active
    f_V = torch.zeros(V, dtype=probs_NV.dtype, device=probs_NV.device).index_add_(0, top1_N, m_N)
    return V * (f_V / num_active * P_V).sum()


def count_per_bin(ids: Tensor, num_bins: int) -> Tensor:
    """``bincount(ids, minlength=num_bins)`` for ids in ``[0, num_bins)`` without reading the
    maximum back to the host (CUDA's bincount does, to size its output)."""
    return torch.zeros(num_bins, dtype=torch.long, device=ids.device).scatter_add_(
        0, ids, torch.ones_like(ids)
    )


def expert_output_mask(g_Kn: Tensor, p: float, training: bool) -> Tensor:
    """EoM (spec §1.6.7): in training, zero each token-expert assignment's combine weight with
    probability ``p`` (no rescaling); at evaluation scale every weight by (1 - p)."""
    if p <= 0:
        return g_Kn
    if training:
        return g_Kn * (torch.rand_like(g_Kn) >= p)
    return g_Kn * (1.0 - p)


# ----------------------------------------------------------------------------- the plan of a pass


@dataclass(frozen=True)
class CapacityRule:
    """How many slots an expert gets in a pass (``expert_capacity``); ``dropless``: no limit,
    in training too."""

    training: bool
    capacity_factor: float = 1.0
    eval_fraction: Optional[float] = None
    dropless: bool = False

    def capacity(self, num_tokens: int, num_visible: int, k: int) -> Optional[int]:
        if self.dropless:
            return None
        return expert_capacity(
            num_tokens, num_visible, k, training=self.training,
            capacity_factor=self.capacity_factor, eval_fraction=self.eval_fraction,
        )


@dataclass
class SlotLayout:
    """The expert rows of a pass: its computed assignments sorted by expert, with no padding.

    Visible expert e's rows are ``counts[e]`` consecutive rows, in queue order (``counts`` on
    the host, ``counts_V`` the same on the device; R = sum). ``src_R``: the row of u each
    expert row reads; ``asg_R``: its assignment a = k*n + row; ``slot_A``: the expert row of
    each assignment, 0 for one that is not computed (dropped by capacity, a second choice
    dropped by the ``random`` policy, a padding row), whose combine weight is 0."""

    first: int  # global id of the first visible expert
    counts: List[int]
    counts_V: Tensor
    src_R: Tensor
    slot_A: Tensor
    asg_R: Tensor

    @property
    def V(self) -> int:
        return len(self.counts)

    @property
    def R(self) -> int:
        return self.src_R.numel()


@dataclass
class PassPlan:
    """Everything a pass needs once its router has spoken (``plan_pass``).

    Device tensors over the n rows of the pass: ``probs_nV`` (fp32 router softmax),
    ``experts_Kn`` (local expert ids), ``kept_Kn`` (the assignment is computed), ``g_Kn``
    (combine weights, after dropping), ``next_n`` (the stratum each row goes to next, L = it
    leaves the block; from the top-1 expert, before any dropping). Host ints: ``num_active``
    (rows routed), ``loads`` (assignments per visible expert), ``next_counts`` (rows per next
    stratum 0..L; ``group_next_counts``: summed over the expert-parallel group, which keeps
    the strata loop in lockstep), ``assigned`` / ``kept`` (assignments made / computed)."""

    stratum: int
    slots: SlotLayout
    probs_nV: Tensor
    experts_Kn: Tensor
    kept_Kn: Tensor
    g_Kn: Tensor
    next_n: Tensor
    num_active: int
    loads: List[int]
    next_counts: List[int]
    group_next_counts: List[int]
    assigned: int
    kept: int

    @property
    def top1_n(self) -> Tensor:
        return self.experts_Kn[0]


def plan_pass(
    logits_nV: Tensor,
    prio_n: Tensor,
    *,
    stratum: int,
    strata: Sequence[int],
    rule: CapacityRule,
    k: int = 2,
    policy: str = "all",
    noisy: bool = False,
    valid_n: Optional[Tensor] = None,
    priority_bound: Optional[int] = None,
    stratum_of_expert: Optional[Tensor] = None,
    ep=None,
    exit_n: Optional[Tensor] = None,
) -> Optional[PassPlan]:
    """The plan of one pass at ``stratum`` over n rows, from its router's logits.

    ``prio_n``: each row's capacity priority (unique, in ``[0, priority_bound)``, default n);
    assignment a = k*n + row gets priority k*bound + prio, so every first choice queues before
    every second choice. ``valid_n``: rows that are routed (None: all); the others take no
    slot and leave the block. ``stratum_of_expert``: the stratum of every global expert id on
    the logits' device (built from ``strata`` if not given). ``ep``: the expert-parallel setup
    (``expert_parallel.ExpertParallel``), whose ranks exchange their counts here. ``exit_n``:
    rows that leave the block after this pass whatever their top-1 (the compute dial,
    ``--smoe-max-passes``). Returns None when no row is routed (on any rank of the exchange group).

    One host read (``host_sync.read_to_host``): the expert loads (they size the buffer), the number of
    rows going to each later stratum (so the block gathers them without a read of its own) and
    the number of routed rows (it sets the capacity).
    """
    n = logits_nV.size(0)
    L, first = len(strata), sum(strata[:stratum])
    V = logits_nV.size(1)
    dev = logits_nV.device
    bound = n if priority_bound is None else priority_bound
    probs_nV, experts_Kn, gates_Kn, keep_Kn = select_experts(logits_nV, k, policy, noisy)
    K = experts_Kn.size(0)
    valid_Kn = keep_Kn if valid_n is None else keep_Kn & valid_n.unsqueeze(0)
    expert_A = torch.where(valid_Kn, experts_Kn, V).reshape(-1)  # V = not routed
    prio_A = (torch.arange(K, device=dev).unsqueeze(1) * bound + prio_n).reshape(-1)
    order_A, rank_A, counts_B = queue_order(expert_A, prio_A, V + 1, priority_bound=K * bound)

    # The next stratum follows the top-1 expert, chosen before any capacity dropping.
    if stratum_of_expert is None:
        stratum_of_expert = stratum_map(strata).to(dev)
    next_n = stratum_of_expert[experts_Kn[0] + first] + 1
    if valid_n is not None:
        next_n = torch.where(valid_n, next_n, L)
    if exit_n is not None:
        next_n = torch.where(exit_n, L, next_n)
    num_active_1 = valid_n.sum().unsqueeze(0) if valid_n is not None else counts_B.new_full((1,), n)
    host = torch.cat([counts_B[:V], count_per_bin(next_n, L + 1), num_active_1])
    peers = [read_to_host(host)] if ep is None else ep.gather_counts(host)
    me = 0 if ep is None else ep.layout.group_rank
    loads, next_counts, num_active = peers[me][:V], peers[me][V : V + L + 1], peers[me][-1]
    if sum(p[-1] for p in peers) == 0:
        return None

    # every rank of the group applies each sender's own capacity (its own routed rows)
    peer_counts = [_kept_per_expert(p[:V], rule.capacity(p[-1], V, K)) for p in peers]
    group_next = [sum(p[V + s] for p in peers) for s in range(L + 1)]
    kept_V = peer_counts[me]
    C = max(kept_V, default=0)
    R = sum(kept_V)
    asg_R = None
    if R == sum(loads):  # nothing dropped: the rows are the queue order itself
        counts_V, kept_A, row_A, asg_R = counts_B[:V], expert_A < V, rank_A, order_A[:R]
    else:  # expert e keeps the first kept_V[e] of its queue; its rows follow the experts' before
        counts_V = counts_B[:V].clamp(max=C)  # == kept_V, on the device
        pos_A = rank_A - (counts_B.cumsum(0) - counts_B)[expert_A]
        kept_A = (expert_A < V) & (pos_A < C)
        row_A = (counts_V.cumsum(0) - counts_V)[expert_A.clamp(max=V - 1)] + pos_A
    g_Kn = combine_weights(gates_Kn, kept_A.view(K, n), renormalize=(K == 2))
    slots = slot_layout(row_A, kept_A, kept_V, counts_V, first, n, asg_R)
    slots.peer_counts = peer_counts
    return PassPlan(
        stratum=stratum, slots=slots, probs_nV=probs_nV, experts_Kn=experts_Kn,
        kept_Kn=kept_A.view(K, n), g_Kn=g_Kn, next_n=next_n, num_active=num_active,
        loads=loads, next_counts=next_counts, group_next_counts=group_next,
        assigned=sum(loads), kept=R,
    )


def _kept_per_expert(loads: List[int], cap: Optional[int]) -> List[int]:
    """Assignments each expert computes: its queue cut at the capacity (None: no limit)."""
    return list(loads) if cap is None else [min(load, cap) for load in loads]


def stratum_map(strata: Sequence[int]) -> Tensor:
    """The stratum of every global expert id: ``[E]`` long."""
    return torch.repeat_interleave(torch.arange(len(strata)), torch.tensor(list(strata)))


def slot_layout(row_A: Tensor, kept_A: Tensor, kept_V: List[int], counts_V: Tensor, first: int,
                n: int, asg_R: Optional[Tensor] = None) -> SlotLayout:
    """The expert rows from each kept assignment's row ``row_A`` (rows sorted by expert, in
    queue order); assignments that are not computed read row 0 with weight 0. ``asg_R``, the
    assignment of each row, is derived unless given."""
    A, R = row_A.numel(), sum(kept_V)
    slot_A = torch.where(kept_A, row_A, 0)
    if asg_R is None:
        asg_R = torch.empty(R + 1, dtype=torch.long, device=row_A.device)
        asg_R = asg_R.scatter_(0, torch.where(kept_A, row_A, R), torch.arange(A, device=row_A.device))[:R]
    return SlotLayout(first=first, counts=kept_V, counts_V=counts_V, src_R=asg_R % n,
                      slot_A=slot_A, asg_R=asg_R)
