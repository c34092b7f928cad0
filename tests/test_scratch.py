"""Reuse of the expert pass's intermediate buffers on CPU (fairseq_smoe/modules/scratch.py):
a buffer is handed out again only when nothing holds it, the pool stays as small as the most
buffers in use at once, and the block computes the same with it, bit for bit, with the reused
memory poisoned (outputs, input and weight gradients, two graphs alive at once, inference mode
then training)."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import pytest
import torch

import fairseq_smoe.modules.scratch as scratch_mod
from fairseq_smoe.modules import SMoEBlock, SMoEConfig
from fairseq_smoe.modules.scratch import ScratchPool, scratch


def test_a_buffer_is_reused_only_when_nothing_holds_it():
    pool = ScratchPool()
    a = pool.empty((4, 8), torch.float32)
    assert a.shape == (4, 8) and a.dtype == torch.float32 and a.is_contiguous()
    b = pool.empty((4, 8), torch.float32)  # ``a`` alive: a second buffer
    assert b.data_ptr() != a.data_ptr() and len(pool.kept) == 2
    ptr = a.data_ptr()
    del a
    c = pool.empty((2, 8), torch.float64)  # fits in a's buffer (128 bytes): reused
    assert c.data_ptr() == ptr and c.dtype == torch.float64 and len(pool.kept) == 2
    view = c[1:]
    del c
    assert pool.empty((2, 8), torch.float64).data_ptr() != ptr  # a view still holds it
    del view
    assert pool.empty((2, 8), torch.float64).data_ptr() == ptr


def test_best_fit_and_a_free_buffer_too_small_is_replaced():
    pool = ScratchPool()
    big, small = pool.empty((100,), torch.float32), pool.empty((10,), torch.float32)
    big_ptr = big.data_ptr()
    del big, small
    assert pool.empty((5,), torch.float32).data_ptr() != big_ptr  # the smallest that fits
    bigger = pool.empty((300,), torch.float32)  # none fits: the largest free one is replaced
    assert len(pool.kept) == 2 and sorted(t.numel() for t in pool.kept) == [40, 1200]
    assert pool.kept_bytes() == 1240
    del bigger
    pool.clear()
    assert pool.kept == []


def test_scratch_only_for_large_cpu_tensors(monkeypatch):
    like = torch.empty(1)
    assert scratch((4, 4), like) is None  # under MIN_BYTES: malloc recycles it anyway
    big = scratch((scratch_mod.MIN_BYTES // 4,), like)
    assert big is not None and big.dtype == torch.float32
    assert scratch((scratch_mod.MIN_BYTES,), like, torch.uint8).dtype == torch.uint8
    monkeypatch.setattr(scratch_mod, "CAN_COUNT", False)  # no storage use counts: never
    assert scratch((scratch_mod.MIN_BYTES,), like) is None


def _block(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = SMoEConfig(16, 32, (2, 2), second_expert_policy="all", capacity_factor=1.0)
    return SMoEBlock(cfg).to(dtype).train()


def _step(block, x, seed):
    for p in block.parameters():
        p.grad = None  # as fairseq frees them between updates
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    out, st = block(x)
    (out.pow(2).sum() + st.aux_loss).backward()
    return out.detach(), x.grad, [p.grad.clone() for p in block.parameters()]


def _poison(pool):
    for t in pool.kept:
        t.view(torch.float64)[: t.numel() // 8].fill_(float("nan"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_is_bit_identical_with_the_pool(monkeypatch, dtype):
    """Every buffer of the expert passes from the pool (MIN_BYTES 0), NaN-poisoned before each
    step, against no pool at all: the same outputs and gradients bit for bit, step after step,
    and the pool stops growing once it holds one step's buffers."""
    x = torch.randn(9, 4, 16, dtype=dtype)
    ref_block, block = _block(dtype), _block(dtype)
    ref = [_step(ref_block, x, s) for s in range(3)]  # MIN_BYTES as shipped: nothing pooled here
    pool = ScratchPool()
    monkeypatch.setattr(scratch_mod, "POOL", pool)
    monkeypatch.setattr(scratch_mod, "MIN_BYTES", 0)
    sizes = []
    for s in range(3):
        _poison(pool)
        got = _step(block, x, s)
        sizes.append(len(pool.kept))
        for a, b in zip(got[:2] + tuple(got[2]), ref[s][:2] + tuple(ref[s][2])):
            assert torch.equal(a, b)
    assert sizes[0] > 0 and sizes[1] == sizes[2]
    assert len(pool.kept) <= 16  # at most the buffers one forward + backward holds at once


def test_saved_buffers_are_never_handed_out(monkeypatch):
    """Two forwards alive (their saved buffers held by two graphs), then both backwards: each
    gives the gradients it gives alone; and evaluation under inference_mode in between leaves
    buffers that training can use."""
    monkeypatch.setattr(scratch_mod, "POOL", ScratchPool())
    monkeypatch.setattr(scratch_mod, "MIN_BYTES", 0)
    block = _block()
    x1, x2 = torch.randn(7, 3, 16, dtype=torch.float64), torch.randn(7, 3, 16, dtype=torch.float64)
    alone = []
    for x in (x1, x2):
        xr = x.clone().requires_grad_()
        torch.manual_seed(5)
        out, _ = block(xr)
        out.pow(2).sum().backward()
        alone.append(xr.grad)
    xs = [x.clone().requires_grad_() for x in (x1, x2)]
    outs = []
    for x in xs:
        torch.manual_seed(5)
        outs.append(block(x)[0])
    block.eval()
    with torch.inference_mode():
        block(torch.randn(7, 3, 16, dtype=torch.float64))
    block.train()
    for out in outs:
        out.pow(2).sum().backward()
    for x, g in zip(xs, alone):
        assert torch.equal(x.grad, g)
    assert not any(t.is_inference() for t in scratch_mod.POOL.kept)
