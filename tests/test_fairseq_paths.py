"""Stock fairseq paths that must not break or silently change what SMoE trains (issue 9):
activation checkpointing, autocast / bf16, layerdrop, incremental decoding, the routing record,
flag domains and the exit LayerNorm; in-process on the tiny model."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import pytest
import torch
import torch.nn.functional as F

import fairseq_smoe  # noqa: F401
from tiny import build_tiny, toy_sample
import fairseq_smoe.criterions.smoe_label_smoothed_cross_entropy as criterion_module
from fairseq_smoe.modules import SMoEBlock, SMoEConfig
from fairseq_smoe.modules.host_sync import HostSyncAudit, host_reads
from fairseq_smoe.modules.stats import recording

D, FFN = 8, 16


def build(data, *extra):
    return build_tiny(data, *extra)


def sample(task, B=3, S=7, T=5, seed=0):
    return toy_sample(task, B, S, T, seed)


def train_step_grads(data, *flags, steps=1):
    """Gradients after ``steps`` criterion forward/backward passes from a fixed init and seed."""
    torch.manual_seed(0)
    task, model, crit = build(data, *flags)
    model.train()
    torch.manual_seed(1)
    losses = []
    for step in range(steps):
        loss, _, _ = crit(model, sample(task, seed=step))
        loss.backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("flags", [
    ["--smoe-strata", "2,2"],
    ["--smoe-strata", "2,2", "--moe-cmr"],
    ["--moe-stack", "2"],
])
def test_checkpoint_activations_keeps_every_gradient(dict_dir, flags):
    """Same losses and the same gradient of every parameter, the routers' (which carry the
    balance loss) and the CMR gate's (budget loss) included, with and without
    --checkpoint-activations; dropout on and the sampled second expert, so the recomputation
    must replay the random state too."""
    common = [*flags, "--dropout", "0.1", "--moe-second-expert-policy", "sampling"]
    loss0, plain = train_step_grads(dict_dir, *common, steps=2)
    loss1, ckpt = train_step_grads(dict_dir, *common, "--checkpoint-activations", steps=2)
    assert loss0 == pytest.approx(loss1, rel=1e-6)
    assert plain.keys() == ckpt.keys()
    routers = [n for n in plain if ".routers." in n]
    assert routers and all(plain[n].abs().sum() > 0 for n in routers)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_checkpointed_layers_return_the_balance_loss_with_grad(dict_dir):
    torch.manual_seed(0)
    task, model, _ = build(dict_dir, "--smoe-strata", "2,2", "--checkpoint-activations")
    model.train()
    _, extra = model(**sample(task)["net_input"])
    stats = extra["routing"].blocks()
    assert len(stats) == 2 and all(s.aux_loss.requires_grad for s in stats)


def test_offload_activations_is_refused_by_name(dict_dir):
    with pytest.raises(ValueError, match="--offload-activations"):
        build(dict_dir, "--offload-activations")


# ----------------------------------------------------------------------------- autocast, bf16


@pytest.mark.parametrize("flags", [["--smoe-strata", "2,2"], ["--moe-cmr"], ["--moe-stack", "2"]])
def test_cpu_autocast_bf16_forward_backward(dict_dir, flags):
    """torch.autocast (what --amp does on GPU): the experts compute in bf16, routers and
    gates in fp32, the residual stream and the gradients stay fp32; the loss is close to the
    fp32 one and every parameter that gets a gradient in fp32 gets a finite one."""
    torch.manual_seed(0)
    task, model, crit = build(dict_dir, *flags, "--moe-second-expert-policy", "all")
    model.eval()  # deterministic routing: the two runs differ only by precision
    s = sample(task)
    loss32, _, _ = crit(model, s)
    loss32.backward()
    want = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _, log = crit(model, s)
    loss16.backward()
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.05)
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == want
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".routers." in n)


def test_block_under_autocast_computes_experts_in_bf16():
    torch.manual_seed(0)
    block = SMoEBlock(SMoEConfig(D, FFN, (2, 2), second_expert_policy="all")).eval()
    x = torch.randn(6, 3, D, requires_grad=True)
    ref, _ = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, stats = block(x)
    assert out.dtype == torch.float32  # the residual stream keeps its dtype
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)
    assert not torch.equal(out, ref)  # ... but the experts did run in bf16
    (out.sum() + stats.aux_loss).backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert block.experts.w1.grad.dtype == torch.float32


def test_bf16_model_forward_backward(dict_dir):
    """--bf16 casts the model: experts in bf16, routers in fp32, mixing back into bf16."""
    torch.manual_seed(0)
    task, model, crit = build(dict_dir, "--smoe-strata", "2,2")
    model = model.to(torch.bfloat16).train()
    loss, _, log = crit(model, sample(task))
    loss.backward()
    assert torch.isfinite(loss) and float(log["moe_gate_loss"]) > 0
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- layerdrop


def test_layerdrop_dropped_blocks_contribute_nothing(dict_dir, monkeypatch):
    """With encoder and decoder layerdrop some steps skip SMoE layers: the criterion's gate
    term is then the mean over the blocks that ran (none: no term), the logged passes count
    only those, and nothing from an earlier step is read."""
    seen = []
    real = criterion_module.routing_record
    monkeypatch.setattr(criterion_module, "routing_record", lambda out: seen.append(real(out)) or seen[-1])
    torch.manual_seed(0)
    task, model, crit = build(dict_dir, "--smoe-strata", "2,2", "--encoder-layerdrop", "0.5",
                              "--decoder-layerdrop", "0.5", "--label-smoothing", "0.1")
    model.train()
    counts = []
    for step in range(12):
        s = sample(task, seed=step)
        loss, n, log = crit(model, s)
        loss.backward()
        record = seen[-1]
        blocks = record.blocks()
        counts.append(len(blocks))
        assert {e.side for e in record.entries} <= {"encoder", "decoder"} and len(blocks) <= 2
        if blocks:
            mean = torch.stack([b.aux_loss for b in blocks]).mean()
            assert float(log["moe_gate_loss"]) == pytest.approx(mean.item() * n, rel=1e-6)
            assert log["moe_gate_weight"] == n
        else:
            assert log["moe_gate_weight"] == 0 and float(log["moe_gate_loss"]) == 0.0
        enc_tokens = int(s["net_input"]["src_tokens"].ne(task.source_dictionary.pad()).sum())
        ran_enc = any(e.side == "encoder" for e in record.entries)
        assert int(log["rc_enc_tokens"]) == (enc_tokens if ran_enc else 0)
        model.zero_grad()
    assert 0 in counts and 2 in counts and 1 in counts, counts  # all the cases happened


# ----------------------------------------------------------------------------- incremental decoding


def test_incremental_decoding_routes_like_the_full_forward(dict_dir):
    """Step-by-step decoding with fairseq's incremental state gives the full forward's
    outputs, and a record opened around the steps gets one decoder entry per step whose
    passes equal the full forward's at that position."""
    torch.manual_seed(0)
    task, model, _ = build(dict_dir, "--smoe-strata", "2,2")
    model = model.double().eval()
    s = sample(task)["net_input"]
    with torch.no_grad():
        full, extra = model(**s)
        full_passes = extra["routing"].blocks("decoder")[0].passes_TB  # [T, B]
        enc = model.encoder(s["src_tokens"], src_lengths=s["src_lengths"])
        state, steps = {}, []
        with recording() as record:
            for t in range(s["prev_output_tokens"].size(1)):
                out, _ = model.decoder(s["prev_output_tokens"][:, : t + 1], encoder_out=enc,
                                       incremental_state=state)
                steps.append(out[:, -1])
    # to the fp32 router's rounding (combine weights are fp32 whatever the model dtype)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
    per_step = record.blocks("decoder")
    assert len(per_step) == full_passes.size(0)
    for t, stats in enumerate(per_step):
        assert torch.equal(stats.passes_TB[0], full_passes[t])


