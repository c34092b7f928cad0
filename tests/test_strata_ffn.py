"""Strata with experts of different FFN widths (--smoe-strata-ffn): the block against a
per-token reference (outputs and every gradient), parameter layout and counts, flag errors."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import pytest
import torch
import torch.nn.functional as F

from fairseq_smoe.modules import SMoEBlock, SMoEConfig

D = 8


def make(strata, widths, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = SMoEConfig(D, 16, tuple(strata), strata_ffn=tuple(widths), second_expert_policy="all", **kw)
    return SMoEBlock(cfg).double()


def expert_params(block):
    """Per global expert: (w1 [f, d], b1, w2 [d, f], b2), whatever its width group."""
    out = []
    for (first, n, f), (w1, b1, w2, b2) in zip(block.experts.groups, block.experts.group_params()):
        out += [(w1[i], b1[i], w2[i], b2[i]) for i in range(n)]
    return out


def reference(block, x_TBd):
    """Spec §1.4/§1.5 token by token (eval: no capacity, deterministic top-2), differentiable."""
    cfg = block.cfg
    L, params = cfg.num_strata, expert_params(block)
    rows = []
    for h in x_TBd.reshape(-1, D):
        x, s = h, 0
        while s < L:
            u = block.pre_norm(s)(x)
            first = cfg.first_expert(s)
            p = torch.softmax(block.routers[s].weight.double() @ u, 0)
            top = torch.argsort(p.detach(), descending=True)[:2].tolist()
            w = p[top] / p[top].sum()
            y = 0
            for i, e in enumerate(top):
                w1, b1, w2, b2 = params[first + e]
                y = y + w[i] * (F.relu(u @ w1.t() + b1) @ w2.t() + b2)
            x = y + (u if (cfg.residual == "official" and s > 0) else x)
            s = next(t for t in range(L) if first + top[0] < cfg.first_expert(t) + cfg.strata[t]) + 1
        rows.append(block.strata_norms[-1](x) if cfg.has_exit_norm else x)
    return torch.stack(rows).view_as(x_TBd)


@pytest.mark.parametrize("strata,widths,residual", [
    ((2, 2), (8, 24), "official"), ((2, 2), (24, 8), "paper"), ((1, 2, 1), (4, 12, 12), "official"),
])
def test_block_equals_the_reference_outputs_and_gradients(strata, widths, residual):
    block = make(strata, widths, residual=residual).eval()
    x = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gy = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out, st = block(x)
    (out * gy).sum().backward()
    got = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    ref = reference(block, x)
    (ref * gy).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)  # fp32 router weights
    for name, p in block.named_parameters():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=1e-5, msg=name)
    assert st.passes_TB.max() > 1 or len(strata) == 1


def test_widths_are_stored_per_run_of_equal_widths_without_padding():
    block = make((1, 2, 1), (4, 12, 12))
    assert block.experts.groups == [(0, 1, 4), (1, 3, 12)]  # strata 1 and 2 share a width
    shapes = {n: tuple(p.shape) for n, p in block.experts.named_parameters()}
    assert shapes == {"w1_0": (1, 4, D), "b1_0": (1, 4), "w2_0": (1, D, 4), "b2_0": (1, D),
                      "w1_1": (3, 12, D), "b1_1": (3, 12), "w2_1": (3, D, 12), "b2_1": (3, D)}
    n_expert = sum(p.numel() for p in block.experts.parameters())
    assert n_expert == sum(n * (2 * D * f + f + D) for n, f in ((1, 4), (3, 12)))
    # one width for every stratum: today's single group and names
    same = make((2, 2), (16, 16))
    assert [n for n, _ in same.experts.named_parameters()] == ["w1", "b1", "w2", "b2"]


def test_training_step_with_capacity_runs_and_every_expert_learns():
    block = make((2, 2), (8, 24)).train()
    x = torch.randn(16, 4, D, dtype=torch.float64, requires_grad=True)
    for _ in range(2):
        out, st = block(x)
        (out.square().sum() + st.aux_loss).backward()
    assert st.dropped > 0 or st.assigned > 0
    for name, p in block.experts.named_parameters():
        assert torch.isfinite(p.grad).all() and (p.grad.flatten(1).abs().sum(1) > 0).all(), name


@pytest.mark.parametrize("kw,words", [
    (dict(strata=(2, 2), strata_ffn=(8,)), ["gives 1 widths for 2 strata", "--smoe-strata-ffn 16,16"]),
    (dict(strata=(2, 2), strata_ffn=(8, 0)), ["must be positive"]),
    (dict(strata=(4,), strata_ffn=(8,), stack=2), ["cannot be combined with --moe-stack"]),
])
def test_bad_widths_are_named(kw, words):
    with pytest.raises(ValueError) as err:
        SMoEConfig(D, 16, **kw)
    for w in words:
        assert w in str(err.value)
