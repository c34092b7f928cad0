"""Grouped GEMMs over rows sorted by expert (fairseq_smoe/modules/grouped.py): both backends
against per-expert references, empty experts included, and the SMoE block on either backend."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import pytest
import torch

from fairseq_smoe.modules import SMoEBlock, SMoEConfig
from fairseq_smoe.modules.grouped import (
    backend_for,
    force_backend,
    grouped_linear,
    grouped_linear_t,
    grouped_weight_grad,
    per_expert,
)

COUNTS = [3, 0, 5, 1]  # expert 1 has no rows
CHUNKS = per_expert(COUNTS)


def data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    R, k, m = sum(COUNTS), 8, 4  # torch._grouped_mm wants 16-byte strides
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(R, k), mk(len(COUNTS), m, k), mk(len(COUNTS), m), mk(R, m)  # weights [out, in]


def per_expert(fn):
    """Concatenate ``fn(e, rows)`` over the experts' row spans."""
    out, start = [], 0
    for e, c in enumerate(COUNTS):
        out.append(fn(e, slice(start, start + c)))
        start += c
    return out


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_grouped_functions_equal_per_expert_gemms(backend):
    x, w, b, gy = data()
    counts_V = torch.tensor(COUNTS)
    with force_backend(backend):
        y = grouped_linear(x, w, CHUNKS, b, counts_V)
        y_nobias = grouped_linear(x, w, CHUNKS, None, counts_V)
        gx = grouped_linear_t(gy, w, CHUNKS, counts_V)
        gw, gb = torch.full_like(w, float("nan")), torch.full_like(b, float("nan"))
        gw[3], gb[3] = 1.0, 1.0  # expert 3 already has a gradient: added to
        fresh = [True, True, True, False]
        grouped_weight_grad(x, gy, CHUNKS, gw, gb, fresh, counts_V=counts_V)
    assert fresh == [False] * 4
    torch.testing.assert_close(y, torch.cat(per_expert(lambda e, r: x[r] @ w[e].t() + b[e])))
    torch.testing.assert_close(y_nobias, torch.cat(per_expert(lambda e, r: x[r] @ w[e].t())))
    torch.testing.assert_close(gx, torch.cat(per_expert(lambda e, r: gy[r] @ w[e])))
    want_w = torch.stack(per_expert(lambda e, r: gy[r].t() @ x[r]))
    want_b = torch.stack(per_expert(lambda e, r: gy[r].sum(0)))
    want_w[3] += 1.0
    want_b[3] += 1.0
    torch.testing.assert_close(gw, want_w)  # expert 1 (no rows, fresh): written 0, not NaN
    torch.testing.assert_close(gb, want_b)
    assert (gw[1] == 0).all() and (gb[1] == 0).all()


def test_default_backend_is_the_loop_on_cpu():
    counts_V = torch.tensor(COUNTS)
    assert backend_for(torch.zeros(2, 8), None, CHUNKS, counts_V) == "loop"
    assert backend_for(torch.zeros(2, 8, dtype=torch.bfloat16), None, CHUNKS, counts_V) == "loop"
    with force_backend("grouped"):
        assert backend_for(torch.zeros(2, 8), None, CHUNKS, counts_V) == "grouped"
        # several chunks per expert (expert parallelism: one per sender) always loop
        assert backend_for(torch.zeros(2, 8), None, [(0, 1), (1, 1), (0, 1)], None) == "loop"


def test_several_chunks_per_expert_accumulate():
    """As expert parallelism receives them: expert 0's rows from two senders, expert 1's between."""
    x, w, b, gy = data()
    chunks = [(0, 2), (1, 3), (0, 1), (1, 3)]  # 9 rows
    y = grouped_linear(x, w, chunks, b)
    want = torch.cat([x[0:2] @ w[0].t() + b[0], x[2:5] @ w[1].t() + b[1], x[5:6] @ w[0].t() + b[0],
                      x[6:9] @ w[1].t() + b[1]])
    torch.testing.assert_close(y, want)
    gw, gb = torch.zeros_like(w), torch.zeros_like(b)
    fresh = [True] * 4
    grouped_weight_grad(x, gy, chunks, gw, gb, fresh)
    rows0, rows1 = [0, 1, 5], [2, 3, 4, 6, 7, 8]
    torch.testing.assert_close(gw[0], gy[rows0].t() @ x[rows0])
    torch.testing.assert_close(gw[1], gy[rows1].t() @ x[rows1])
    torch.testing.assert_close(gb[1], gy[rows1].sum(0))
    assert fresh == [False, False, True, True]  # experts 2, 3 were not in the pass


