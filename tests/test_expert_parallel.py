"""Expert parallelism (fairseq_smoe/modules/expert_parallel.py): the layout rules, and the SMoE
block on 2 gloo processes against one process that sees both ranks' inputs."""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fairseq_smoe.modules import SMoEBlock, SMoEConfig
from fairseq_smoe.modules.expert_parallel import (
    ExpertParallel,
    ep_layout,
    received_chunks,
    split_sizes,
    valid_world_sizes,
)

D, FFN, T, B = 8, 16, 7, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- layout


def test_layout_splits_or_replicates_experts():
    # W divides E: one group of all ranks, E/W consecutive experts each
    lay = [ep_layout(8, 4, r) for r in range(4)]
    assert [l.local_experts for l in lay] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert all(l.group_ranks == (0, 1, 2, 3) and l.replica_ranks == (l.rank,) for l in lay)
    assert [lay[0].owner(e) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    # E divides W: groups of E ranks each holding every expert once; W/E replicas per expert
    lay = [ep_layout(2, 4, r) for r in range(4)]
    assert [l.group_ranks for l in lay] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [l.local_experts for l in lay] == [(0, 1), (1, 2), (0, 1), (1, 2)]
    assert [l.replica_ranks for l in lay] == [(0, 2), (1, 3), (0, 2), (1, 3)]


def test_layout_refuses_world_sizes_that_fit_neither_way():
    with pytest.raises(ValueError) as err:
        ep_layout(12, 8, 0)
    msg = str(err.value)
    assert "12 experts and 8 ranks" in msg and "1, 2, 3, 4, 6, 12" in msg
    assert valid_world_sizes(4, up_to=16) == [1, 2, 4, 8, 12, 16]


def test_split_sizes_and_received_chunks():
    # 8 experts on 4 ranks; a pass sees experts 2..7 (first = 2)
    lay = ep_layout(8, 4, 1)  # holds experts 2, 3
    assert split_sizes([1, 2, 3, 4, 5, 6], 2, lay) == [0, 3, 7, 11]
    peers = [[1, 0, 0, 0, 0, 0], [2, 5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [4, 4, 0, 0, 0, 0]]
    # from each sender: its rows of local experts 0 (global 2) and 1 (global 3)
    assert received_chunks(peers, 2, lay) == [(0, 1), (1, 0), (0, 2), (1, 5), (0, 0), (1, 0), (0, 4), (1, 4)]
    # a pass that sees none of this rank's experts: it receives nothing
    assert received_chunks(peers, 4, lay) == []


def test_one_process_is_not_expert_parallel():
    assert ExpertParallel.for_job(8) is None  # no process group: every expert is local


# ----------------------------------------------------------------------------- block, 2 ranks

CASES = {
    "2-2 train": dict(strata=(2, 2), training=True),
    "4-4 eval": dict(strata=(4, 4), training=False),
    "1-1-2 train top1": dict(strata=(1, 1, 2), training=True, top1=True),
    "one stratum, replicated (E=1 < W=2)": dict(strata=(1,), training=True),
    "rank 1 all padding": dict(strata=(2, 2), training=True, pad_rank1=True),
}


def make_case(case):
    kw = {k: v for k, v in case.items() if k not in ("strata", "training", "pad_rank1")}
    cfg = SMoEConfig(D, FFN, case["strata"], second_expert_policy="all", **kw)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(T, B, D, generator=g, dtype=torch.float64) for _ in range(2)]
    gys = [torch.randn(T, B, D, generator=g, dtype=torch.float64) for _ in range(2)]
    pads = [torch.zeros(B, T, dtype=torch.bool) for _ in range(2)]
    pads[0][1, 5:] = True
    if case.get("pad_rank1"):
        pads[1][:] = True
    return cfg, xs, gys, pads


def run_block(block, x, gy, pad):
    x = x.clone().requires_grad_()
    out, st = block(x, pad)
    ((out * gy).sum() + st.aux_loss).backward()
    return out.detach(), x.grad, st


def _worker(rank, port, name, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    case = CASES[name]
    cfg, xs, gys, pads = make_case(case)
    torch.manual_seed(0)
    ep = ExpertParallel.for_job(cfg.num_experts)
    block = SMoEBlock(cfg, ep).double().train(case["training"])
    out, gx, st = run_block(block, xs[rank], gys[rank], pads[rank])
    torch.save({
        "out": out, "gx": gx, "passes": st.passes_TB, "dropped": st.dropped, "assigned": st.assigned,
        "aux": st.aux_loss.detach(), "local": block.experts.local_range,
        "grads": {n: p.grad.clone() for n, p in block.named_parameters()},
        "weights": {n: p.detach().clone() for n, p in block.named_parameters()},
    }, out_path.format(rank))
    dist.destroy_process_group()


@pytest.mark.parametrize("name", list(CASES))
def test_block_on_two_ranks_equals_one_process(name, tmp_path):
    """Each rank's outputs, passes, drops and balance loss are the one-process block's on that
    rank's input; the data-parallel parameters' gradients summed over the ranks, and each
    expert's gradient times W (the trainer's scaling; see expert_parallel.py), are the
    one-process gradients accumulated over both inputs; the experts are initialised as one
    process would."""
    case = CASES[name]
    out_path = str(tmp_path / "rank{}.pt")
    mp.spawn(_worker, args=(free_port(), name, out_path), nprocs=2, join=True)
    ranks = [torch.load(out_path.format(r), weights_only=True) for r in range(2)]

    cfg, xs, gys, pads = make_case(case)
    torch.manual_seed(0)
    ref = SMoEBlock(cfg).double().train(case["training"])
    expected = [run_block(ref, xs[r], gys[r], pads[r]) for r in range(2)]  # grads accumulate
    for r, (out, gx, st) in enumerate(expected):
        got = ranks[r]
        torch.testing.assert_close(got["out"], out, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(got["gx"], gx, atol=1e-12, rtol=1e-10)
        assert torch.equal(got["passes"], st.passes_TB)
        assert (got["dropped"], got["assigned"]) == (st.dropped, st.assigned)
        assert got["aux"].item() == pytest.approx(st.aux_loss.item(), abs=1e-12)
    assert case["training"] is False or sum(r["dropped"] for r in ranks) > 0 or case.get("pad_rank1") \
        or cfg.num_strata == 1
    for name_, p in ref.named_parameters():
        if name_.startswith("experts."):
            for got in ranks:
                lo, hi = got["local"]
                torch.testing.assert_close(got["weights"][name_], p.detach()[lo:hi], atol=0, rtol=0)
                torch.testing.assert_close(2 * got["grads"][name_], p.grad[lo:hi], atol=1e-12, rtol=1e-10,
                                           msg=name_)
        else:
            total = ranks[0]["grads"][name_] + ranks[1]["grads"][name_]
            torch.testing.assert_close(total, p.grad, atol=1e-12, rtol=1e-10, msg=name_)
