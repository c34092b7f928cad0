"""Unit tests of fairseq_smoe.modules.routing (spec §1.6, §2) on small hand-computed cases."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import math

import pytest
import torch

from fairseq_smoe.modules.routing import (
    CapacityRule,
    balance_loss,
    combine_weights,
    count_per_bin,
    expert_capacity,
    expert_output_mask,
    plan_pass,
    select_experts,
    slot_positions,
)

POLICIES = ("sampling", "all", "random")

# Two tokens, three experts: token 0 ranks experts 1 > 2 > 0, token 1 ranks 2 > 0 > 1.
LOGITS = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])


# ----------------------------------------------------------------------------- select_experts


@pytest.mark.parametrize("policy", POLICIES)
def test_select_deterministic_top1_top2_and_gates(policy):
    probs, experts, gates, keep = select_experts(LOGITS, k=2, policy=policy, noisy=False)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(LOGITS, -1))
    assert experts.tolist() == [[1, 2], [2, 0]]  # row 0: argmax, row 1: second argmax
    p = torch.softmax(LOGITS, -1)
    expected_gates = torch.tensor([[p[0, 1], p[1, 2]], [p[0, 2], p[1, 0]]])
    torch.testing.assert_close(gates, expected_gates)
    # hand value: token 0 first gate = e^3 / (e + e^3 + e^2)
    assert gates[0, 0].item() == pytest.approx(math.exp(3) / (math.exp(1) + math.exp(3) + math.exp(2)), rel=1e-6)
    assert keep.dtype == torch.bool and keep.all()


def test_select_top1_only():
    probs, experts, gates, keep = select_experts(LOGITS, k=1, policy="sampling", noisy=True)
    assert experts.tolist() == [[1, 2]]
    torch.testing.assert_close(gates, probs.gather(1, torch.tensor([[1], [2]])).t())
    assert keep.shape == (1, 2) and keep.all()


def test_select_k2_with_one_visible_expert_gives_single_choice():
    logits = torch.tensor([[0.3], [-2.0], [7.0]])
    for noisy in (False, True):
        probs, experts, gates, keep = select_experts(logits, k=2, policy="sampling", noisy=noisy)
        assert experts.shape == (1, 3) and (experts == 0).all()
        torch.testing.assert_close(gates, torch.ones(1, 3))
        assert keep.all()


def test_select_half_precision_logits_give_fp32_probs():
    probs, _, gates, _ = select_experts(LOGITS.half(), k=2, policy="all")
    assert probs.dtype == torch.float32 and gates.dtype == torch.float32


def test_select_noisy_sampling_is_gumbel_over_the_other_experts():
    torch.manual_seed(0)
    n = 20000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0]).repeat(n, 1)
    probs, experts, gates, keep = select_experts(logits, k=2, policy="sampling", noisy=True)
    assert (experts[0] == 0).all()  # top-1 is the argmax, never noisy
    assert (experts[1] != experts[0]).all()  # second expert is never the top-1
    assert (experts[1] != 1).any()  # ... and sometimes not the second argmax
    assert keep.all()
    torch.testing.assert_close(gates, probs.gather(1, experts.t()).t())
    # Gumbel-max with expert 0 masked samples the second expert from softmax(logits[1:]).
    freq = torch.bincount(experts[1], minlength=4).double() / n
    expected = torch.softmax(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), 0)
    assert freq[0] == 0
    assert torch.allclose(freq[1:], expected, atol=0.02), (freq, expected)


@pytest.mark.parametrize("policy", ("all", "random"))
def test_select_noisy_non_sampling_second_is_second_argmax(policy):
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0]).repeat(500, 1)
    _, experts, _, _ = select_experts(logits, k=2, policy=policy, noisy=True)
    assert (experts[0] == 0).all() and (experts[1] == 1).all()


def test_select_random_policy_drops_second_with_prob_one_minus_2g2():
    torch.manual_seed(0)
    n = 20000
    # probs (0.6, 0.3, 0.1) -> keep the second expert with probability 2 * 0.3 = 0.6
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1])).repeat(n, 1)
    _, experts, gates, keep = select_experts(logits, k=2, policy="random", noisy=True)
    assert (experts[1] == 1).all()
    torch.testing.assert_close(gates[1], torch.full((n,), 0.3))
    assert keep[0].all()  # the first expert is never dropped
    drop_rate = (~keep[1]).double().mean().item()
    assert 0.36 < drop_rate < 0.44, drop_rate
    # with g2 = 0.5 (2*g2 = 1 > U[0,1)) the second expert is always kept
    _, _, _, keep_hi = select_experts(torch.zeros(1000, 2), 2, "random", True)
    assert keep_hi.all()
    # without noise it is never dropped
    _, _, _, keep_det = select_experts(logits, k=2, policy="random", noisy=False)
    assert keep_det.all()


# ----------------------------------------------------------------------------- expert_capacity


def test_capacity_training_top2_is_2_ceil_S_over_V():
    assert expert_capacity(10, 4, 2, training=True) == 6  # 2 * ceil(2.5)
    assert expert_capacity(8, 4, 2, training=True) == 4
    assert expert_capacity(1, 16, 2, training=True) == 2
    # capacity factor is ignored for top-2 (official code)
    assert expert_capacity(10, 4, 2, training=True, capacity_factor=3.0) == 6


def test_capacity_training_top1_uses_capacity_factor():
    assert expert_capacity(10, 4, 1, training=True) == 3  # int(1.0 * ceil(2.5))
    assert expert_capacity(10, 4, 1, training=True, capacity_factor=1.5) == 4  # int(4.5)
    assert expert_capacity(10, 4, 1, training=True, capacity_factor=2.0) == 6


def test_capacity_eval():
    assert expert_capacity(10, 4, 2, training=False) is None
    assert expert_capacity(10, 4, 2, training=False, eval_fraction=0.0) is None
    assert expert_capacity(10, 4, 2, training=False, eval_fraction=0.25) == 3  # ceil(2.5)
    assert expert_capacity(12, 4, 2, training=False, eval_fraction=0.25) == 3
    assert expert_capacity(10, 4, 1, training=False, eval_fraction=1.0) == 10


# ----------------------------------------------------------------------------- slot_positions


def test_slot_positions_hand_example():
    # N=3 tokens, K=2, V=2 experts, bin 2 = sentinel for invalid assignments.
    # token priorities (e.g. batch-major order) p = (2, 0, 1); assignment priority = k*N + p.
    # top-1 experts (1, 0, 1), top-2 experts (0, 1, invalid)
    expert_A = torch.tensor([1, 0, 1, 0, 1, 2])
    prio_A = torch.tensor([2, 0, 1, 5, 3, 4])
    pos, counts = slot_positions(expert_A, prio_A, 3)
    # expert 0 queue: A1 (prio 0), A3 (prio 5)
    # expert 1 queue: A2 (prio 1), A0 (prio 2), A4 (prio 3: a top-2 of the highest-priority
    #                 token still queues after every top-1)
    # sentinel queue: A5
    assert pos.tolist() == [1, 0, 0, 1, 2, 0]
    assert counts.tolist() == [2, 3, 1]


def test_slot_positions_top1_before_top2_for_same_expert():
    # 4 tokens all on expert 0 for both choices of different tokens
    N = 4
    top1 = torch.tensor([0, 0, 1, 0])
    top2 = torch.tensor([1, 1, 0, 1])
    prio_N = torch.arange(N)
    expert_A = torch.cat([top1, top2])
    prio_A = torch.cat([prio_N, N + prio_N])
    pos, counts = slot_positions(expert_A, prio_A, 3)
    # expert 0: top-1 of tokens 0, 1, 3 take slots 0..2, then the top-2 of token 2 gets slot 3
    # expert 1: top-1 of token 2 takes slot 0, then top-2 of tokens 0, 1, 3
    assert pos.tolist() == [0, 1, 0, 2, 1, 2, 3, 3]
    assert counts.tolist() == [4, 4, 0]


def test_slot_positions_sentinel_last_and_counts_match_bincount():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        A, V = 37, 5
        expert_A = torch.randint(0, V + 1, (A,), generator=g)  # V = sentinel
        prio_A = torch.randperm(A, generator=g)
        pos, counts = slot_positions(expert_A, prio_A, V + 1)
        assert torch.equal(counts, torch.bincount(expert_A, minlength=V + 1))
        assert counts[-1] == (expert_A == V).sum()
        # brute force: rank of each assignment among its expert's assignments by priority
        for a in range(A):
            same = expert_A == expert_A[a]
            assert pos[a] == (prio_A[same] < prio_A[a]).sum()
        # the sentinel bin is the last one: no valid expert's queue is affected by invalids
        valid = expert_A < V
        assert (pos[valid] < counts[expert_A[valid]]).all()


# ----------------------------------------------------------------------------- combine_weights


def test_combine_weights_renormalise_after_dropping():
    gates = torch.tensor([[0.6, 0.5, 0.7, 0.4], [0.3, 0.2, 0.1, 0.4]])
    kept = torch.tensor([[True, True, False, False], [True, False, True, False]])
    w = combine_weights(gates, kept, renormalize=True)
    expected = torch.tensor([[0.6 / 0.9, 1.0, 0.0, 0.0], [0.3 / 0.9, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(w, expected)


def test_combine_weights_top1_keeps_raw_probability():
    gates = torch.tensor([[0.6, 0.3, 0.9]])
    kept = torch.tensor([[True, True, False]])
    w = combine_weights(gates, kept, renormalize=False)
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.3, 0.0]]))


# ----------------------------------------------------------------------------- balance_loss


def test_balance_loss_hand_value():
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    top1 = probs.argmax(1)
    active = torch.ones(4, dtype=torch.bool)
    # f = (3/4, 1/4), P = (2.4/4, 1.6/4) = (0.6, 0.4) -> 2 * (0.45 + 0.1) = 1.1
    loss = balance_loss(probs, top1, active, 4)
    assert loss.item() == pytest.approx(1.1, abs=1e-6)


def test_balance_loss_uniform_is_one():
    probs = torch.full((6, 3), 1.0 / 3)
    top1 = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = balance_loss(probs, top1, torch.ones(6, dtype=torch.bool), 6)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_ignores_inactive_tokens():
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.0, 1.0], [0.6, 0.4], [0.2, 0.8], [0.05, 0.95]])
    top1 = probs.argmax(1)
    active = torch.tensor([True, True, False, True, True, False])
    loss = balance_loss(probs, top1, active, 4)
    assert loss.item() == pytest.approx(1.1, abs=1e-6)


def test_balance_loss_has_gradient_through_probs():
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.0, 1.0]], requires_grad=True)
    probs = torch.softmax(logits, -1)
    loss = balance_loss(probs, probs.argmax(1), torch.ones(3, dtype=torch.bool), 3)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- plan_pass

# strata (2, 2), pass 0 (V = 4 visible experts), three tokens with priorities 0, 1, 2:
#   t0 probs (.5, .3, .1, .1): top-1 e0, top-2 e1
#   t1 probs (.4, .1, .2, .3): top-1 e0, top-2 e3
#   t2 probs (.6, .25, .1, .05): top-1 e0, top-2 e1
PROBS3 = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.4, 0.1, 0.2, 0.3], [0.6, 0.25, 0.1, 0.05]])


def test_plan_pass_hand_example_training_capacity():
    # training capacity 2 * ceil(3 / 4) = 2: e0's queue is t0, t1, t2 (top-1s), so t2's top-1
    # is dropped; e1 keeps the top-2s of t0 and t2, e3 the top-2 of t1.
    plan = plan_pass(PROBS3.log(), torch.arange(3), stratum=0, strata=(2, 2),
                     rule=CapacityRule(training=True), k=2)
    assert plan.experts_Kn.tolist() == [[0, 0, 0], [1, 3, 1]]
    assert plan.loads == [3, 2, 0, 1] and plan.slots.counts == [2, 2, 0, 1]  # kept rows per expert
    assert plan.kept_Kn.tolist() == [[True, True, False], [True, True, True]]
    assert (plan.assigned, plan.kept, plan.num_active) == (6, 5, 3)
    torch.testing.assert_close(plan.g_Kn, torch.tensor([[0.5 / 0.8, 0.4 / 0.7, 0.0], [0.3 / 0.8, 0.3 / 0.7, 1.0]]))
    # next stratum from the top-1 (e0, stratum 0 -> 1), also for t2 whose top-1 was dropped
    assert plan.next_n.tolist() == [1, 1, 1] and plan.next_counts == [0, 3, 0]
    # expert rows, sorted by expert, no padding: e0 rows 0-1, e1 rows 2-3, e3 row 4; the
    # dropped assignment (t2's top-1) reads row 0 with combine weight 0
    assert plan.slots.slot_A.tolist() == [0, 1, 0, 2, 4, 3]
    assert plan.slots.asg_R.tolist() == [0, 1, 3, 5, 4]  # assignment a = k*n + token
    assert plan.slots.src_R.tolist() == [0, 1, 0, 2, 1]
    assert plan.slots.counts_V.tolist() == plan.slots.counts


def test_plan_pass_invalid_rows_take_no_slot_and_leave():
    # t1 is padding: it takes no slot, leaves the block (next = L = 2), and the capacity is
    # computed over the 2 routed rows: 2 * ceil(2 / 4) = 2, so nothing is dropped
    plan = plan_pass(PROBS3.log(), torch.arange(3), stratum=0, strata=(2, 2),
                     rule=CapacityRule(training=True), valid_n=torch.tensor([True, False, True]))
    assert plan.num_active == 2 and plan.loads == [2, 2, 0, 0]
    assert plan.kept_Kn.tolist() == [[True, False, True], [True, False, True]]
    assert plan.next_n.tolist() == [1, 2, 1] and plan.next_counts == [0, 2, 1]
    assert plan.g_Kn[:, 1].tolist() == [0.0, 0.0]


def test_plan_pass_later_stratum_uses_global_strata_and_eval_has_no_capacity():
    # strata (2, 2, 2), pass 1: the router sees experts 2..5 (local 0..3); local 0, 1 are
    # stratum 1 (next 2), local 2, 3 stratum 2 (next 3 = exit)
    plan = plan_pass(PROBS3.log(), torch.tensor([4, 0, 2]), stratum=1, strata=(2, 2, 2),
                     rule=CapacityRule(training=False), priority_bound=5)
    assert plan.slots.first == 2 and plan.slots.V == 4
    assert plan.next_n.tolist() == [2, 2, 2] and plan.next_counts == [0, 0, 3, 0]
    assert plan.kept == plan.assigned == 6 and plan.slots.counts == [3, 2, 0, 1]  # no limit
    # e0's queue in priority order: t1 (prio 0), t2 (2), t0 (4)
    assert plan.slots.slot_A[:3].tolist() == [2, 0, 1]


def test_plan_pass_no_routed_row_gives_none():
    assert plan_pass(PROBS3.log(), torch.arange(3), stratum=0, strata=(4,), rule=CapacityRule(True),
                     valid_n=torch.zeros(3, dtype=torch.bool)) is None


def test_count_per_bin_is_bincount():
    ids = torch.tensor([3, 0, 3, 1, 3])
    assert count_per_bin(ids, 5).tolist() == torch.bincount(ids, minlength=5).tolist() == [1, 1, 0, 3, 0]


def test_expert_output_mask():
    g = torch.full((2, 1000), 0.5)
    torch.manual_seed(0)
    masked = expert_output_mask(g, 0.25, training=True)
    assert set(masked.unique().tolist()) == {0.0, 0.5}  # whole assignments, no rescaling
    assert 0.2 < (masked == 0).double().mean().item() < 0.3
    torch.testing.assert_close(expert_output_mask(g, 0.25, training=False), g * 0.75)
    assert expert_output_mask(g, 0.0, training=True) is g
