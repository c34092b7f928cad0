"""The paper's baselines (spec §1.10): CMR and stacked MoE slots checked by hand on small
cases, Switch capacity, the CMR budget loss, and forward + backward of every baseline (and
the supported combinations) in the tiny fairseq model."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import pytest
import torch
import torch.nn.functional as F

import fairseq_smoe  # noqa: F401
from tiny import build_tiny, toy_sample
from fairseq_smoe.criterions.smoe_label_smoothed_cross_entropy import cmr_gate_loss
from fairseq_smoe.models.smoe_transformer import _describe_smoe
from fairseq_smoe.modules import SMoEBlock, SMoEConfig
from fairseq_smoe.modules.cmr import CMRBlock
from fairseq_smoe.modules.layers import build_moe_slot
from fairseq_smoe.modules.stacked import StackedMoE
from fairseq_smoe.modules.stats import recording

D, FFN = 8, 16


def cfg(strata=(4,), **kw):
    return SMoEConfig(embed_dim=D, ffn_dim=FFN, strata=tuple(strata), **kw)


def rand_x(T, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, D, generator=g, dtype=torch.float64)


def expert(block, e, u):
    ex = block.experts
    return F.relu(u @ ex.w1[e].t() + ex.b1[e]) @ ex.w2[e].t() + ex.b2[e]


def top2_mixture(block, u):
    """Plain top-2 MoE of a one-stratum block on one token (eval: no capacity, argmax)."""
    p = torch.softmax(block.routers[0].weight @ u, 0)
    top = torch.argsort(p, descending=True)[:2].tolist()
    w = p[top] / p[top].sum()
    return sum(w[i] * expert(block, e, u) for i, e in enumerate(top))


# ----------------------------------------------------------------------------- CMR


@torch.no_grad()
def test_cmr_output_matches_the_formula_by_hand():
    torch.manual_seed(0)
    slot = build_moe_slot(cfg((4,), cmr=True, cmr_gate_drop=0.1)).double().eval()
    assert isinstance(slot, CMRBlock) and isinstance(slot.moe, SMoEBlock)
    x = rand_x(3, 2)
    pad = torch.tensor([[False, False, False], [False, False, True]])  # B x T, one pad
    out, st = slot(x, pad)
    for t in range(3):
        for b in range(2):
            h = x[t, b]
            u = slot.moe.ffn_norm(h)
            if pad[b, t]:
                g = 0.0  # gate zeroed at padding; the MoE does not route it either
                moe = torch.zeros(D, dtype=torch.float64)
            else:
                g = torch.sigmoid(slot.gate.weight[0] @ u + slot.gate.bias[0])
                moe = top2_mixture(slot.moe, u)
            shared = slot.shared_fc2(F.relu(slot.shared_fc1(u)))
            torch.testing.assert_close(out[t, b], h + (1 - g) * shared + g * moe)
    gates = torch.sigmoid(slot.gate(slot.moe.ffn_norm(x))).squeeze(-1) * ~pad.t()
    torch.testing.assert_close(st.cmr.gate_sum, gates.sum().float())
    assert int(st.cmr.gate_count) == 5 and len(st.blocks) == 1


def test_cmr_gate_dropout_scales_kept_gates():
    torch.manual_seed(0)
    slot = build_moe_slot(cfg((4,), cmr=True, cmr_gate_drop=0.5)).double()
    u = slot.moe.ffn_norm(rand_x(16, 4))
    plain = torch.sigmoid(slot.gate(u)).squeeze(-1).float()
    slot.train()
    g, n = slot.gates(u, None)
    dropped = g == 0
    assert 0 < dropped.sum() < g.numel() and int(n) == 64
    torch.testing.assert_close(g[~dropped], 2 * plain[~dropped])  # torch dropout: 1 / (1 - p)


@torch.no_grad()
def test_cmr_with_smoe_paper_residual_mixes_the_smoe_update():
    torch.manual_seed(0)
    slot = build_moe_slot(cfg((2, 2), cmr=True, residual="paper")).double().eval()
    x = rand_x(4, 2)
    out, _ = slot(x)
    u = slot.ffn_norm(x)
    g = torch.sigmoid(slot.gate(u))
    update = slot.moe(x)[0] - x  # the SMoE block's contribution over all its passes
    torch.testing.assert_close(out, x + (1 - g) * slot.shared_ffn(u) + g * update)


def test_cmr_budget_loss_by_hand():
    class Fake:
        def __init__(self, s, n):
            self.gate_sum, self.gate_count = torch.tensor(s, requires_grad=True), torch.tensor(n)

    blocks = [Fake(3.0, 5), Fake(5.0, 5)]  # mean gate over all CMR slots = 8 / 10
    loss, total, n = cmr_gate_loss(blocks, 0.8)
    assert abs(float(loss.detach())) < 1e-6 and float(total.detach()) == 8.0 and int(n) == 10
    loss, _, _ = cmr_gate_loss(blocks, 0.5)
    torch.testing.assert_close(loss, torch.tensor(0.3))
    loss.backward()  # d|m - p| / d sum_g = sign(m - p) / n
    assert blocks[0].gate_sum.grad == pytest.approx(0.1)


# ----------------------------------------------------------------------------- stacked MoE


@torch.no_grad()
def test_stacked_moe_chains_plain_moe_layers_without_inner_norm_or_residual():
    torch.manual_seed(0)
    slot = build_moe_slot(cfg((8,), stack=4)).double().eval()
    assert isinstance(slot, StackedMoE) and len(slot.blocks) == 4
    assert all(b.cfg.strata == (2,) and isinstance(b.ffn_norm, torch.nn.Identity) for b in slot.blocks)
    x = rand_x(3, 2)
    out, st = slot(x)
    assert len(st.blocks) == 4 and st.cmr is None
    for t in range(3):
        for b in range(2):
            z = slot.ffn_norm(x[t, b])
            for block in slot.blocks:
                z = top2_mixture(block, z)  # M_i(z): no LayerNorm, no residual in between
            torch.testing.assert_close(out[t, b], x[t, b] + z)


def test_stacked_moe_padding_gets_no_update_and_all_routers_learn():
    torch.manual_seed(0)
    slot = build_moe_slot(cfg((8,), stack=2))
    x = torch.randn(5, 3, D)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, :2] = True
    out, _ = slot(x, pad)
    torch.testing.assert_close(out[:2, 0], x[:2, 0])
    out.sum().backward()
    for block in slot.blocks:
        assert block.routers[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- Switch


def test_switch_capacity_and_raw_probability_combine():
    """Top-1, 4 experts, 8 tokens all choosing expert 0 (zero router: ties go to expert 0):
    capacity int(cf * ceil(8 / 4)) slots in batch-major token order; combine weight p = 1/4."""
    for cf, kept in ((1.0, 2), (1.5, 3)):
        torch.manual_seed(0)
        block = SMoEBlock(cfg((4,), top1=True, capacity_factor=cf)).double().train()
        torch.nn.init.zeros_(block.routers[0].weight)
        x = rand_x(4, 2)  # T=4, B=2: batch-major order is (b0,t0), (b0,t1), ...
        out, st = block(x)
        u = block.ffn_norm(x)
        order = [(t, b) for b in range(2) for t in range(4)]
        for i, (t, b) in enumerate(order):
            want = x[t, b] + 0.25 * expert(block, 0, u[t, b]) if i < kept else x[t, b]
            torch.testing.assert_close(out[t, b], want)
        assert st.dropped == 8 - kept and st.assigned == 8


# ----------------------------------------------------------------------------- flags / model



def build(data, *extra):
    return build_tiny(data, *extra)


def sample(task, B=3, S=7, T=5, seed=0):
    return toy_sample(task, B, S, T, seed)


BASELINES = {
    "dense": ["--moe-freq", "0"],
    "moe": [],
    "switch": ["--moe-top1-expert"],
    "moe-eom": ["--moe-eom", "0.1"],
    "moe-cmr": ["--moe-cmr", "--cmr-gate-drop", "0.1"],
    "stack-2x2": ["--moe-stack", "2"],
    "smoe-2-2": ["--smoe-strata", "2,2"],
    "smoe-eom": ["--smoe-strata", "2,2", "--moe-eom", "0.1"],
    "smoe-cmr": ["--smoe-strata", "2,2", "--moe-cmr"],
    "smoe-cmr-paper": ["--smoe-strata", "1,3", "--moe-cmr", "--smoe-residual", "paper"],
    "stack-cmr": ["--moe-stack", "2", "--moe-cmr"],
    "stack-switch": ["--moe-stack", "2", "--moe-top1-expert"],
}


@pytest.mark.parametrize("name", list(BASELINES))
def test_every_baseline_trains_forward_and_backward(dict_dir, name):
    torch.manual_seed(0)
    task, model, crit = build(dict_dir, *BASELINES[name])
    model.train()
    loss, sample_size, log = crit(model, sample(task))
    loss.backward()
    assert torch.isfinite(loss) and sample_size == 15
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    blocks = model.smoe_blocks("encoder") + model.smoe_blocks("decoder")
    cmr = model.cmr_blocks("encoder") + model.cmr_blocks("decoder")
    if name == "dense":
        assert not blocks and "moe_gate_loss" not in log
        return
    for b in blocks:  # every router learns, in every stacked layer too
        assert b.routers[0].weight.grad.abs().sum() > 0
    assert ("cmr_gate_loss" in log) == bool(cmr) == ("cmr" in name)
    for c in cmr:
        assert c.gate.weight.grad.abs().sum() > 0 and c.shared_fc1.weight.grad.abs().sum() > 0
    if "stack" in name:
        n = int(BASELINES[name][1])
        assert len(blocks) == 2 * n and all(b.cfg.num_experts == 4 // n for b in blocks)
    model.eval()
    with torch.no_grad():
        crit(model, sample(task, seed=1))  # and evaluation mode


@pytest.mark.parametrize("name", ["moe-cmr", "smoe-cmr", "stack-cmr"])
def test_half_precision(dict_dir, name):
    """--fp16 halves the model: gates and routers run in fp32 and mix back into fp16."""
    torch.manual_seed(0)
    task, model, crit = build(dict_dir, *BASELINES[name])
    model = model.half().train()
    loss, _, log = crit(model, sample(task))
    loss.backward()
    assert torch.isfinite(loss) and 0 < float(log["cmr_gate_sum"]) < int(log["cmr_gate_count"]) * 1.2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_criterion_adds_the_cmr_budget_loss(dict_dir):
    torch.manual_seed(0)
    task, model, crit = build(dict_dir, "--moe-cmr", "--cmr-gate-loss-wt", "0", "--cmr-gate-loss-p", "0.3")
    s = sample(task)
    model.eval()
    with torch.no_grad():
        base, n, log0 = crit(model, s)
        crit.cmr_gate_loss_wt = 0.5
        loss, _, log = crit(model, s)
    with torch.no_grad(), recording() as record:  # eval: the same gates as the criterion's forward
        model(**s["net_input"])
    cmr = record.cmr()
    assert len(cmr) == 2  # one CMR slot per side
    gate_sum = sum(float(c.gate_sum) for c in cmr)
    tokens = 19 + 15  # non-padding source tokens (3 x 7 less 2 pads) + target tokens
    assert sum(int(c.gate_count) for c in cmr) == tokens
    want = 0.5 * n * abs(gate_sum / tokens - 0.3)
    assert float(loss - base) == pytest.approx(want, rel=1e-5)
    assert float(log["cmr_gate_sum"]) == pytest.approx(gate_sum) and int(log["cmr_gate_count"]) == tokens


@pytest.mark.parametrize("flags,words", [
    (["--moe-stack", "3"], ["--moe-stack 3", "not divisible"]),
    (["--moe-stack", "2", "--smoe-strata", "2,2"], ["cannot be combined with --smoe-strata"]),
    (["--moe-cmr", "--cmr-gate-drop", "1.5"], ["--cmr-gate-drop"]),
])
def test_bad_baseline_flags_name_the_problem(dict_dir, flags, words):
    with pytest.raises(ValueError) as err:
        build(dict_dir, *flags)
    for w in words:
        assert w in str(err.value)


def test_checkpoint_mismatch_describes_stack_and_cmr(dict_dir):
    _, stacked, _ = build(dict_dir, "--moe-stack", "2", "--moe-cmr")
    _, plain, _ = build(dict_dir, "--smoe-strata", "1,3")
    assert _describe_smoe(stacked.state_dict()) == "2 stacked MoE layers of 2 experts per slot, with CMR"
    assert _describe_smoe(plain.state_dict()) == "4 experts per block in strata 1,3"
    with pytest.raises(RuntimeError, match="stacked MoE layers"):
        plain.load_state_dict(stacked.state_dict())
