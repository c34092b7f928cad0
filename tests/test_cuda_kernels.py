"""On a CUDA GPU (``pytest -m cuda``; skipped, with the reason, without one): the grouped GEMMs
(fairseq_smoe/modules/grouped.py) on torch's kernel against the loop and a float64 reference,
with odd and empty groups, the fast-kernel gate on the GPU at hand, idle experts' gradients
exactly 0, and the block's host transfers under CUDA's sync debug mode (host_sync.py).

Tolerances (norm-wise relative error to float64, computed from the same bf16 inputs): 1e-2 for
bf16 outputs and gradients (8 mantissa bits: one rounding of each is ~2^-9 per element), 1e-5
for fp32."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import pytest
import torch

from fairseq_smoe.modules import SMoEBlock, SMoEConfig
from fairseq_smoe.modules import grad_reuse
from fairseq_smoe.modules.cmr import CMRBlock
from fairseq_smoe.modules.grouped import (
    backend_for,
    fast_grouped_mm,
    force_backend,
    grouped_linear,
    grouped_linear_t,
    grouped_weight_grad,
    per_expert,
)
from fairseq_smoe.modules.host_sync import HostSyncAudit, cuda_sync_errors, host_reads, read_to_host
from fairseq_smoe.modules.stacked import StackedMoE
from fairseq_smoe.modules.stats import SlotStats

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

DEV = "cuda"
COUNTS = [37, 0, 130, 1, 0, 64, 7, 201]  # odd groups, two empty experts
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def _fast() -> bool:
    return fast_grouped_mm(torch.device(DEV, torch.cuda.current_device()))


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _data(dtype, k=64, m=128):
    g = torch.Generator().manual_seed(0)
    R, V = sum(COUNTS), len(COUNTS)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return [t.to(DEV) for t in (mk(R, k), mk(V, m, k), mk(V, m), mk(R, m))]


def _reference(x, w, b, gy):
    """float64 on the host, per expert, from the same (rounded) inputs."""
    x, w, b, gy = (t.double().cpu() for t in (x, w, b, gy))
    y, gx, gw, gb, start = [], [], torch.zeros_like(w), torch.zeros_like(b), 0
    for e, c in enumerate(COUNTS):
        r = slice(start, start + c)
        y.append(x[r] @ w[e].t() + b[e])
        gx.append(gy[r] @ w[e])
        gw[e], gb[e] = gy[r].t() @ x[r], gy[r].sum(0)
        start += c
    return torch.cat(y), torch.cat(gx), gw, gb


def test_gate_on_this_gpu():
    major, minor = torch.cuda.get_device_capability()
    want = (not torch.version.hip and int((torch.version.cuda or "0").split(".")[0]) >= 12
            and sys.platform != "win32" and major in (9, 10))
    assert _fast() is bool(want), (major, minor, torch.version.cuda, torch.version.hip)
    x = torch.zeros(8, 64, dtype=torch.bfloat16, device=DEV)
    counts_V = torch.tensor(COUNTS, device=DEV)
    assert backend_for(x, None, per_expert(COUNTS), counts_V) == ("grouped" if want else "loop")
    assert backend_for(x.float(), None, per_expert(COUNTS), counts_V) == "loop"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_grouped_functions_against_float64_with_odd_and_empty_groups(backend, dtype):
    if backend == "grouped" and dtype == torch.bfloat16 and not _fast():
        pytest.skip("torch has no fast grouped kernel on this GPU: the block takes the loop here")
    if backend == "grouped" and dtype == torch.float32:
        pytest.skip("torch's CUDA grouped kernel is bf16 only (fp32 runs its host-syncing fallback)")
    x, w, b, gy = _data(dtype)
    counts_V = torch.tensor(COUNTS, device=DEV)
    chunks = per_expert(COUNTS)
    V = len(COUNTS)
    gw, gb = torch.full_like(w, float("nan")), torch.full_like(b, float("nan"))
    gw[4], gb[4] = 1.0, 1.0  # idle, with a gradient already: kept
    fresh = [True] * V
    fresh[4] = False
    torch.cuda.synchronize()
    with force_backend(backend), cuda_sync_errors():  # neither path syncs (torch's fallback would)
        y = grouped_linear(x, w, chunks, b, counts_V)
        gx = grouped_linear_t(gy, w, chunks, counts_V)
        grouped_weight_grad(x, gy, chunks, gw, gb, fresh, counts_V=counts_V)
    torch.cuda.synchronize()
    ry, rgx, rgw, rgb = _reference(x, w, b, gy)
    tol = TOL[dtype]
    assert rel(y, ry) < tol and rel(gx, rgx) < tol
    busy = [e for e, c in enumerate(COUNTS) if c]
    assert rel(gw[busy], rgw[busy]) < tol and rel(gb[busy], rgb[busy]) < tol
    assert (gw[1] == 0).all() and (gb[1] == 0).all()  # idle and fresh: exactly 0, not NaN
    assert (gw[4] == 1).all() and (gb[4] == 1).all()


def test_torch_grouped_mm_syncs_or_raises_where_the_gate_says_no():
    """Why the gate: off its fast kernel, torch's _grouped_mm copies the offsets to the host."""
    if _fast():
        pytest.skip("this GPU has torch's fast grouped kernel")
    x, w, _, _ = _data(torch.bfloat16)
    offs = torch.tensor(COUNTS, device=DEV).cumsum(0).to(torch.int32)
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError), cuda_sync_errors():
        torch._grouped_mm(x, w.transpose(1, 2), offs=offs)