@pytest.mark.parametrize("training", (True, False))
def test_block_gives_the_same_on_both_backends(training):
    """torch._grouped_mm (CPU fp32 here; on CUDA bf16 sm90+ by default) and the loop give the
    same block outputs and gradients."""
    results = []
    for backend in ("loop", "grouped"):
        torch.manual_seed(0)
        block = SMoEBlock(SMoEConfig(16, 32, (2, 2, 4), second_expert_policy="all")).train(training)
        x = torch.randn(13, 4, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with force_backend(backend):
            out, stats = block(x)
            (out.square().sum() + stats.aux_loss).backward()
        results.append((out.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}))
    (o1, g1, p1), (o2, g2, p2) = results
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(g2, g1)
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], msg=name)


# ----------------------------------------------------------------------------- issue 25


def chunks_of(counts):
    """One chunk per expert (grouped.per_expert; the name is this file's helper above)."""
    return list(enumerate(counts))


def test_grouped_bias_gradient_accumulates_in_fp32():
    """bf16 bias gradients of many rows: torch.segment_reduce summed in bf16 (4096 ones gave
    256); the grouped path's sum of 4096 ones is 4096 exactly, like the loop's."""
    counts = [4096, 0, 3]
    chunks, counts_V = chunks_of(counts), torch.tensor(counts)
    R, k, m = sum(counts), 8, 8
    x, g = torch.ones(R, k, dtype=torch.bfloat16), torch.ones(R, m, dtype=torch.bfloat16)
    for backend in ("loop", "grouped"):
        gw, gb = torch.full((3, m, k), float("nan"), dtype=torch.bfloat16), torch.full((3, m), float("nan"), dtype=torch.bfloat16)
        with force_backend(backend):
            grouped_weight_grad(x, g, chunks, gw, gb, [True] * 3, counts_V=counts_V)
        assert gb[0].tolist() == [4096.0] * m and gb[2].tolist() == [3.0] * m, backend
        assert (gw[0] == 4096).all() and (gb[1] == 0).all() and (gw[1] == 0).all(), backend


