#!/usr/bin/env python
"""Two CPU effects behind scripts/benchmark_layer.py's numbers, measured in one run.

    python scripts/benchmark_cpu_gemm.py [--threads 1] [--reps 7] [--d 1024] [--ffn 4096] [--experts 16]

1. **Weight layout of one expert GEMM.** ``x [rows, d] @ W`` with W stored ``[in, out]`` (row-major
   ``[d, ffn]``: the experts' layout before fairseq-smoe stored them like nn.Linear) against
   ``[out, in]`` (``[ffn, d]``, used transposed: nn.Linear's and ours), for the expert rows of a
   pass at several sizes, both directions of the FFN (d -> ffn, ffn -> d).
2. **Fresh vs reused gradient memory.** Allocating and zeroing a tensor the size of one stacked
   expert-weight gradient ``[E, ffn, d]`` (what every training step would do, fairseq freeing the
   gradients between steps, without ``fairseq_smoe/modules/grad_reuse.py``) against zeroing one that
   already exists (what the reuse does), and the same for one expert's ``[ffn, d]``.

Times are the minimum over repetitions, the variants interleaved; ratios are from this run only.
"""

import argparse
import time

import torch


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--experts", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, min of {args.reps}")
    print("\n| GEMM | rows | W [in, out] ms | W [out, in] ms | [in, out] / [out, in] |\n|---|---|---|---|---|")
    for name, r, a, b in layout_rows(args.d, args.ffn, args.reps):
        print(f"| {name} | {r} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
    print("\n| tensor | MB | fresh (alloc + zero) ms | reused (zero) ms | fresh / reused |\n|---|---|---|---|---|")
    for shape, mb, a, b in memory_rows(args.d, args.ffn, args.experts, args.reps):
        print(f"| {list(shape)} | {mb:.0f} | {a:.1f} | {b:.1f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
