"""Host-device transfers made visible (fairseq_smoe/modules/host_sync.py): HostSyncAudit sees
every operation that transfers on CUDA, on CPU, and the SMoE slots (block, stack, CMR) do none
but the deliberate read per pass, forward and backward."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import numpy as np
import pytest
import torch

from fairseq_smoe.modules import SMoEBlock, SMoEConfig
from fairseq_smoe.modules import host_sync
from fairseq_smoe.modules.cmr import CMRBlock
from fairseq_smoe.modules.host_sync import HostSyncAudit, cuda_sync_errors, host_reads, read_to_host
from fairseq_smoe.modules.stacked import StackedMoE
from fairseq_smoe.modules.stats import SlotStats

X = torch.randn(6, generator=torch.Generator().manual_seed(0))
M = X > 0

TRANSFERS = {  # what runs -> what the audit records
    "boolean mask read": (lambda: X[M], ["aten::index(mask)"]),
    "boolean mask write": (lambda: X.clone().__setitem__(M, 0.0), ["aten::index_put_(mask)"]),
    "masked_select": (lambda: X.masked_select(M), ["aten::masked_select"]),
    "tolist": (lambda: X.tolist(), ["Tensor.tolist"]),
    "cpu": (lambda: X.cpu(), ["Tensor.cpu"]),
    "numpy": (lambda: X.numpy(), ["Tensor.numpy"]),
    "np.asarray": (lambda: np.asarray(X), ["Tensor.__array__"]),
    "item": (lambda: X[0].item(), ["aten::_local_scalar_dense"]),
    "bool": (lambda: bool(M.any()), ["aten::_local_scalar_dense"]),
    "int": (lambda: int(M.sum()), ["aten::_local_scalar_dense"]),
    "torch.tensor on a device": (lambda: torch.tensor(3, device=X.device), ["torch.tensor(device=)"]),
    "torch.as_tensor on a device": (lambda: torch.as_tensor([1, 2], device="cpu"), ["torch.as_tensor(device=)"]),
    "new_tensor": (lambda: X.new_tensor([1.0]), ["Tensor.new_tensor"]),
    "index with a list": (lambda: X[[0, 2]], ["Tensor.__getitem__(list)"]),
    "index with a tuple holding a list": (lambda: X.view(2, 3)[[0], 1], ["Tensor.__getitem__(list)"]),
    "write with a list": (lambda: X.clone().__setitem__([0, 2], 1.0), ["Tensor.__setitem__(list)"]),
    "nonzero": (lambda: M.nonzero(), ["aten::nonzero"]),
    "bincount": (lambda: torch.bincount(M.long()), ["aten::bincount"]),
    "unique": (lambda: torch.unique(X), ["aten::_unique2"]),
    "repeat_interleave, no output_size": (lambda: X.repeat_interleave(M.long()), ["aten::repeat_interleave"]),
    "equal": (lambda: torch.equal(X, X), ["aten::equal"]),
    # across devices ("meta" stands in for a GPU on CPU)
    "to another device": (lambda: X.to(device="meta"), ["Tensor.to(device)"]),
    "copy from another device": (lambda: torch.empty(6, device="meta").copy_(X), ["aten::copy_"]),
}

DEVICE_ONLY = {  # no transfer on CUDA either
    "integer tensor index": lambda: X[torch.arange(2)],
    "slices": lambda: X[1:3],
    "dtype cast": lambda: X.to(torch.float64),
    "to its own device": lambda: X.to(X.device),
    "to its own device, copied": lambda: X.to("cpu", torch.float64, non_blocking=True, copy=True),
    "to like a tensor on its device": lambda: X.to(M),
    "fill with a Python number": lambda: X.new_full((), 5, dtype=torch.long),
    "masked_fill": lambda: X.masked_fill(M, 0.0),
    "where with a Python number": lambda: torch.where(M, X, 0.0),
    "repeat_interleave with output_size": lambda: X.repeat_interleave(torch.ones(6, dtype=torch.long), output_size=6),
    "torch.tensor on the host": lambda: torch.tensor([1, 2]),
    "as_tensor of a tensor": lambda: torch.as_tensor(X, device=X.device),
}


@pytest.mark.parametrize("case", list(TRANSFERS))
def test_audit_sees_each_transfer(case):
    fn, want = TRANSFERS[case]
    with HostSyncAudit() as audit:
        fn()
    assert audit.seen == want and audit.reads == 0


@pytest.mark.parametrize("case", list(DEVICE_ONLY))
def test_audit_leaves_device_work_alone(case):
    with HostSyncAudit() as audit:
        DEVICE_ONLY[case]()
    assert audit.seen == []


def test_deliberate_read_is_counted_apart_and_nesting_and_exit_work():
    before, want = host_reads(), M.long().tolist()
    with HostSyncAudit() as outer:
        got = read_to_host(M.long())
        with HostSyncAudit() as inner:
            read_to_host(M.long())
            X.cpu()
        X.tolist()
    assert got == want and host_reads() - before == 2
    assert (outer.reads, inner.reads) == (2, 1)
    assert inner.seen == ["Tensor.cpu"] and outer.seen == ["Tensor.cpu", "Tensor.tolist"]
    assert host_sync._audits == []
    with HostSyncAudit() as after:
        pass
    X.tolist()  # outside: not recorded
    assert after.seen == []


def _passes(stats) -> int:
    return sum(len(b.trace) for b in SlotStats.of(stats).blocks)


SLOTS = {
    "smoe": dict(strata=(2, 2, 2, 2)),
    "smoe top1 dropless": dict(strata=(2, 2, 4), top1=True, dropless=True),
    "smoe random policy, dropouts, eom": dict(strata=(4, 4), second_expert_policy="random", dropout=0.1,
                                             activation_dropout=0.1, eom=0.2),
    "smoe elastic passes": dict(strata=(2, 2, 2), elastic_passes=True),
    "smoe routed padding, exit norm": dict(strata=(4,), route_padding=True, exit_norm=True),
    "stacked": dict(strata=(4,), stack=2),
    "cmr": dict(strata=(2, 2), cmr=True, cmr_gate_drop=0.1),
}


@pytest.mark.parametrize("padded", (True, False))
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("slot", list(SLOTS))
def test_slots_read_the_device_once_per_pass_and_transfer_nothing_else(slot, training, padded):
    """Forward and backward: the reads are read_to_host's, one per pass run, and nothing else
    transfers (the CMR gate count was a torch.tensor(..., device=) per forward)."""
    kw = dict(SLOTS[slot])
    strata = kw.pop("strata")
    torch.manual_seed(0)
    cfg = SMoEConfig(16, 32, strata, **kw)
    if cfg.cmr:
        module = CMRBlock(cfg, SMoEBlock(cfg))
    elif cfg.stack > 1:
        module = StackedMoE(cfg)
    else:
        module = SMoEBlock(cfg)
    module.train(training)
    x = torch.randn(9, 4, 16, requires_grad=True)
    pad = torch.zeros(4, 9, dtype=torch.bool) if padded else None
    if padded:
        pad[2, 6:] = True
    before = host_reads()
    with HostSyncAudit() as audit:
        out, stats = module(x, pad, trace=True)
        slot_stats = SlotStats.of(stats)
        loss = out.sum() + sum(b.aux_loss for b in slot_stats.blocks)
        if slot_stats.cmr is not None:
            loss = loss + slot_stats.cmr.gate_sum
        loss.backward()
    assert audit.seen == []
    assert audit.reads == host_reads() - before == _passes(stats) >= 1


def test_cuda_sync_errors_sets_and_restores_the_mode(monkeypatch):
    """On CPU with torch.cuda's mode functions mocked (the real thing: tests/test_cuda_kernels.py)."""
    state = {"mode": 1, "calls": []}
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: state["mode"])

    def set_mode(mode):
        state["calls"].append(mode)
        state["mode"] = {"default": 0, "warn": 1, "error": 2}.get(mode, mode)

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    with pytest.raises(KeyError):
        with cuda_sync_errors():
            assert state["mode"] == 2 and host_sync._sync_errors[0] == 1
            read_to_host(M.long())  # a CPU tensor: the mode is left as it is
            raise KeyError
    assert state["calls"] == ["error", 1] and state["mode"] == 1 and host_sync._sync_errors[0] == 0
