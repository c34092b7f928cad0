#!/usr/bin/env python
"""Expert parallelism vs data parallelism for the experts of an SMoE block, 2 gloo ranks on CPU.

    PYTHONPATH=. python scripts/benchmark_ep.py [--quick] [--json] [--configs m4-4-4,m15-4-12]
                                                [--tokens N] [--reps N] [--rounds N]

One update of one SMoE block in training mode (forward, backward of the output and the balance
loss, gradient synchronisation, Adam step), each rank with its own ``--tokens`` tokens (64 per
sentence, dropout 0, the deterministic ``all`` second expert, the block's random router):

* ``dp``: every rank holds all E experts; after backward every gradient (experts and routers)
  is all-reduced in one flat buffer, as fairseq's legacy_ddp does;
* ``ep``: ``--moe-expert-parallel``'s layout, E/2 experts per rank; the kept expert rows travel
  by ``all_to_all_single`` (forward: rows out, outputs back; backward: the same two), one small
  ``all_gather`` of counts per pass; only the routers' gradients are all-reduced.

Measured per rank and update: bytes it sends, counted two ways (by wrapping the collectives:
payload to other ranks, ring all-reduce ``2 (W-1)/W x size``; and on the wire, the growth of
``wchar`` in ``/proc/self/io``, every byte gloo writes to its sockets), the update's wall time
(median over ``--reps`` after a warm-up, in ``--rounds`` rounds alternating dp and ep process
pairs so machine noise hits both), peak resident memory of the rank (``ru_maxrss``) and its
growth from just before the block was built, and the expert state per rank (weights, gradients,
Adam's two moments). Passes per token and dropped assignments are reported to plug into the
formula printed with the table. Ratios are from the same run.
"""

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fairseq_smoe import errors  # noqa: E402
from fairseq_smoe.modules import SMoEBlock, SMoEConfig  # noqa: E402
from fairseq_smoe.modules.expert_parallel import ExpertParallel  # noqa: E402

CONFIGS = {  # name: (embed dim, FFN dim, strata); the paper's M4 and M15 sizes
    "m4-4-4": (512, 2048, (4, 4)),
    "m4-2-2-2-2": (512, 2048, (2, 2, 2, 2)),
    "m15-4-12": (1024, 4096, (4, 12)),
    "m15-4-4-4-4": (1024, 4096, (4, 4, 4, 4)),
}
BLOCKS = {"m4": 6, "m15": 6}  # SMoE blocks per model: --moe-freq 2 over 6+6 layers
WORLD = 2
SENTENCE = 64


def wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar"):
                return int(line.split()[1])
    return 0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Counter:
    """Bytes this rank sends, by collective (wrapping torch.distributed's functions)."""

    def __init__(self):
        self.bytes, self.calls = {}, {}

    def add(self, op, n):
        self.bytes[op] = self.bytes.get(op, 0) + int(n)
        self.calls[op] = self.calls.get(op, 0) + 1

    def reset(self):
        self.bytes, self.calls = {}, {}

    def install(self):
        def size(group):
            return dist.get_world_size(group)

        a2a, gather, reduce = dist.all_to_all_single, dist.all_gather, dist.all_reduce

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
            row = input[0].numel() * input.element_size() if input.dim() and input.size(0) else 0
            me = dist.get_rank(group)
            if input_split_sizes is None:
                sent = input.numel() * input.element_size() * (size(group) - 1) // size(group)
            else:
                sent = (sum(input_split_sizes) - input_split_sizes[me]) * row
            self.add("all_to_all_single", sent)
            return a2a(output, input, output_split_sizes, input_split_sizes, group=group, **kw)

        def all_gather(tensor_list, tensor, group=None, **kw):
            self.add("all_gather", tensor.numel() * tensor.element_size() * (size(group) - 1))
            return gather(tensor_list, tensor, group=group, **kw)

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, **kw):
            w = size(group)
            self.add("all_reduce", 2 * (w - 1) * tensor.numel() * tensor.element_size() // w)
            return reduce(tensor, op=op, group=group, **kw)

        dist.all_to_all_single, dist.all_gather, dist.all_reduce = all_to_all_single, all_gather, all_reduce


def sync_grads(block, mode):
    """legacy_ddp: one flat all-reduce of the gradients it does not skip, then the average."""
    grads = [p.grad for p in block.parameters() if p.grad is not None and (mode == "dp" or not hasattr(p, "expert"))]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(WORLD)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def worker(rank, port, name, mode, tokens, reps, warmup, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    counter = Counter()
    counter.install()
    d, f, strata = CONFIGS[name]
    cfg = SMoEConfig(d, f, strata, second_expert_policy="all")
    before = rss_mb()
    torch.manual_seed(0)
    ep = ExpertParallel.for_job(cfg.num_experts) if mode == "ep" else None
    block = SMoEBlock(cfg, ep).train()
    opt = torch.optim.Adam(block.parameters(), lr=1e-4)
    expert_params = sum(p.numel() for n, p in block.named_parameters() if n.startswith("experts."))
    g = torch.Generator().manual_seed(100 + rank)  # every rank its own tokens
    B = max(1, tokens // SENTENCE)
    x = torch.randn(SENTENCE, B, d, generator=g)
    gy = torch.randn(SENTENCE, B, d, generator=g)
    pad = torch.zeros(B, SENTENCE, dtype=torch.bool)
    times, counted, wire, passes, dropped = [], [], [], [], []
    for i in range(warmup + reps):
        dist.barrier()
        counter.reset()
        w0, t0 = wchar(), time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out, st = block(x, pad)
        ((out * gy).sum() / out.numel() + st.aux_loss).backward()
        sync_grads(block, mode)
        opt.step()
        t1, w1 = time.perf_counter(), wchar()
        if i >= warmup:
            times.append(t1 - t0)
            counted.append(dict(counter.bytes))
            wire.append(w1 - w0)
            passes.append(st.passes_TB.float().mean().item())
            dropped.append(st.dropped / max(1, st.assigned))
    calls = dict(counter.calls)
    result = {
        "config": name, "mode": mode, "rank": rank, "tokens": B * SENTENCE, "times": times,
        "counted": counted, "calls": calls, "wire": wire, "passes": statistics.mean(passes),
        "dropped": statistics.mean(dropped), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": before, "expert_params": expert_params,
        "expert_state_mb": 4 * expert_params * 4 / 2**20,  # fp32 weights, grads, exp_avg, exp_avg_sq
    }
    with open(out_path.format(rank), "w") as fh:
        json.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(name, mode, tokens, reps, warmup, tmp):
    out_path = os.path.join(tmp, f"{name}-{mode}-{{}}.json")
    mp.spawn(worker, args=(free_port(), name, mode, tokens, reps, warmup, out_path), nprocs=WORLD, join=True)
    results = []
    for r in range(WORLD):
        with open(out_path.format(r)) as fh:
            results.append(json.load(fh))
    return results


def formula(name, tokens, passes, dropped):
    """Predicted bytes each rank sends per update, fp32 (see the module doc and docs/scale.md, "Expert or data parallelism?")."""
    d, f, strata = CONFIGS[name]
    E = sum(strata)
    P_E = E * (2 * d * f + d + f)
    dp = 2 * (WORLD - 1) / WORLD * 4 * P_E
    rows = 2 * tokens * passes * (1 - dropped)  # kept assignments (top-2 per pass)
    ep = 4 * rows * (WORLD - 1) / WORLD * d * 4  # 4 exchanges, the share owned by the other rank
    return dp, ep


def summarize(name, pairs):
    """Median over ranks and reps of each mode's measurements."""
    out = {}
    for mode in ("dp", "ep"):
        rs = [r for pair in pairs[mode] for r in pair]
        counted = [sum(c.values()) for r in rs for c in r["counted"]]
        out[mode] = {
            "ms": 1000 * statistics.median(t for r in rs for t in r["times"]),
            "ms_range": [1000 * min(t for r in rs for t in r["times"]), 1000 * max(t for r in rs for t in r["times"])],
            "counted_mb": statistics.median(counted) / 2**20,
            "wire_mb": statistics.median(w for r in rs for w in r["wire"]) / 2**20,
            "by_op_mb": {op: statistics.median(c.get(op, 0) for r in rs for c in r["counted"]) / 2**20
                         for op in sorted({op for r in rs for c in r["counted"] for op in c})},
            "calls": rs[0]["calls"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "rss_growth_mb": max(r["peak_rss_mb"] - r["rss_before_mb"] for r in rs),
            "expert_state_mb": rs[0]["expert_state_mb"],
            "passes": statistics.mean(r["passes"] for r in rs),
            "dropped": statistics.mean(r["dropped"] for r in rs),
            "tokens": rs[0]["tokens"],
        }
    ep = out["ep"]
    out["formula_dp_mb"], out["formula_ep_mb"] = (b / 2**20 for b in formula(name, ep["tokens"], ep["passes"], ep["dropped"]))
    out["blocks_per_model"] = BLOCKS[name.split("-")[0]]
    return out


def table(results) -> str:
    rows = ["| config | tokens/rank | mode | sent MiB/update (counted) | on the wire MiB | formula MiB | "
            "update ms (min-max) | peak RSS MiB | RSS growth MiB | expert state MiB/rank |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for mode in ("dp", "ep"):
            m = r[mode]
            rows.append(f"| {name} | {m['tokens']} | {mode} | {m['counted_mb']:.1f} | {m['wire_mb']:.1f} | "
                        f"{r['formula_' + mode + '_mb']:.1f} | {m['ms']:.0f} ({m['ms_range'][0]:.0f}-"
                        f"{m['ms_range'][1]:.0f}) | {m['peak_rss_mb']:.0f} | "
                        f"{m['rss_growth_mb']:.0f} | {m['expert_state_mb']:.0f} |")
    rows.append("")
    rows.append("| config | dp/ep bytes | ep/dp update time | passes/token | dropped | ep bytes by collective (MiB) |")
    rows.append("|---|---|---|---|---|---|")
    for name, r in results.items():
        ops = ", ".join(f"{op} {mb:.2f}" for op, mb in r["ep"]["by_op_mb"].items())
        rows.append(f"| {name} | {r['dp']['wire_mb'] / r['ep']['wire_mb']:.2f} | {r['ep']['ms'] / r['dp']['ms']:.2f} | "
                    f"{r['ep']['passes']:.3f} | {r['ep']['dropped']:.3f} | {ops} |")
    return "\n".join(rows)


@errors.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="m4-4-4,m15-4-12")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank (default 4096, the recipes' --max-tokens)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="dp/ep process pairs per config, alternating")
    p.add_argument("--quick", action="store_true", help="512 tokens, 1 round: a smoke run")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.rounds, a.reps = 512, 1, 1
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.configs.split(","):
            if name not in CONFIGS:
                p.error(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
            pairs = {"dp": [], "ep": []}
            for _ in range(a.rounds):
                for mode in ("dp", "ep"):
                    pairs[mode].append(run_pair(name, mode, a.tokens, a.reps, a.warmup, tmp))
                    print(f"{name} {mode}: done", file=sys.stderr, flush=True)
            results[name] = summarize(name, pairs)
    if a.json:
        print(json.dumps(results, indent=1))
    else:
        print(table(results))
    return results


if __name__ == "__main__":
    main()
