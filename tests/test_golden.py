"""The SMoE block against golden vectors of the official SMoE layer (tests/fixtures/golden).

The file was produced by running the official implementation (fe1ixxu/Stratified_Mixture_of_
Experts @ 6698122: HMOELayer, top2gatingmask, forward_hmoe) from its own files in float64 on
CPU; see tests/fixtures/golden/README.md. For every case our block, in ``official`` residual
mode with the deterministic ``all`` second-expert policy and the official weights loaded,
must give the same outputs, balance loss and every gradient (to 1e-6: the router runs in fp32
on both sides) and exactly the same passes and dropped / assigned counts. This must keep
passing through every change of the block.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import pytest
import torch

from fairseq_smoe.modules import SMoEBlock, SMoEConfig

GOLDEN = pathlib.Path(__file__).resolve().parent / "fixtures" / "golden" / "official_smoe_golden.pt"
DATA = torch.load(GOLDEN, weights_only=True)
CASES = DATA["cases"]
TOL = dict(atol=1e-6, rtol=1e-6)


def official_names(block: SMoEBlock):
    """Our parameter for each official tensor name (same layouts: the official experts' stacked
    nn.Linear weights ``[E, out, in]`` are ours)."""
    L = block.cfg.num_strata
    names = {
        "fc1_weight": block.experts.w1, "fc1_bias": block.experts.b1,
        "fc2_weight": block.experts.w2, "fc2_bias": block.experts.b2,
        "final_layer_norm_weight": block.ffn_norm.weight, "final_layer_norm_bias": block.ffn_norm.bias,
    }
    for s in range(L):
        names[f"gate{s}_weight"] = block.routers[s].weight
    for s, norm in enumerate(block.strata_norms):  # official hmoe_layernorms[s]
        names[f"hmoe_layernorm{s}_weight"] = norm.weight
        names[f"hmoe_layernorm{s}_bias"] = norm.bias
    return names


def build(case):
    cfg = SMoEConfig(
        embed_dim=DATA["meta"]["dims"]["d"], ffn_dim=DATA["meta"]["dims"]["ffn"],
        strata=tuple(case["strata"]), second_expert_policy="all", residual="official",
        eval_capacity_token_fraction=case["eval_capacity_token_fraction"],
    )
    block = SMoEBlock(cfg).double().train(case["mode"] == "train")
    names = official_names(block)
    assert set(names) == set(case["weights"]), "the golden case and our block disagree on parameters"
    with torch.no_grad():
        for key, param in names.items():
            param.copy_(case["weights"][key])
    return block, names


def case_id(case):
    return f"{'-'.join(map(str, case['strata']))}-{case['mode']}"


def test_the_fixture_covers_what_it_should():
    assert {case_id(c) for c in CASES} == {
        "4-4-train", "4-4-eval", "2-2-2-2-train", "2-2-2-2-eval", "2-2-2-2-eval_frac_0.25",
        "4-12-train", "8-train",
    }
    assert any(c["dropped"] > 0 for c in CASES if c["mode"] == "train")  # capacity is exercised


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_block_matches_the_official_layer(case):
    block, names = build(case)
    x = case["input"].clone().requires_grad_()
    out, stats = block(x)
    torch.testing.assert_close(out, case["output"], **TOL)
    assert stats.aux_loss.item() == pytest.approx(case["balance_loss"].item(), abs=1e-6)
    assert torch.equal(stats.passes_TB, case["passes_TB"].to(stats.passes_TB.dtype))
    assert (stats.dropped, stats.assigned) == (case["dropped"], case["assigned"])

    ((out * case["upstream_grad"]).sum() + stats.aux_loss).backward()
    torch.testing.assert_close(x.grad, case["grads"]["input"], **TOL)
    for key, param in names.items():
        torch.testing.assert_close(param.grad, case["grads"][key], **TOL, msg=f"gradient of {key}")
    # the routers' gradients include the balance term's: they must not be zero
    assert all(r.weight.grad.abs().sum() > 0 for r in block.routers)
