"""Unit tests of the SMoE block (fairseq_smoe.modules.smoe_block, spec §1.4-§1.8) and its config.

Tiny dims (d=8, d_ff=16), fixed seeds; references are written as plain per-token loops.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairseq_smoe.modules import SMoEBlock, SMoEConfig, parse_strata

D, FFN = 8, 16


def make_block(strata, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    cfg = SMoEConfig(embed_dim=D, ffn_dim=FFN, strata=tuple(strata), **kw)
    return SMoEBlock(cfg).to(dtype)


def rand_x(T, B, seed=1, dtype=torch.float64, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, B, D, generator=g) * scale + shift).to(dtype)


def expert_ffn(block, e, u):
    ex = block.experts
    return F.relu(u @ ex.w1[e].t() + ex.b1[e]) @ ex.w2[e].t() + ex.b2[e]


def stratum_of(cfg, e):
    return next(s for s in range(cfg.num_strata) if e < cfg.first_expert(s) + cfg.strata[s])


def ref_smoe_token(block, h):
    """Spec §1.4/§1.5 for one token, eval mode (no capacity), top-2 with deterministic second.

    Returns (output, visited strata, {stratum: (router probs, local top-1)})."""
    cfg = block.cfg
    L = cfg.num_strata
    x, s, visited, routing = h, 0, [], {}
    while s < L:
        visited.append(s)
        u = block.pre_norm(s)(x)
        first = cfg.first_expert(s)
        p = torch.softmax(block.routers[s].weight.double() @ u.double(), 0)
        order = torch.argsort(p, descending=True).tolist()
        routing[s] = (p, order[0])
        chosen = order[:2] if len(order) > 1 else order[:1]
        w = p[chosen] / p[chosen].sum()
        y = sum(w[i].to(h.dtype) * expert_ffn(block, first + e, u) for i, e in enumerate(chosen))
        res = u if (cfg.residual == "official" and s > 0) else x
        x = y + res
        s = stratum_of(cfg, first + chosen[0]) + 1
    if cfg.residual == "official" and L > 1:
        x = block.strata_norms[L - 1](x)
    return x, visited, routing


# ----------------------------------------------------------------------------- references


@torch.no_grad()
def test_one_stratum_equals_plain_top2_moe_reference():
    block = make_block((4,), second_expert_policy="sampling")
    block.eval()
    x = rand_x(5, 3)
    out, st = block(x)
    T, B, _ = x.shape
    ln, W, V = block.ffn_norm, block.routers[0].weight, 4
    f = torch.zeros(V, dtype=torch.float64)
    P = torch.zeros(V, dtype=torch.float64)
    for t in range(T):
        for b in range(B):
            h = x[t, b]
            u = ln(h)
            p = torch.softmax(W @ u, 0)
            e1 = int(p.argmax())
            p2 = p.clone()
            p2[e1] = -1.0
            e2 = int(p2.argmax())
            g1, g2 = p[e1] / (p[e1] + p[e2]), p[e2] / (p[e1] + p[e2])
            y = g1 * expert_ffn(block, e1, u) + g2 * expert_ffn(block, e2, u) + h
            torch.testing.assert_close(out[t, b], y, atol=1e-6, rtol=1e-6)
            f[e1] += 1
            P += p
    N = T * B
    aux = V * ((f / N) * (P / N)).sum()
    assert st.aux_loss.item() == pytest.approx(aux.item(), rel=1e-5)
    assert (st.passes_TB == 1).all()
    assert st.assigned == 2 * N and st.dropped == 0


@torch.no_grad()
@pytest.mark.parametrize("training", (False, True))
def test_one_expert_equals_dense_pre_ln_ffn(training):
    block = make_block((1,))
    block.train(training)
    fc1, fc2 = nn.Linear(D, FFN).double(), nn.Linear(FFN, D).double()
    fc1.weight.copy_(block.experts.w1[0])
    fc1.bias.copy_(block.experts.b1[0])
    fc2.weight.copy_(block.experts.w2[0])
    fc2.bias.copy_(block.experts.b2[0])
    ln = nn.LayerNorm(D).double()
    x = rand_x(6, 2)
    dense = x + fc2(F.relu(fc1(ln(x))))
    out, st = block(x)
    torch.testing.assert_close(out, dense, atol=1e-12, rtol=1e-12)
    assert st.dropped == 0 and st.assigned == 12


@torch.no_grad()
@pytest.mark.parametrize("residual", ("official", "paper"))
@pytest.mark.parametrize("strata", ((2, 2), (1, 3), (2, 2, 2, 2), (3, 1)))
def test_multi_stratum_equals_per_token_reference(strata, residual):
    block = make_block(strata, seed=3, residual=residual)
    block.eval()
    x = rand_x(6, 3, seed=4)
    out, st = block(x)
    per_stratum = {}
    for t in range(6):
        for b in range(3):
            y, visited, routing = ref_smoe_token(block, x[t, b])
            torch.testing.assert_close(out[t, b], y, atol=1e-5, rtol=1e-5)
            assert st.passes_TB[t, b].item() == len(visited)
            for s, pe in routing.items():
                per_stratum.setdefault(s, []).append(pe)
    # aux = mean over the passes run of V_s * sum_e f_e P_e over the tokens at stratum s
    losses = []
    for s, rows in per_stratum.items():
        P = torch.stack([p for p, _ in rows]).mean(0)
        f = torch.bincount(torch.tensor([e for _, e in rows]), minlength=P.numel()).double() / len(rows)
        losses.append(P.numel() * (f * P).sum().item())
    assert st.aux_loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)


# ----------------------------------------------------------------------------- visibility, jumps


def test_routers_see_own_and_later_strata():
    for strata in ((2, 2, 2, 2), (4, 12), (3, 1)):
        block = make_block(strata)
        cfg = block.cfg
        outs = [r.out_features for r in block.routers]
        assert outs == [sum(strata[s:]) for s in range(len(strata))]
        assert [cfg.first_expert(s) for s in range(len(strata))] == [sum(strata[:s]) for s in range(len(strata))]


@torch.no_grad()
def test_stratum_local_ids_map_to_own_and_later_experts():
    # Experts output a marker: expert e adds M at coordinate e (w2 = 0, b2 = M * onehot(e)).
    # Every pre-norm outputs the constant e_7 (weight 0, bias e_7), so routing is the same for
    # every token: router s gives logit 2 to its local 0 (global 2s, stratum s) and logit 1 to
    # its last local id (global 7). Each token thus visits all 4 strata, and in paper mode
    # out - x = M * sum of combine weights per global expert.
    strata = (2, 2, 2, 2)
    block = make_block(strata, residual="paper")
    block.eval()
    M = 10.0
    ex = block.experts
    ex.w2.zero_()
    ex.b2.copy_(M * torch.eye(8, dtype=torch.float64))
    for s in range(4):
        norm = block.pre_norm(s)
        norm.weight.zero_()
        norm.bias.zero_()
        norm.bias[7] = 1.0
        W = block.routers[s].weight
        W.zero_()
        W[0, 7] = 2.0
        W[-1, 7] = 1.0
    x = rand_x(3, 2)
    out, st = block(x)
    assert (st.passes_TB == 4).all()
    g1 = math.exp(2) / (math.exp(2) + math.exp(1))
    g2 = 1.0 - g1
    expected = torch.tensor([g1, 0, g1, 0, g1, 0, g1, 4 * g2], dtype=torch.float64) * M
    torch.testing.assert_close(out - x, expected.expand_as(x), atol=1e-5, rtol=1e-5)


def _hand_routed_block(residual):
    """strata (2,2,2,2); zero experts so x keeps its sign pattern; tokens a*e0 + b*e1 (+noise).

    router 0: (+,+) -> global 7 (exit); (+,-) -> global 4 (stratum 2, skip to 3); (-,.) -> global 1
    router 1 (global 2..7): b > 0 -> global 3 (next 2); b < 0 -> global 5 (stratum 2, next 3)
    router 2 (global 4..7): everyone -> global 5 (next 3) via a LN bias on coordinate 7
    """
    block = make_block((2, 2, 2, 2), seed=5, residual=residual)
    Mw = 50.0
    with torch.no_grad():
        block.experts.w2.zero_()
        block.experts.b2.zero_()
        W0 = block.routers[0].weight
        W0.zero_()
        W0[7, 0], W0[7, 1] = Mw, Mw  # M (u0 + u1)
        W0[4, 0], W0[4, 1] = Mw, -Mw  # M (u0 - u1)
        W0[1, 0] = -Mw  # -M u0
        W1 = block.routers[1].weight
        W1.zero_()
        W1[1, 1] = Mw  # global 3
        W1[3, 1] = -Mw  # global 5
        block.pre_norm(2).bias[7] = 5.0
        W2 = block.routers[2].weight
        W2.zero_()
        W2[1, 7] = Mw  # global 5
    T, B = 4, 3
    x = rand_x(T, B, seed=6) * 0.1
    signs = [(1, 1), (1, -1), (-1, -1), (-1, 1)]
    for t, (a, b) in enumerate(signs):
        x[t, :, 0] = 10.0 * a
        x[t, :, 1] = 10.0 * b
    return block, x


@pytest.mark.parametrize("residual", ("official", "paper"))
@pytest.mark.parametrize("training", (False, True))
def test_next_stratum_jumps_and_passes(residual, training):
    block, x = _hand_routed_block(residual)
    block.train(training)
    with torch.no_grad():
        _, st = block(x, trace=True)
    expected_passes = torch.tensor([1, 2, 3, 4]).unsqueeze(1).expand(4, 3)
    assert torch.equal(st.passes_TB, expected_passes)
    # pass c sees V_c = 8, 6, 4, 2 experts and exactly the tokens whose path contains c
    assert [p.stratum for p in st.trace] == [0, 1, 2, 3]
    assert [p.probs_nV.size(1) for p in st.trace] == [8, 6, 4, 2]
    assert st.trace[0].rows_n is None  # pass 0: every row
    paths = {0: {0}, 1: {0, 3}, 2: {0, 1, 3}, 3: {0, 1, 2, 3}}  # class (row t) -> strata
    for c, p in enumerate(st.trace):
        active = torch.zeros(12, dtype=torch.bool)
        active[torch.arange(12) if p.rows_n is None else p.rows_n] = True
        active_TB = active.view(4, 3)
        for t in range(4):
            assert active_TB[t].tolist() == [c in paths[t]] * 3, (c, t)
        # global expert ids: the top-1 of each pass is in stratum >= c
        assert (p.experts_Kn >= p.first).all() and p.first == 2 * c


@torch.no_grad()
def test_random_init_passes_in_range():
    means = []
    for seed in range(3):
        block = make_block((2, 2, 2, 2), seed=seed, dtype=torch.float32)
        block.eval()
        _, st = block(rand_x(64, 8, seed=seed + 10, dtype=torch.float32))
        passes = st.passes_TB
        assert passes.min() >= 1 and passes.max() <= 4
        assert set(passes.flatten().tolist()) == {1, 2, 3, 4}
        means.append(passes.float().mean().item())
    # balanced routing gives E[RC] = 1 + 2/8 + 2/6 + 2/4 = 25/12 ~ 2.08 (spec §1.7);
    # a random router is roughly balanced (observed ~1.95-2.06)
    for m in means:
        assert 1.6 < m < 2.6, means


# ----------------------------------------------------------------------------- capacity


def _forced_block(strata, top1, top2, residual="paper", seed=0):
    """Router 0 sends every token to global ``top1`` first and ``top2`` second (training
    capacity applies), via a large LN bias on coordinate 0."""
    block = make_block(strata, seed=seed, residual=residual, second_expert_policy="sampling")
    with torch.no_grad():
        block.ffn_norm.bias.zero_()
        block.ffn_norm.bias[0] = 100.0
        W = block.routers[0].weight
        W.zero_()
        W[:, 0] = -1.0
        W[top1, 0] = 1.0
        W[top2, 0] = 0.5
    return block


@torch.no_grad()
def test_training_capacity_drops_and_dropped_tokens_keep_residual():
    # L=1, V=4, S=10 -> capacity 2*ceil(10/4) = 6 per expert. Everyone: top-1 = 0, top-2 = 1.
    # Slots go batch-major (b, t): priority b*T + t; tokens with priority >= 6 lose both.
    block = _forced_block((4,), top1=0, top2=1)
    block.train()
    T, B = 5, 2
    x = rand_x(T, B)
    out, st = block(x)
    assert st.assigned == 20
    assert st.dropped == 2 * (10 - 6)
    dropped = torch.zeros(T, B, dtype=torch.bool)
    dropped[1:, 1] = True  # priorities 6..9
    assert torch.equal(out[dropped], x[dropped])  # exactly the residual
    assert ((out[~dropped] - x[~dropped]).abs().amax(-1) > 1e-6).all()
    # the same in eval mode: nothing dropped
    block.eval()
    out_eval, st = block(x)
    assert st.dropped == 0
    torch.testing.assert_close(out_eval[~dropped], out[~dropped])


@torch.no_grad()
def test_training_capacity_top1_assignments_have_priority():
    # L=1, V=4, S=10, capacity 6. Sentence b=0 (slot priorities 0..4) routes 1 then 0,
    # sentence b=1 (priorities 5..9) routes 0 then 1 (sign of coordinate 0; a LN bias on
    # coordinate 7 keeps experts 2, 3 last). Each of experts 0, 1 gets 5 top-1 and 5 top-2
    # assignments: all top-1s are kept, then only the first top-2 (t=0); later tokens keep
    # their top-1 alone, with combine weight 1.
    block = make_block((4,), residual="paper")
    with torch.no_grad():
        block.ffn_norm.bias[7] = 100.0
        W = block.routers[0].weight
        W.zero_()
        W[:, 7] = -1.0
        W[0, 7], W[0, 0] = 1.0, 1.0
        W[1, 7], W[1, 0] = 1.0, -1.0
    block.train()
    x = rand_x(5, 2) * 0.1
    x[:, 0, 0] = -10.0
    x[:, 1, 0] = 10.0
    out, st = block(x)
    assert st.dropped == 8 and st.assigned == 20
    u = block.ffn_norm(x)
    for t in range(1, 5):
        for b, top1 in ((0, 1), (1, 0)):
            ref = x[t, b] + expert_ffn(block, top1, u[t, b])
            torch.testing.assert_close(out[t, b], ref, atol=1e-10, rtol=1e-10)
    # t=0 keeps both experts, so it differs from the top-1-only output
    for b, top1 in ((0, 1), (1, 0)):
        assert not torch.allclose(out[0, b], x[0, b] + expert_ffn(block, top1, u[0, b]))


@torch.no_grad()
@pytest.mark.parametrize("top1,top2,passes", ((0, 1, 2), (2, 3, 1)))
def test_dropped_tokens_still_move_by_top1(top1, top2, passes):
    # strata (2,2): V_0 = 4, S = 10 -> capacity 6 at stratum 0, 8 drops there; at stratum 1
    # V_1 = 2, capacity 2*5 = 10 >= any queue, so no drops.
    block = _forced_block((2, 2), top1=top1, top2=top2)
    block.train()
    x = rand_x(5, 2)
    out, st = block(x)
    assert (st.passes_TB == passes).all()
    assert st.dropped == 8
    assert st.assigned == 20 * passes
    if passes == 1:  # paper mode, exit after stratum 0: fully dropped tokens output x
        assert torch.equal(out[1:, 1], x[1:, 1])


@torch.no_grad()
def test_eval_capacity_fraction_drops():
    block = SMoEBlock(SMoEConfig(D, FFN, (4,), residual="paper", eval_capacity_token_fraction=0.25)).double()
    block.load_state_dict(_forced_block((4,), top1=0, top2=1).state_dict())
    block.eval()
    x = rand_x(5, 2)
    out, st = block(x)
    # capacity ceil(0.25 * 10) = 3 on experts 0 and 1: 7 + 7 drops, priorities >= 3 lose both
    assert st.dropped == 14
    dropped = torch.ones(5, 2, dtype=torch.bool)
    dropped[:3, 0] = False
    assert torch.equal(out[dropped], x[dropped])


# ----------------------------------------------------------------------------- residual modes


@torch.no_grad()
def test_official_vs_paper_residual():
    x = rand_x(6, 3, scale=3.0, shift=2.0)
    paper = make_block((2, 2), seed=7, residual="paper").eval()
    official = make_block((2, 2), seed=7, residual="official").eval()
    assert len(paper.strata_norms) == 1 and len(official.strata_norms) == 2
    y_off, st = official(x)
    mean, var = y_off.mean(-1), y_off.var(-1, unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-6, rtol=0)
    torch.testing.assert_close(var, torch.ones_like(var), atol=1e-3, rtol=0)
    y_pap, st = paper(x)
    assert (y_pap.mean(-1).abs() > 0.5).any()
    assert ((y_pap.var(-1, unbiased=False) - 1).abs() > 0.1).any()
    # L=1: no exit norm, both modes coincide
    p1 = make_block((4,), seed=8, residual="paper").eval()
    o1 = make_block((4,), seed=8, residual="official").eval()
    o1.load_state_dict(p1.state_dict())
    assert torch.equal(p1(x)[0], o1(x)[0])


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("residual", ("official", "paper"))
@pytest.mark.parametrize("strata", ((2, 2), (2, 2, 2, 2)))
def test_gradients_reach_every_router_and_expert(strata, residual):
    block = make_block(strata, seed=9, dtype=torch.float32, residual=residual)
    block.train()
    g = torch.Generator().manual_seed(11)
    for _ in range(3):
        x = torch.randn(12, 4, D, generator=g, requires_grad=True)
        out, st = block(x)
        (out * torch.randn(out.shape, generator=g)).sum().add(st.aux_loss).backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name in ("w1", "b1", "w2", "b2"):
        grad = getattr(block.experts, name).grad
        per_expert = grad.abs().flatten(1).sum(1)
        assert (per_expert > 0).all(), (name, per_expert)
    for s, r in enumerate(block.routers):
        assert (r.weight.grad.abs().sum(1) > 0).all(), s


# ----------------------------------------------------------------------------- determinism


@torch.no_grad()
def test_eval_deterministic_and_inference_noise():
    x = rand_x(8, 4)
    block = make_block((2, 2), second_expert_policy="sampling").eval()
    torch.manual_seed(0)
    a, st = block(x)
    torch.manual_seed(1)
    assert torch.equal(a, block(x)[0])
    noisy = make_block((2, 2), second_expert_policy="sampling", inference_noise=True).eval()
    differs = []
    for seed in range(3):
        torch.manual_seed(seed)
        differs.append(not torch.equal(noisy(x)[0], noisy(x)[0]))
    assert any(differs)
    # in training the second expert is sampled too
    block.train()
    torch.manual_seed(0)
    t1, st = block(x)
    assert not torch.equal(t1, block(x)[0])


# ----------------------------------------------------------------------------- padding


@torch.no_grad()
@pytest.mark.parametrize("residual", ("official", "paper"))
def test_padding_does_not_change_real_tokens(residual):
    block = make_block((2, 2), seed=12, residual=residual).eval()
    x = rand_x(7, 2, seed=13)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True  # sentence 1 has length 5
    out, st = block(x, pad)
    passes, assigned = st.passes_TB.clone(), st.assigned
    assert (passes[5:, 1] == 0).all() and (passes[:, 0] >= 1).all() and (passes[:5, 1] >= 1).all()
    assert torch.equal(st.routed_TB, ~pad.t())
    assert assigned == 2 * passes.sum().item()  # K=2 at both strata, no drops at eval
    # each sentence alone, without padding
    out0, st = block(x[:, :1])
    p0, a0 = st.passes_TB.clone(), st.assigned
    out1, st = block(x[:5, 1:])
    p1, a1 = st.passes_TB.clone(), st.assigned
    # 1e-6, not exact: the router runs in fp32 whatever the block's dtype, and a BLAS may round
    # an fp32 row differently when the batch has another number of rows (seen on one CPU)
    torch.testing.assert_close(out[:, :1], out0, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:5, 1:], out1, atol=1e-6, rtol=0)
    assert torch.equal(passes[:, :1], p0) and torch.equal(passes[:5, 1:], p1)
    assert assigned == a0 + a1
    # same with no padding mask at all on the unpadded sentence
    torch.testing.assert_close(block(x[:, :1], torch.zeros(1, 7, dtype=torch.bool))[0], out0)

    routed = make_block((2, 2), seed=12, residual=residual, route_padding=True).eval()
    out_r, st_r = routed(x, pad)
    assert (st_r.passes_TB >= 1).all() and st_r.routed_TB.all()
    assert st_r.assigned == 2 * st_r.passes_TB.sum().item() > assigned
    torch.testing.assert_close(out_r[:, :1], out0, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_r[:5, 1:], out1, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- EoM


@torch.no_grad()
@pytest.mark.parametrize("residual", ("official", "paper"))
def test_eom_eval_scales_expert_part(residual):
    p = 0.3
    base = make_block((4,), seed=14, residual=residual).eval()
    eom = make_block((4,), seed=99, residual=residual, eom=p).eval()
    eom.load_state_dict(base.state_dict())
    x = rand_x(5, 3)
    y0, yp = base(x)[0], eom(x)[0]
    # gates are fp32 (router precision), hence the tolerance
    torch.testing.assert_close(yp - x, (1 - p) * (y0 - x), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(yp, y0)


@torch.no_grad()
def test_eom_training_masks_whole_assignments():
    # eom close to 1: almost every assignment is masked, so most tokens output exactly x
    block = make_block((4,), seed=15, residual="paper", eom=0.9).train()
    x = rand_x(40, 5)
    torch.manual_seed(0)
    out, st = block(x)
    same = (out == x).all(-1).double().mean().item()
    assert 0.6 < same < 0.95, same  # ~0.81 (both of a token's assignments masked)


# ----------------------------------------------------------------------------- config


def test_parse_strata():
    assert parse_strata("4,12", 16) == (4, 12)
    assert parse_strata("", 8) == (8,)
    assert parse_strata(None, 8) == (8,)
    with pytest.raises(ValueError) as ei:
        parse_strata("2,2", 5)
    assert "4" in str(ei.value) and "5" in str(ei.value)
    with pytest.raises(ValueError, match="integers"):
        parse_strata("2,x", 4)
    with pytest.raises(ValueError, match="at least one expert"):
        parse_strata("0,4", 4)
    with pytest.raises(ValueError):
        parse_strata("4", 0)


def test_config_validation():
    with pytest.raises(ValueError, match="second-expert-policy"):
        SMoEConfig(D, FFN, (2, 2), second_expert_policy="foo")
    with pytest.raises(ValueError, match="residual"):
        SMoEConfig(D, FFN, (2, 2), residual="bar")
    with pytest.raises(ValueError):
        SMoEConfig(D, FFN, (2, 0))
    with pytest.raises(ValueError):
        SMoEConfig(D, FFN, (2, 2), eom=1.0)
    cfg = SMoEConfig(D, FFN, (4, 4, 8))
    assert cfg.num_experts == 16 and cfg.num_strata == 3 and cfg.k == 2
    assert [cfg.visible_experts(s) for s in range(3)] == [16, 12, 8]
    assert SMoEConfig(D, FFN, (4,), top1=True).k == 1
