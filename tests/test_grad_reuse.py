"""Reuse of the expert-weight gradients' memory on CPU (fairseq_smoe/modules/grad_reuse.py):
memory is handed out again only when nothing else holds it, and the gradients are the same
with and without reuse, stale memory included (idle experts, gradient accumulation)."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import copy
import pickle

import torch

from fairseq_smoe.modules import SMoEBlock, SMoEConfig
from fairseq_smoe.modules.grad_reuse import GradBuffers, holders


def test_holders_counts_the_tensors_sharing_memory():
    t = torch.empty(6)
    assert holders(t) == 1
    alias, view = t.detach(), t[2:]
    assert holders(t) == 3
    del alias, view
    assert holders(t) == 1
    p = torch.nn.Parameter(torch.zeros(6))
    p.grad = t.detach()
    assert holders(t) == 2
    p.grad = None
    assert holders(t) == 1


def test_buffers_are_reused_only_when_free():
    params = [torch.empty(3, 4), torch.empty(5)]
    buf = GradBuffers()
    first = buf.like(params)
    ptrs = [t.data_ptr() for t in first]
    assert [t.shape for t in first] == [p.shape for p in params]
    assert [t.data_ptr() for t in buf.like(params)] != ptrs  # ``first`` still alive: new memory
    kept = [t.data_ptr() for t in buf.kept]
    del first
    assert [t.data_ptr() for t in buf.like(params)] == kept  # nothing else holds them: reused
    held = buf.like(params)[0]  # a reference to one gradient only
    again = buf.like(params)
    assert again[0].data_ptr() != held.data_ptr() and again[1].data_ptr() == kept[1]
    assert [t.shape for t in buf.like([torch.empty(2, 2)])] == [(2, 2)]  # other shapes: new
    assert copy.deepcopy(buf).kept == [] and pickle.loads(pickle.dumps(buf)).kept == []


def _step(block, x, seed):
    torch.manual_seed(seed)
    out, st = block(x)
    (out.pow(2).sum() + st.aux_loss).backward()


def _grads(block):
    return [p.grad.clone() for p in block.experts.parameters()]


def test_block_gradients_same_with_reuse_and_memory_reused():
    """Training steps the fairseq way (gradients freed between updates): step after step the
    expert-weight gradients live in the same memory, and they equal, bit for bit, those of a
    copy that cannot reuse (every earlier gradient kept alive), although 2 tokens leave most
    experts idle (zeroed, not computed) and the reused memory is poisoned with NaN."""
    torch.manual_seed(0)
    block = SMoEBlock(SMoEConfig(embed_dim=16, ffn_dim=32, strata=[4, 4])).train()
    ref = copy.deepcopy(block)
    xs = [torch.randn(2, 1, 16), torch.randn(5, 3, 16), torch.randn(2, 1, 16)]
    got, want, ptrs, alive = [], [], [], []
    for i, x in enumerate(xs):
        for b in (block, ref):
            for p in b.parameters():
                p.grad = None
        for k in block.experts.grad_buffers.kept:
            k.fill_(float("nan"))
        _step(block, x, seed=i)
        _step(ref, x, seed=i)
        got.append(_grads(block))
        want.append(_grads(ref))
        ptrs.append(block.experts.w1.grad.data_ptr())
        alive.append([p.grad for p in ref.experts.parameters()])  # the copy's memory stays held
    assert len(set(ptrs)) == 1
    assert len({a[0].data_ptr() for a in alive}) == len(xs)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert torch.equal(a, b)
    idle = (got[0][0].flatten(1) == 0).all(1)  # the 2-token step's idle experts: exactly 0
    assert idle.sum() >= 4


def test_held_gradients_are_never_overwritten():
    """A gradient someone still holds (gradient accumulation over --update-freq, a saved
    reference) keeps its values: the next backward adds to it or writes elsewhere."""
    torch.manual_seed(0)
    block = SMoEBlock(SMoEConfig(embed_dim=16, ffn_dim=32, strata=[2, 2])).train()
    x1, x2 = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    _step(block, x1, seed=1)
    g1 = _grads(block)
    _step(block, x2, seed=2)  # accumulation: no zero_grad
    acc = _grads(block)
    saved = block.experts.w1.grad  # a user's reference, then the gradients freed
    for p in block.parameters():
        p.grad = None
    _step(block, x2, seed=2)
    g2 = _grads(block)
    assert saved.data_ptr() != block.experts.w1.grad.data_ptr()
    assert torch.equal(saved, acc[0])
    for a, b, c in zip(acc, g1, g2):
        torch.testing.assert_close(a, b + c, rtol=0, atol=1e-6)


def test_fairseq_updates_same_with_and_without_reuse(dict_dir, monkeypatch):
    """Three updates of the tiny SMoE model through fairseq's own optimizer calls (zero_grad,
    which frees the gradients; in-place gradient clipping; Adam): the expert gradients live in
    the same memory every update, and the trained parameters equal, bit for bit, those of the
    same updates with reuse turned off."""
    from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig
    from omegaconf import OmegaConf
    from fairseq_smoe.modules import grad_reuse
    from tiny import build_tiny, toy_sample

    def train(reuse):
        if not reuse:
            monkeypatch.setattr(grad_reuse, "holders", lambda t: 2)  # never free: always new memory
        torch.manual_seed(0)
        task, model, crit = build_tiny(dict_dir, "--smoe-strata", "2,2", "--dropout", "0.1")
        model.train()
        opt = FairseqAdam(OmegaConf.structured(FairseqAdamConfig(lr=[1e-3], tpu=False)), list(model.parameters()))
        experts = [m for m in model.modules() if hasattr(m, "grad_buffers")]
        ptrs = []
        torch.manual_seed(1)
        for step in range(3):
            opt.zero_grad()
            loss, _, _ = crit(model, toy_sample(task, seed=step))
            opt.backward(loss)
            ptrs.append(tuple((m.w1.grad.data_ptr(), m.grad_buffers.kept[0].data_ptr()) for m in experts))
            opt.clip_grad_norm(0.1)
            opt.step()
        monkeypatch.undo()
        return ptrs, {n: p.detach().clone() for n, p in model.named_parameters()}

    ptrs, reused = train(True)
    _, fresh = train(False)
    # both blocks' .grad is the kept memory (autograd took it without a copy), every update
    assert len(ptrs[0]) == 2 and len(set(ptrs)) == 1 and all(g == k for g, k in ptrs[0])
    assert reused.keys() == fresh.keys()
    for name in reused:
        assert torch.equal(reused[name], fresh[name]), name