def test_without_an_open_record_nothing_is_kept(dict_dir):
    torch.manual_seed(0)
    task, model, _ = build(dict_dir, "--smoe-strata", "2,2")
    model.eval()
    s = sample(task)["net_input"]
    with torch.no_grad():
        model.encoder(s["src_tokens"], src_lengths=s["src_lengths"])  # no record: nothing kept
        _, extra = model(**s)
    assert len(extra["routing"]) == 2  # only this forward's two slots
    for m in model.modules():
        assert not any(isinstance(v, torch.Tensor) and k in ("aux_loss", "passes_TB")
                       for k, v in vars(m).items())


def test_dense_model_has_no_record(dict_dir):
    task, model, crit = build(dict_dir, "--moe-freq", "0")
    _, extra = model(**sample(task)["net_input"])
    assert "routing" not in extra
    _, _, log = crit(model, sample(task))
    assert "moe_gate_loss" not in log


@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("kw", [{}, {"top1": True}, {"eval_capacity_token_fraction": 0.5},
                                {"second_expert_policy": "random"}, {"dropless": True}])
def test_one_host_read_per_pass_and_no_other(training, kw):
    """Forward and backward of a block read the device back exactly once per pass (the
    deliberate read_to_host) and run no operator that reads back on CUDA (nonzero, item,
    bincount, boolean masks, ...): HostSyncAudit watches for them on CPU too."""
    if training and "eval_capacity_token_fraction" in kw:
        return
    torch.manual_seed(0)
    block = SMoEBlock(SMoEConfig(D, FFN, (2, 2, 2, 2), **kw)).train(training)
    x = torch.randn(9, 4, D, requires_grad=True)
    pad = torch.zeros(4, 9, dtype=torch.bool)
    pad[2, 6:] = True
    before = host_reads()
    with HostSyncAudit() as audit:
        out, stats = block(x, pad, trace=True)
        (out.sum() + stats.aux_loss).backward()
    assert host_reads() - before == len(stats.trace) >= 2
    assert audit.seen == []
    # the audit does see such an operator
    with HostSyncAudit() as audit:
        torch.nonzero(stats.passes_TB), stats.aux_loss.item()
    assert audit.seen == ["aten::nonzero", "aten::_local_scalar_dense"]


