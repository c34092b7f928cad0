"""Expert weights in nn.Linear's [out, in] layout, and checkpoints of the earlier [in, out] one:
the model's load transposes their weights (``upgrade_weight_layout``), the checkpoint read their
optimizer state (``upgrade_expert_layout``). A resume of such a checkpoint with stock
fairseq-train is in test_end_to_end.py."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import pytest
import torch

from fairseq_smoe.checkpoint_io import CheckpointError
from fairseq_smoe.checkpoints import META, upgrade_expert_layout
from fairseq_smoe.modules import SMoEBlock, SMoEConfig
from fairseq_smoe.modules.experts import WEIGHT_LAYOUT, upgrade_weight_layout

D, FFN = 6, 10


def block(**kw):
    torch.manual_seed(0)
    return SMoEBlock(SMoEConfig(embed_dim=D, ffn_dim=FFN, strata=(2, 2), second_expert_policy="all", **kw)).double().eval()


def old_layout(state_dict, prefix="experts."):
    """What a checkpoint of the earlier layout held: expert weights [E, in, out], no marker."""
    old = {k: (v.transpose(1, 2).contiguous() if k.startswith(prefix + "w") else v)
           for k, v in state_dict.items() if k != prefix + "weight_layout"}
    assert len(old) == len(state_dict) - 1
    return old


def test_weights_are_stored_like_nn_linear_and_marked():
    # (test_smoe_block: a 1-expert block equals nn.Linear FFNs given these very tensors)
    b = block()
    assert b.experts.w1.shape == (4, FFN, D) and b.experts.w2.shape == (4, D, FFN)
    assert b.state_dict()["experts.weight_layout"].item() == WEIGHT_LAYOUT == 2


def test_a_state_dict_of_the_old_layout_loads_transposed_and_gives_the_same_outputs():
    src, dst = block(), block()
    with torch.no_grad():
        for p in dst.parameters():
            p.uniform_()  # different from src's
    dst.load_state_dict(old_layout(src.state_dict()))  # strict: the marker is added
    for (n, p), q in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(p, q), n
    x = torch.randn(5, 2, D, dtype=torch.float64)
    assert torch.equal(src(x)[0], dst(x)[0])
    # a state dict of the current layout is left as it is
    sd = src.state_dict()
    assert not upgrade_weight_layout(sd, "experts.")
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in sd.items())


def test_every_width_group_is_transposed():
    src = block(strata_ffn=(4, 12))
    sd = src.state_dict()
    old = old_layout(sd)
    assert old["experts.w1_0"].shape == (2, D, 4) and old["experts.w2_1"].shape == (2, 12, D)
    assert upgrade_weight_layout(old, "experts.")
    assert old.keys() == sd.keys() and all(torch.equal(old[k], sd[k]) for k in sd)
    assert not upgrade_weight_layout(old, "experts.")  # once only
    assert not upgrade_weight_layout({"w1": torch.zeros(1, 2, 3)}, "experts.")  # nothing at that prefix


def _checkpoint(opt_state, names=True):
    """A checkpoint of the old layout: one block at ``enc.moe.``, Adam state as given."""
    model = {"enc.moe.experts.w1": torch.arange(24.).view(2, 3, 4), "enc.moe.experts.b1": torch.zeros(2, 4),
             "enc.moe.experts.w2": torch.arange(24.).view(2, 4, 3), "enc.moe.experts.b2": torch.zeros(2, 3),
             "enc.norm.weight": torch.ones(3)}
    order = ["enc.moe.experts.w1", "enc.moe.experts.b1", "enc.moe.experts.w2", "enc.moe.experts.b2", "enc.norm.weight"]
    extra = {META: {"param_names": order}} if names else {}
    return {"model": model, "last_optimizer_state": {"state": opt_state, "param_groups": []}, "extra_state": extra}


def test_adam_moments_of_the_expert_weights_are_transposed_by_name():
    w1, w2 = torch.arange(24.).view(2, 3, 4), torch.arange(24.).view(2, 4, 3)
    state = _checkpoint({0: {"step": torch.tensor(5.), "exp_avg": w1.clone(), "exp_avg_sq": w1 * 2},
                         1: {"exp_avg": torch.ones(2, 4)}, 2: {"exp_avg": w2.clone()}})
    upgrade_expert_layout(state, "x.pt")
    st = state["last_optimizer_state"]["state"]
    assert torch.equal(st[0]["exp_avg"], w1.transpose(1, 2)) and torch.equal(st[0]["exp_avg_sq"], 2 * w1.transpose(1, 2))
    assert torch.equal(st[2]["exp_avg"], w2.transpose(1, 2))
    assert st[0]["step"].item() == 5 and torch.equal(st[1]["exp_avg"], torch.ones(2, 4))
    # a checkpoint of the current layout (its model has the marker) is not touched
    state = _checkpoint({0: {"exp_avg": w1.clone()}})
    state["model"]["enc.moe.experts.weight_layout"] = torch.tensor(2)
    upgrade_expert_layout(state, "x.pt")
    assert torch.equal(state["last_optimizer_state"]["state"][0]["exp_avg"], w1)


def test_without_parameter_names_the_expert_shapes_decide():
    w1 = torch.arange(24.).view(2, 3, 4)
    state = _checkpoint({0: {"exp_avg": w1.clone()}, 7: {"exp_avg": torch.zeros(5, 5, 5)}}, names=False)
    upgrade_expert_layout(state, "x.pt")
    st = state["last_optimizer_state"]["state"]
    assert torch.equal(st[0]["exp_avg"], w1.transpose(1, 2)) and st[7]["exp_avg"].shape == (5, 5, 5)


def test_the_flat_fp32_buffer_has_its_expert_segments_transposed():
    model = _checkpoint({})["model"]
    order = _checkpoint({})["extra_state"][META]["param_names"]
    flat = torch.cat([model[n].reshape(-1) + 100 * i for i, n in enumerate(order)])
    state = _checkpoint({0: {"exp_avg": flat.clone(), "step": torch.tensor(3.)}})
    upgrade_expert_layout(state, "x.pt")
    want = torch.cat([(model[n].transpose(1, 2) if n.endswith(("w1", "w2")) else model[n]).reshape(-1) + 100 * i
                      for i, n in enumerate(order)])
    assert torch.equal(state["last_optimizer_state"]["state"][0]["exp_avg"], want)
    # without the parameter names the segments cannot be found: refused, not loaded wrong
    state = _checkpoint({0: {"exp_avg": flat.clone()}}, names=False)
    with pytest.raises(CheckpointError, match="--reset-optimizer"):
        upgrade_expert_layout(state, "x.pt")