def _block_grads(dtype, backend):
    torch.manual_seed(0)
    block = SMoEBlock(SMoEConfig(64, 128, (2, 2), second_expert_policy="all", residual="paper")).to(dtype)
    x = torch.randn(128, 32, 64, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    # output gradients of mean 1: the bias gradients are sums of many terms of one sign
    gy = (torch.randn(128, 32, 64, generator=torch.Generator().manual_seed(2)) + 1).to(dtype)
    with force_backend(backend):
        out, _ = block(x)
        (out * gy).sum().backward()
    return {n: block.experts.get_parameter(n).grad.double() for n in ("b1", "b2")}


def test_block_bf16_bias_gradients_on_the_grouped_path_as_close_as_the_loops():
    """4096 tokens in bf16, grouped path forced on CPU: b1/b2 gradients as close to float64's
    as the addmm loop's (measured: loop 0.35% / 0.26%; grouped 0.37% / 0.26%, and 37% / 49%
    with segment_reduce's bf16 sum)."""
    ref = _block_grads(torch.float64, "loop")
    err = {b: {n: ((g[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref}
           for b, g in (("loop", _block_grads(torch.bfloat16, "loop")),
                        ("grouped", _block_grads(torch.bfloat16, "grouped")))}
    for n in ("b1", "b2"):
        assert err["loop"][n] < 0.01, err
        assert err["grouped"][n] <= max(1.5 * err["loop"][n], 0.005), err


# -- the gate: torch 2.13 runs its fast kernel on CUDA majors 9 and 10, not ROCm, in builds with it


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA build with the grouped kernel on a device of a chosen capability (counts queries)."""
    from fairseq_smoe.modules import grouped as G

    state = {"cap": (9, 0), "queries": 0, "kernel": True}

    def capability(device=None):
        state["queries"] += 1
        return state["cap"]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.version, "hip", None)
    real = torch._C._dispatch_has_kernel_for_dispatch_key
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                        lambda op, key: state["kernel"] if (op, key) == ("aten::_grouped_mm", "CUDA") else real(op, key))
    monkeypatch.setattr(G, "_FAST", {})
    return state


@pytest.mark.parametrize("cap,fast", [((9, 0), True), ((10, 0), True), ((10, 3), True), ((8, 0), False),
                                      ((8, 9), False), ((11, 0), False), ((12, 0), False), ((12, 1), False)])
def test_fast_kernel_gate_is_torchs(fake_cuda, cap, fast):
    from fairseq_smoe.modules.grouped import fast_grouped_mm

    fake_cuda["cap"] = cap
    assert fast_grouped_mm(torch.device("cuda", 0)) is fast
    assert fast_grouped_mm(torch.device("cpu")) is False


def test_fast_kernel_gate_excludes_rocm_and_builds_without_the_kernel(fake_cuda, monkeypatch):
    from fairseq_smoe.modules import grouped as G

    dev = torch.device("cuda", 0)
    assert G.fast_grouped_mm(dev)
    for patch in [lambda: monkeypatch.setattr(torch.version, "hip", "6.3.0"),  # MI300: 9.4
                  lambda: monkeypatch.setattr(torch.version, "cuda", "11.8"),  # no BUILD_GG_KERNEL
                  lambda: monkeypatch.setattr(torch.version, "cuda", None),
                  lambda: fake_cuda.update(kernel=False),
                  lambda: monkeypatch.setattr(G.sys, "platform", "win32")]:
        with monkeypatch.context() as m:
            m.setattr(G, "_FAST", {})
            saved = dict(fake_cuda)
            patch()
            fake_cuda["cap"] = (9, 4)
            assert not G.fast_grouped_mm(dev)
            fake_cuda.update(saved)
            monkeypatch.setattr(torch.version, "hip", None)
            monkeypatch.setattr(torch.version, "cuda", "12.8")
            monkeypatch.setattr(G.sys, "platform", "linux")
    G._FAST.clear()
    assert G.fast_grouped_mm(dev)


def test_fast_kernel_gate_is_decided_once_per_device(fake_cuda):
    from fairseq_smoe.modules.grouped import fast_grouped_mm

    for _ in range(5):
        fast_grouped_mm(torch.device("cuda", 0))
    assert fake_cuda["queries"] == 1
    fake_cuda["cap"] = (8, 0)
    assert not fast_grouped_mm(torch.device("cuda", 1))
    assert fast_grouped_mm(torch.device("cuda", 0)) and fake_cuda["queries"] == 2


def test_backend_for_takes_the_grouped_kernel_only_where_it_is_fast(monkeypatch):
    from fairseq_smoe.modules import grouped as G

    fast = {"on": True}
    monkeypatch.setattr(G, "fast_grouped_mm", lambda device: fast["on"])
    bf16 = dict(dtype=torch.bfloat16, device="meta")
    x, w, counts_V = torch.empty(9, 16, **bf16), torch.empty(4, 8, 16, **bf16), torch.empty(4, device="meta")
    assert backend_for(x, w, CHUNKS, counts_V) == "grouped"
    assert backend_for(x.float(), w.float(), CHUNKS, counts_V) == "loop"  # fast kernel: bf16 only
    assert backend_for(x, w.float(), CHUNKS, counts_V) == "loop"
    assert backend_for(torch.empty(9, 12, **bf16), w, CHUNKS, counts_V) == "loop"  # 24-byte rows
    assert backend_for(x, w, CHUNKS, None) == "loop"  # no device counts
    assert backend_for(x, w, [(0, 3), (1, 6), (0, 0)], counts_V) == "loop"  # not one per expert
    assert backend_for(x[:0], w, chunks_of([0, 0, 0, 0]), counts_V) == "loop"  # no rows at all
    many = chunks_of([1] * 1024)
    assert backend_for(torch.empty(1024, 16, **bf16), w, many, torch.empty(1024, device="meta")) == "loop"
    assert backend_for(torch.empty(1023, 16, **bf16), w, many[:1023], torch.empty(1023, device="meta")) == "grouped"
    fast["on"] = False  # sm 8.x / 11.x / 12.x, ROCm, a build without the kernel
    assert backend_for(x, w, CHUNKS, counts_V) == "loop"


# -- experts with no rows


def _spy_grouped_mm(monkeypatch, calls):
    """torch._grouped_mm that records its 2d x 2d calls' layouts and, as sm100's kernel may
    (pytorch#172439), writes garbage (NaN) for the empty groups."""
    real = torch._grouped_mm

    def spy(a, b, offs=None, **kw):
        out = real(a, b, offs=offs, **kw)
        if a.dim() == 2 and b.dim() == 3:  # rows ragged: the rows row-major, any group size
            calls.append(("2d x 3d", a.stride(-1) == 1))
        if a.dim() == 2 and b.dim() == 2:
            calls.append((a.stride(-1) == 1, b.stride(-1) == 1))
            ends = offs.tolist()
            starts = [0] + ends[:-1]
            for e, (s, t) in enumerate(zip(starts, ends)):
                if s == t:
                    out[e] = float("nan")
        return out

    monkeypatch.setattr(torch, "_grouped_mm", spy)


@pytest.mark.parametrize("transposed", (False, True))
def test_weight_grad_empty_experts_get_exact_zeros_in_the_only_layout_that_allows_them(monkeypatch, transposed):
    """Empty groups reach the 2d x 2d (weight-gradient) kernel only as (column-major, row-major),
    the layout torch's kernel accepts them in; an idle fresh expert's gradient is exactly 0
    (NaN before), an idle expert with a gradient keeps it, whatever the kernel wrote."""
    calls = []
    _spy_grouped_mm(monkeypatch, calls)
    x, _, _, gy = data()
    if transposed:  # an output gradient that arrives column-major
        gy = gy.t().contiguous().t()
    counts = [3, 0, 5, 1, 0]
    x5 = torch.cat([x, x[:0]])
    gw, gb = torch.full((5, 4, 8), float("nan")), torch.full((5, 4), float("nan"))
    gw[4], gb[4] = 2.0, 2.0  # idle, already has a gradient
    fresh = [True, True, True, True, False]
    with force_backend("grouped"):
        grouped_weight_grad(x5, gy, chunks_of(counts), gw, gb, fresh, counts_V=torch.tensor(counts))
    assert calls and all(c == (False, True) for c in calls), calls
    assert fresh == [False] * 5
    assert (gw[1] == 0).all() and (gb[1] == 0).all()
    assert (gw[4] == 2).all() and (gb[4] == 2).all()
    rows = [slice(0, 3), None, slice(3, 8), slice(8, 9)]
    for e in (0, 2, 3):
        torch.testing.assert_close(gw[e], gy[rows[e]].t() @ x[rows[e]])
        torch.testing.assert_close(gb[e], gy[rows[e]].sum(0))


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_block_idle_experts_weight_gradients_are_exactly_zero(monkeypatch, backend):
    """A block whose experts partly get no rows, its gradient memory pre-filled with NaN (the
    pooled buffers may hold anything): every idle expert's w/b gradients are exactly 0."""
    from fairseq_smoe.modules import grad_reuse

    real_like = grad_reuse.GradBuffers.like
    monkeypatch.setattr(grad_reuse.GradBuffers, "like",
                        lambda self, params: [t.fill_(float("nan")) for t in real_like(self, params)])
    calls = []
    _spy_grouped_mm(monkeypatch, calls)
    torch.manual_seed(0)
    block = SMoEBlock(SMoEConfig(16, 32, (8, 8), second_expert_policy="all"))
    x = torch.randn(3, 1, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with force_backend(backend):
        out, stats = block(x)
        out.square().sum().backward()
    idle = torch.tensor(stats.expert_rows) == 0
    assert idle.sum() >= 4  # 3 tokens, 2 experts per pass: most of the 16 experts are idle
    for n in ("w1", "b1", "w2", "b2"):
        grad = block.experts.get_parameter(n).grad
        assert (grad[idle] == 0).all(), n
        assert torch.isfinite(grad).all() and (grad[~idle].flatten(1) != 0).any(1).all(), n
    if backend == "grouped":
        assert calls


def test_rows_ragged_calls_get_row_major_rows(monkeypatch):
    """Forward and input gradient (2d x 3d): rows given column-major reach the kernel row-major
    (column-major, torch asserts every group's rows 16-byte aligned, which odd groups are not)."""
    calls = []
    _spy_grouped_mm(monkeypatch, calls)
    x, w, b, gy = data()
    counts_V = torch.tensor(COUNTS)
    x_cm, gy_cm = x.t().contiguous().t(), gy.t().contiguous().t()
    with force_backend("grouped"):
        y = grouped_linear(x_cm, w, CHUNKS, b, counts_V)
        gx = grouped_linear_t(gy_cm, w, CHUNKS, counts_V)
    assert calls == [("2d x 3d", True), ("2d x 3d", True)]
    torch.testing.assert_close(y, torch.cat(per_expert(lambda e, r: x[r] @ w[e].t() + b[e])))
    torch.testing.assert_close(gx, torch.cat(per_expert(lambda e, r: gy[r] @ w[e])))