# ----------------------------------------------------------------------------- exit norm


@pytest.mark.parametrize("training", (False, True))
def test_exit_norm_for_one_stratum_is_the_official_hmoe_layer_1_path(training):
    """--smoe-exit-norm with one stratum: LN_exit(h + MoE(LN(h))), the official code's default
    vanilla MoE (--hmoe-layer 1 --hmoe-layernorm 1); without it, the --hmoe-layer 0 path."""
    torch.manual_seed(0)
    plain = SMoEBlock(SMoEConfig(D, FFN, (4,), second_expert_policy="all")).double().train(training)
    exit_ = SMoEBlock(SMoEConfig(D, FFN, (4,), second_expert_policy="all", exit_norm=True)).double().train(training)
    assert len(plain.strata_norms) == 0 and len(exit_.strata_norms) == 1
    with torch.no_grad():
        exit_.strata_norms[0].weight.uniform_(0.5, 1.5)
        exit_.strata_norms[0].bias.uniform_(-0.5, 0.5)
    missing = exit_.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["strata_norms.0.weight", "strata_norms.0.bias"]
    x = torch.randn(5, 3, D, dtype=torch.float64)
    y, _ = plain(x)
    z, stats = exit_(x)
    ln = exit_.strata_norms[0]
    torch.testing.assert_close(z, F.layer_norm(y, (D,), ln.weight, ln.bias), atol=1e-12, rtol=1e-12)
    assert (stats.passes_TB == 1).all()


def test_exit_norm_flag_reaches_the_model(dict_dir):
    _, model, _ = build(dict_dir, "--smoe-exit-norm")
    blocks = model.smoe_blocks("encoder") + model.smoe_blocks("decoder")
    assert blocks and all(b.cfg.has_exit_norm and len(b.strata_norms) == 1 for b in blocks)
    _, plain, _ = build(dict_dir)
    assert all(len(b.strata_norms) == 0 for b in plain.smoe_blocks("encoder"))


# ----------------------------------------------------------------------------- flag domains


@pytest.mark.parametrize("flags,words", [
    (["--moe-freq", "-1"], ["--moe-freq must be >= 0"]),
    (["--moe-freq", "3"], ["--moe-freq 3 makes no layer an SMoE block", "--moe-freq 0"]),
    (["--moe-capacity-factor", "0"], ["--moe-capacity-factor must be > 0"]),
    (["--moe-eval-capacity-token-fraction", "1.5"], ["--moe-eval-capacity-token-fraction", "(0, 1]"]),
    (["--moe-eval-capacity-token-fraction", "0"], ["--moe-eval-capacity-token-fraction", "(0, 1]"]),
    (["--moe-eval-capacity-token-fraction", "-0.25"], ["--moe-eval-capacity-token-fraction"]),
    (["--moe-eom", "-0.1"], ["--moe-eom"]),
    (["--moe-expert-count", "0"], ["--moe-expert-count must be a positive integer"]),
    (["--moe-expert-count", "4", "--smoe-strata", "4,0"], ["at least one expert"]),
    (["--moe-stack", "0"], ["--moe-stack must be >= 1"]),
    (["--moe-gate-loss-wt", "-1"], ["--moe-gate-loss-wt must be >= 0"]),
    (["--cmr-gate-loss-wt", "-0.5"], ["--cmr-gate-loss-wt must be >= 0"]),
    (["--cmr-gate-loss-p", "1.5"], ["--cmr-gate-loss-p must be in [0, 1]"]),
])
def test_numeric_flags_outside_their_domain_are_refused_by_name(dict_dir, flags, words):
    """At model / criterion build time, from a data dir with no binarized data at all (so
    before any data is read)."""
    with pytest.raises(ValueError) as err:
        build(dict_dir, *flags)
    for w in words:
        assert w in str(err.value)
