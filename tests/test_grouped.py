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
