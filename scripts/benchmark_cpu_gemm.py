#!/usr/bin/env python
"""Three CPU effects behind scripts/benchmark_layer.py's numbers, measured in one run.

    python scripts/benchmark_cpu_gemm.py [--threads 1] [--reps 7] [--d 1024] [--ffn 4096] [--experts 16]
        [--prepack-only] [--rows 1,4,8,21,48,64,128,256,512]

1. **Weight layout of one expert GEMM.** ``x [rows, d] @ W`` with W stored ``[in, out]`` (row-major
   ``[d, ffn]``: the experts' layout before fairseq-smoe stored them like nn.Linear) against
   ``[out, in]`` (``[ffn, d]``, used transposed: nn.Linear's and ours), for the expert rows of a
   pass at several sizes, both directions of the FFN (d -> ffn, ffn -> d).
2. **Fresh vs reused gradient memory.** Allocating and zeroing a tensor the size of one stacked
   expert-weight gradient ``[E, ffn, d]`` (what every training step would do, fairseq freeing the
   gradients between steps, without ``fairseq_smoe/modules/grad_reuse.py``) against zeroing one that
   already exists (what the reuse does), and the same for one expert's ``[ffn, d]``.
3. **Weight repacking at every GEMM.** One expert GEMM with bias, ``addmm`` (MKL, which repacks
   its weight operand at every call, a cost of the weight's size whatever the rows) against
   oneDNN's linear over the weight reordered once ahead of time
   (``torch.ops.mkldnn._reorder_linear_weight``), both directions, over ``--rows``: how much of a
   few-row expert GEMM is that repacking. (A prepacked copy for CPU inference was built on it,
   measured end to end, and not kept: docs/performance.md, "Tried and dropped".)

Times are the minimum over repetitions, the variants interleaved; ratios are from this run only.
"""

import argparse
import time

import torch

from fairseq_smoe import errors


def timed(fns, reps):
    """{name: min seconds} over ``reps`` interleaved rounds after one warm-up call each."""
    for f in fns.values():
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def layout_rows(d, ffn, reps, rows=(21, 64, 170, 512, 1024)):
    out = []
    for k, m in ((d, ffn), (ffn, d)):
        w_in_out = torch.randn(k, m)
        w_out_in = w_in_out.t().contiguous()
        for r in rows:
            x, y = torch.randn(r, k), torch.empty(r, m)
            torch.testing.assert_close(x @ w_in_out, x @ w_out_in.t())  # one product, two layouts
            t = timed({"in_out": lambda: torch.mm(x, w_in_out, out=y),
                       "out_in": lambda: torch.mm(x, w_out_in.t(), out=y)}, reps)
            out.append((f"{k} -> {m}", r, 1000 * t["in_out"], 1000 * t["out_in"]))
    return out


def memory_rows(d, ffn, experts, reps):
    out = []
    for shape in ((experts, ffn, d), (ffn, d)):
        kept = torch.empty(shape)
        t = timed({"fresh": lambda: torch.empty(shape).zero_(), "reused": lambda: kept.zero_()}, reps)
        out.append((shape, kept.numel() * 4 / 2**20, 1000 * t["fresh"], 1000 * t["reused"]))
    return out


def has_onednn_linear() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def prepacked_rows(d, ffn, reps, rows):
    out = []
    for k, m in ((d, ffn), (ffn, d)):
        w, b = torch.randn(m, k) / k ** 0.5, torch.randn(m)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_size=64)

        def onednn():
            return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")

        for r in rows:
            x, y = torch.randn(r, k), torch.empty(r, m)
            torch.testing.assert_close(onednn(), torch.addmm(b, x, w.t()))  # the same product
            t = timed({"addmm": lambda: torch.addmm(b, x, w.t(), out=y), "packed": onednn}, reps)
            out.append((f"{k} -> {m}", r, 1000 * t["addmm"], 1000 * t["packed"]))
    return out


@errors.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--rows", default="1,4,8,21,48,64,128,256,512", help="expert rows of the third table")
    p.add_argument("--prepack-only", action="store_true", help="only the third table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, min of {args.reps}")
    if not args.prepack_only:
        print("\n| GEMM | rows | W [in, out] ms | W [out, in] ms | [in, out] / [out, in] |\n|---|---|---|---|---|")
        for name, r, a, b in layout_rows(args.d, args.ffn, args.reps):
            print(f"| {name} | {r} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
        print("\n| tensor | MB | fresh (alloc + zero) ms | reused (zero) ms | fresh / reused |\n|---|---|---|---|---|")
        for shape, mb, a, b in memory_rows(args.d, args.ffn, args.experts, args.reps):
            print(f"| {list(shape)} | {mb:.0f} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    if not has_onednn_linear():
        print("\n(no oneDNN linear in this torch build: no repacking table)")
        return
    print("\n| GEMM | rows | addmm ms | prepacked (oneDNN) ms | addmm / prepacked |\n|---|---|---|---|---|")
    for name, r, a, b in prepacked_rows(args.d, args.ffn, args.reps, [int(r) for r in args.rows.split(",")]):
        print(f"| {name} | {r} | {a:.3f} | {b:.3f} | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