def test_audit_names_real_transfers_on_cuda():
    x = torch.ones(3, device=DEV)
    with HostSyncAudit() as audit:
        torch.ones(3).cuda()
        torch.ones(3).to(DEV)
        torch.tensor([1, 2], device=DEV)
        x.cpu()
        torch.empty(3).copy_(x)
    assert audit.seen == ["Tensor.cuda", "Tensor.to(device)", "torch.tensor(device=)", "Tensor.cpu", "aten::copy_"]


def test_grouped_bias_gradient_of_4096_rows_is_exact_in_bf16():
    if not _fast():
        pytest.skip("torch has no fast grouped kernel on this GPU")
    counts = [4096, 0, 3]
    ones = torch.ones(sum(counts), 8, dtype=torch.bfloat16, device=DEV)
    gw = torch.full((3, 8, 8), float("nan"), dtype=torch.bfloat16, device=DEV)
    gb = torch.full((3, 8), float("nan"), dtype=torch.bfloat16, device=DEV)
    grouped_weight_grad(ones, ones, per_expert(counts), gw, gb, [True] * 3,
                        counts_V=torch.tensor(counts, device=DEV))
    assert gb[0].tolist() == [4096.0] * 8 and gb[2].tolist() == [3.0] * 8 and (gb[1] == 0).all()
    assert (gw[0] == 4096).all() and (gw[1] == 0).all()


def _block(dtype, strata=(4,)):
    torch.manual_seed(0)
    return SMoEBlock(SMoEConfig(64, 128, strata, second_expert_policy="all")).to(DEV, dtype)


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_block_idle_experts_gradients_exactly_zero(monkeypatch, backend):
    """bf16 block, its gradient memory pre-filled with NaN, 3 tokens over 16 experts."""
    if backend == "grouped" and not _fast():
        pytest.skip("torch has no fast grouped kernel on this GPU")
    real_like = grad_reuse.GradBuffers.like
    monkeypatch.setattr(grad_reuse.GradBuffers, "like",
                        lambda self, params: [t.fill_(float("nan")) for t in real_like(self, params)])
    block = _block(torch.bfloat16, (8, 8))
    x = torch.randn(3, 1, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    with force_backend(backend):
        out, stats = block(x)
        out.float().square().sum().backward()
    idle = torch.tensor(stats.expert_rows, device=DEV) == 0
    assert idle.sum() >= 4
    for n in ("w1", "b1", "w2", "b2"):
        grad = block.experts.get_parameter(n).grad
        assert (grad[idle] == 0).all() and torch.isfinite(grad).all(), n


def test_block_grouped_equals_loop_in_bf16():
    """One stratum (the routing depends on the input only, so it is the same on both paths)."""
    if not _fast():
        pytest.skip("torch has no fast grouped kernel on this GPU")
    results = []
    for backend in ("loop", "grouped"):
        block = _block(torch.bfloat16)
        x = torch.randn(64, 16, 64, generator=torch.Generator().manual_seed(1)).to(DEV, torch.bfloat16)
        x.requires_grad_()
        with force_backend(backend):
            out, stats = block(x)
            (out.float().square().sum() + stats.aux_loss).backward()
        results.append((out, x.grad, {n: p.grad for n, p in block.experts.named_parameters()}))
    (o1, g1, p1), (o2, g2, p2) = results
    assert rel(o2, o1) < 1e-2 and rel(g2, g1) < 1e-2
    for n in p1:
        assert rel(p2[n], p1[n]) < 2e-2, n


def test_sync_debug_mode_raises_on_a_sync_but_not_on_read_to_host():
    t = torch.arange(4, device=DEV)
    before = torch.cuda.get_sync_debug_mode()
    with cuda_sync_errors():
        assert torch.cuda.get_sync_debug_mode() == 2
        assert read_to_host(t) == [0, 1, 2, 3]
        with pytest.raises(RuntimeError):
            t.nonzero()
        with pytest.raises(RuntimeError):
            t.sum().item()
    assert torch.cuda.get_sync_debug_mode() == before


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("slot", ["smoe", "stacked", "cmr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_slots_read_the_host_once_per_pass_under_sync_debug_mode(dtype, training, slot, padded):
    """Forward and backward on CUDA: every synchronising call raises but read_to_host's, which
    runs once per pass; HostSyncAudit agrees."""
    torch.manual_seed(0)
    cfg = SMoEConfig(64, 128, (4,) if slot == "stacked" else (2, 2, 4), second_expert_policy="all",
                     stack=2 if slot == "stacked" else 1, cmr=slot == "cmr")
    module = {"smoe": lambda: SMoEBlock(cfg), "stacked": lambda: StackedMoE(cfg),
              "cmr": lambda: CMRBlock(cfg, SMoEBlock(cfg))}[slot]().to(DEV, dtype).train(training)
    x = torch.randn(9, 4, 64, device=DEV, dtype=dtype, requires_grad=True)
    pad = None
    if padded:
        pad = torch.zeros(4, 9, dtype=torch.bool, device=DEV)
        pad[2, 6:] = True
    torch.cuda.synchronize()
    before = host_reads()
    with cuda_sync_errors(), HostSyncAudit() as audit:
        out, stats = module(x, pad, trace=True)
        slot_stats = SlotStats.of(stats)
        loss = out.float().sum() + sum(b.aux_loss for b in slot_stats.blocks)
        if slot_stats.cmr is not None:
            loss = loss + slot_stats.cmr.gate_sum
        loss.backward()
    torch.cuda.synchronize()
    passes = sum(len(b.trace) for b in slot_stats.blocks)
    assert host_reads() - before == audit.reads == passes >= 1
    assert audit.seen == []
    assert torch.isfinite(x.grad).all()
