#!/usr/bin/env python
"""Benchmark one SMoE block against its compute floor and against fairseq's one-hot dispatch.

    python scripts/benchmark_layer.py [--device cpu|cuda] [--json] [--quick]
                                      [--tokens N] [--reps N] [--configs m4-4-4,...]
                                      [--threads N] [--skews balanced,zipf,two]
                                      [--phases train,eval] [--dtypes fp32,bf16,fp16]

For each configuration (M4 size: d 512, FFN 2048, 8 experts in strata 4-4 and 2-2-2-2; M15
size: d 1024, FFN 4096, 16 experts in strata 4-12 and 4-4-4-4), routing skew (``balanced``: the
random router; ``zipf``: every router's logits offset by -2 log(rank), so the busiest expert
gets several times its share; ``two``: every token's top-2 are its router's first two
experts) and phase (``train``: capacity applies, modes ``fwd``: forward with autograd off and
``fwd_bwd``: forward + backward of the output and the balance loss; ``eval``: no capacity,
``fwd``), with dropout 0 and the deterministic ``all`` second-expert policy, it times these
variants on the same input and the same routing decisions:

* ``ours``: ``SMoEBlock`` (fairseq_smoe/modules/smoe_block.py);
* ``floor``: one dense FFN d -> FFN -> d (the experts' shape: ``nn.Linear``, in-place
  ``nn.ReLU``, ``nn.Linear``) over as many rows as the expert assignments ``ours`` actually
  computed (kept after capacity, summed over strata passes): the expert GEMMs alone, with no
  routing, dispatch or combine;
* ``experts``: the same rows already sorted by expert, each expert's GEMMs on its own rows with
  its own weights (one ``nn.Linear`` pair per expert, a Python loop over experts): what any MoE
  must compute, routing excluded. At small batches it is well above ``floor``, because every
  expert's weights are read for few rows (``floor`` reads one FFN's); ``ours/experts`` is then
  the cost of routing, dispatch and combine;
* ``passes``: the same rows split by strata pass, each pass running each of its experts over the
  rows it computed at that pass (the expert modules of ``experts``, so an expert reached at two
  passes runs twice with the same weights): what SMoE itself must compute, as a token's later
  pass needs its earlier one's output, routing excluded. ``passes/experts`` is what running the
  strata one after the other costs, ``ours/passes`` what routing, dispatch and combine add;
* ``onehot``: the same stratified block with the classic GShard dispatch of fairseq's MoE
  branch: per pass, a one-hot combine tensor of shape (tokens, experts, capacity) built from
  the gate weights (so the gate gradient flows through it), einsum dispatch and combine.

``per_row_over_balanced`` is ours' time per computed expert row over the balanced case's (same
config, phase and mode): 1.0 = skew costs nothing beyond the rows it adds. Timings are medians
over repetitions after a warm-up; the variants are interleaved (in
rotating order) so that machine noise hits them alike, and only ratios measured in the same
run are reported. ``--dtypes`` repeats every case with the block, its input and the floor's
modules cast to each dtype (a ``--fp16``-style model: the routers still compute in fp32; on
CUDA bf16 on sm 9.x/10.x takes ``torch._grouped_mm``, see modules/grouped.py). On CUDA every
timed call is bracketed by ``torch.cuda.synchronize``, so a time is the kernels' and not their
launch. Peak memory is the peak of the bytes allocated during one call (forward, or
forward + backward, whose weight gradients it includes), beyond what was allocated before
it: on CUDA from the allocator's statistics, on CPU by tracking every tensor storage created
during the call. The input is 32 sentences (batch-major slot priority) of tokens/32 tokens.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fairseq_smoe import errors  # noqa: E402
from fairseq_smoe.modules import SMoEBlock, SMoEConfig  # noqa: E402
from fairseq_smoe.modules.routing import balance_loss, expert_capacity, select_experts  # noqa: E402
from fairseq_smoe.modules.stats import BlockStats  # noqa: E402

CONFIGS = {  # name: (embed dim, FFN dim, strata[, FFN width per stratum])
    "m4-4-4": (512, 2048, (4, 4)),
    "m4-2-2-2-2": (512, 2048, (2, 2, 2, 2)),
    "m15-4-12": (1024, 4096, (4, 12)),
    "m15-4-4-4-4": (1024, 4096, (4, 4, 4, 4)),
    # strata of different widths, same parameters as m4-4-4 (--smoe-strata-ffn 1024,3072)
    "m4-4-4-w1024-3072": (512, 2048, (4, 4), (1024, 3072)),
}
MODES = ("fwd", "fwd_bwd")
VARIANTS = ("ours", "floor", "experts", "passes", "onehot")
FLOORS = ("floor", "experts", "passes")  # timed only: no peak memory, no routing


# ----------------------------------------------------------------------------- one-hot baseline


def onehot_smoe_forward(block: SMoEBlock, x_TBd: Tensor, padding_mask_BT: Tensor = None):
    """``block``'s forward with fairseq's GShard one-hot dispatch (peers §1.3, spec §1.4-§1.8).

    Same parameters, routing, capacity, slot order, renormalisation, residual modes and
    statistics (returned as ``(output, BlockStats)``) as ``SMoEBlock`` (no EoM); only the
    dispatch and combine differ. Like the
    official code with ``--only-compute-current-layer-tokens 1``, each pass gathers the tokens
    at the current stratum (S rows, in batch-major order, which is the slot priority), then:
    combine weights (S, V, C) = gate * one-hot(expert) * one-hot(slot) for each choice, summed;
    dispatch mask = combine.bool(); expert inputs = einsum("sec,sm->ecm", dispatch, u); output
    = einsum("sec,ecm->sm", combine, expert outputs).
    """
    cfg = block.cfg
    assert cfg.eom == 0.0, "the one-hot baseline has no EoM"
    T, B, d = x_TBd.shape
    N = T * B
    x_Nd = x_TBd.reshape(N, d)
    dev = x_Nd.device
    if padding_mask_BT is None or cfg.route_padding:
        routed_N = torch.ones(N, dtype=torch.bool, device=dev)
    else:
        routed_N = ~padding_mask_BT.t().reshape(N)
    bmajor_N = torch.arange(N, device=dev).view(T, B).t().reshape(N)  # batch-major token ids
    L = cfg.num_strata
    state_N = torch.where(routed_N, 0, L)
    passes_N = torch.zeros(N, dtype=torch.long, device=dev)
    aux_sum = x_Nd.new_zeros((), dtype=torch.float32)
    dropped = assigned = 0
    num_passes = 0
    for c in range(L):
        idx_S = bmajor_N[(state_N == c)[bmajor_N]]  # host sync (nonzero), as fairseq's gather
        S = idx_S.numel()
        if S == 0:
            continue
        num_passes += 1
        first, V = cfg.first_expert(c), cfg.visible_experts(c)
        xs_Sd = x_Nd.index_select(0, idx_S)
        u_Sd = block.pre_norm(c)(xs_Sd)
        logits = block.router_logits(c, u_Sd)
        noisy = block.training or cfg.inference_noise
        probs_SV, experts_KS, gates_KS, keep_KS = select_experts(
            logits, cfg.k, cfg.second_expert_policy, noisy
        )
        K = experts_KS.size(0)
        cap = expert_capacity(
            S, V, K, training=block.training, capacity_factor=cfg.capacity_factor,
            eval_fraction=cfg.eval_capacity_token_fraction,
        )
        C = S if cap is None else cap
        masks, locs = [], []
        offset = torch.zeros(V, dtype=torch.long, device=dev)
        for k in range(K):  # top-1 slots first, top-2 slots offset by the top-1 counts
            mask_SV = F.one_hot(experts_KS[k], V) * keep_KS[k].long().unsqueeze(1)
            loc_SV = torch.cumsum(mask_SV, 0) - 1 + offset
            offset = offset + mask_SV.sum(0)
            masks.append(mask_SV)
            locs.append(loc_SV)
        kept = [m * (l < C) for m, l in zip(masks, locs)]
        assigned += int(sum(m.sum() for m in masks))
        dropped += int(sum(m.sum() - km.sum() for m, km in zip(masks, kept)))
        gates = [(probs_SV * km).sum(1) for km in kept]  # differentiable w.r.t. the router
        if K == 2:
            denom = (gates[0] + gates[1]).clamp_min(torch.finfo(probs_SV.dtype).eps)
            gates = [g / denom for g in gates]
        combine_SVC = 0
        for g_S, km, loc in zip(gates, kept, locs):
            slot_S = (loc * km).sum(1)
            onehot_SC = F.one_hot(slot_S, C).to(g_S.dtype)
            combine_SVC = combine_SVC + g_S[:, None, None] * km.to(g_S.dtype)[:, :, None] * onehot_SC[:, None, :]
        combine_SVC = combine_SVC.to(u_Sd.dtype)
        dispatch_SVC = combine_SVC.bool().to(u_Sd.dtype)
        disp_VCd = torch.einsum("sec,sm->ecm", dispatch_SVC, u_Sd)
        y_VCd = block.experts(disp_VCd, first=first)
        y_VCd = F.dropout(y_VCd, p=cfg.dropout, training=block.training)
        moe_Sd = torch.einsum("sec,ecm->sm", combine_SVC, y_VCd)
        residual_Sd = u_Sd if (cfg.residual == "official" and c > 0) else xs_Sd
        x_Nd = x_Nd.index_copy(0, idx_S, moe_Sd + residual_Sd)
        active_N = state_N == c
        next_S = block.stratum_of_expert[experts_KS[0] + first] + 1
        state_N = state_N.index_copy(0, idx_S, next_S)
        passes_N = passes_N + active_N.long()
        aux_sum = aux_sum + balance_loss(
            probs_SV, experts_KS[0], torch.ones(S, dtype=torch.bool, device=dev), S
        )
    if cfg.has_exit_norm:
        x_Nd = block.strata_norms[-1](x_Nd)
    stats = BlockStats(aux_sum / max(num_passes, 1), passes_N.view(T, B), routed_N.view(T, B),
                       dropped, assigned)
    return x_Nd.view(T, B, d), stats


# ----------------------------------------------------------------------------- measurement


class _PeakBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated while active (CPU peak-memory proxy).

    Every op's outputs are inspected: a storage that is none of the op's inputs' (so not a
    view or an in-place result) is a new allocation, counted until it is freed.
    """

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live = set()

    def _free(self, key, nbytes):
        self._live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, nbytes = st.data_ptr(), st.nbytes()
                if nbytes == 0 or key in inputs or key in self._live:
                    continue
                self._live.add(key)
                self.current += nbytes
                self.peak = max(self.peak, self.current)
                weakref.finalize(st, self._free, key, nbytes)
        return out


def peak_mb(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with _PeakBytes() as mode:
        fn()
    return mode.peak / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SKEWS = ("balanced", "zipf", "two")
PHASES = ("train", "eval")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def skew_offsets(skew: str, V: int) -> Tensor:
    """Logit offsets that skew one router's top-1 choices over its V experts: ``balanced``
    none (a random router is roughly balanced); ``zipf``: log(1 / rank) (first expert most,
    share falling roughly as 1/rank); ``two``: every token's top-2 are the first two experts."""
    if skew == "balanced":
        return torch.zeros(V)
    if skew == "zipf":
        return -torch.log(torch.arange(1, V + 1, dtype=torch.float32)) * 2.0
    if skew == "two":
        return torch.tensor([30.0, 29.0] + [0.0] * (V - 2))[:V]
    raise ValueError(f"unknown skew {skew!r}; choose from {', '.join(SKEWS)}")


def skew_router(block: SMoEBlock, skew: str) -> None:
    """Add ``skew_offsets`` to the logits of every router of ``block`` (benchmark only)."""
    if skew == "balanced":
        return
    offsets = [skew_offsets(skew, r.out_features).to(r.weight.device) for r in block.routers]
    plain = block.router_logits
    block.router_logits = lambda c, u: plain(c, u) + offsets[c]


class Case:
    """One configuration: the block (routing skewed as asked, training or evaluation mode), its
    input, the floor FFN and its rows."""

    def __init__(self, name, tokens, device, seed=0, skew="balanced", phase="train", dtype="fp32"):
        d, ffn, strata, *widths = CONFIGS[name]
        torch.manual_seed(seed)
        self.name, self.device, self.skew, self.phase, self.dtype = name, device, skew, phase, dtype
        dt = DTYPES[dtype]
        cfg = SMoEConfig(embed_dim=d, ffn_dim=ffn, strata=strata, second_expert_policy="all",
                         strata_ffn=widths[0] if widths else None)
        self.has_onehot = not widths  # the one-hot baseline runs one FFN width only
        self.block = SMoEBlock(cfg).to(device, dt).train(phase == "train")
        skew_router(self.block, skew)
        B = math.gcd(tokens, 32)
        T = tokens // B
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(T, B, d, generator=g).to(device, dt)
        self.gy = torch.randn(T, B, d, generator=g).to(device, dt)
        with torch.no_grad():
            _, st = self.block(self.x, trace=True)
        self.rows = st.assigned - st.dropped
        self.passes = float(st.passes_TB.float().mean())
        self.drop_frac = st.dropped / max(st.assigned, 1)
        # load imbalance of the first pass: the busiest expert's share of the assignments
        # over the mean share (1 = balanced; V = everything on one expert)
        tr = st.trace[0]
        loads = torch.bincount((tr.experts_Kn - tr.first)[tr.kept_Kn], minlength=tr.probs_nV.size(1))
        self.imbalance = float(loads.max() / loads.float().mean())
        # in-place ReLU, as the experts use: the tightest dense FFN of stock PyTorch modules,
        # one per FFN width, over the rows the experts of that width computed
        rows_of_width = {}
        for (first, n, f) in self.block.experts.groups:
            rows_of_width[f] = rows_of_width.get(f, 0) + sum(st.expert_rows[first:first + n])
        self.experts = []
        for (first, n, f) in self.block.experts.groups:
            for rows in st.expert_rows[first:first + n]:
                ffn_e = nn.Sequential(nn.Linear(d, f), nn.ReLU(inplace=True), nn.Linear(f, d)).to(device, dt).train()
                self.experts.append((ffn_e, rows))
        total = sum(rows for _, rows in self.experts)
        # per pass, the experts that computed rows there (global ids) and their rows; an expert
        # idle at every pass still runs once over no rows (its gradient is written, as ours')
        E = len(self.experts)
        self.pass_chunks = []
        for tr in st.trace:
            counts = torch.bincount(tr.experts_Kn[tr.kept_Kn], minlength=E).tolist()
            self.pass_chunks += [(e, r) for e, r in enumerate(counts) if r > 0]
        self.pass_chunks += [(e, 0) for e, (_, rows) in enumerate(self.experts) if rows == 0]
        self.x_experts = torch.randn(total, d, generator=g).to(device, dt)
        self.gy_experts = torch.randn(total, d, generator=g).to(device, dt)
        self.floor = []
        for f, rows in rows_of_width.items():
            ffn_f = nn.Sequential(nn.Linear(d, f), nn.ReLU(inplace=True), nn.Linear(f, d)).to(device, dt).train()
            self.floor.append((ffn_f, torch.randn(rows, d, generator=g).to(device, dt),
                               torch.randn(rows, d, generator=g).to(device, dt)))

    def _params(self, variant):
        if variant == "floor":
            return [p for ffn_f, _, _ in self.floor for p in ffn_f.parameters()]
        if variant in ("experts", "passes"):
            return [p for ffn_e, _ in self.experts for p in ffn_e.parameters()]
        return self.block.parameters()

    def call(self, variant, mode):
        for p in self._params(variant):
            p.grad = None
        if variant == "floor":
            for ffn_f, xf, gyf in self.floor:
                if mode == "fwd":
                    with torch.no_grad():
                        ffn_f(xf)
                else:
                    x = xf.detach().requires_grad_()
                    ffn_f(x).backward(gyf)
            return None
        if variant in ("experts", "passes"):
            chunks = ([(ffn_e, r) for ffn_e, r in self.experts] if variant == "experts"
                      else [(self.experts[e][0], r) for e, r in self.pass_chunks])
            x = self.x_experts.detach().requires_grad_(mode != "fwd")
            with torch.set_grad_enabled(mode != "fwd"):
                ys = [ffn_e(xe) for (ffn_e, _), xe in zip(chunks, x.split([r for _, r in chunks]))]
                if mode != "fwd":
                    torch.cat(ys).backward(self.gy_experts)
            return None
        fwd = self.block if variant == "ours" else (lambda x: onehot_smoe_forward(self.block, x))
        if mode == "fwd":
            with torch.no_grad():
                return fwd(self.x)[0]
        x = self.x.detach().requires_grad_()
        out, st = fwd(x)
        torch.autograd.backward([out, st.aux_loss], [self.gy, torch.ones_like(st.aux_loss)])
        return x.grad


def run(names, tokens, reps, warmup, device, log=print, skews=("balanced",), phases=("train",),
        onehot=True, dtypes=("fp32",)):
    """Time every variant of every configuration, dtype, routing skew and phase (training:
    forward and forward + backward; evaluation: forward, no capacity limit); the first (warm-up)
    call of ``ours`` and ``onehot`` also measures their peak memory (it is not timed)."""
    assert warmup >= 1
    results = []
    for name, dtype, phase, skew in ((n, t, p, k) for n in names for t in dtypes for p in phases for k in skews):
        case = Case(name, tokens, device, skew=skew, phase=phase, dtype=dtype)
        case.has_onehot = case.has_onehot and onehot
        tag = "" if dtype == "fp32" else f" {dtype}"
        log(f"# {name}{tag} {phase} {skew}: {tokens} tokens, {case.rows} expert rows computed "
            f"({case.passes:.2f} passes/token, {100 * case.drop_frac:.1f}% assignments "
            f"dropped, busiest expert {case.imbalance:.2f}x the mean load)")
        for mode in (MODES if phase == "train" else ("fwd",)):
            results.append(time_case(case, mode, reps, warmup, device, log))
        del case
    for r in results:  # time per expert row, relative to the balanced case of the same rows
        base = next((b for b in results if (b["config"], b["dtype"], b["mode"], b["phase"], b["skew"])
                     == (r["config"], r["dtype"], r["mode"], r["phase"], "balanced")), None)
        r["per_row_over_balanced"] = (
            round((r["ours_ms"] / r["rows"]) / (base["ours_ms"] / base["rows"]), 3) if base else None
        )
    return results


def time_case(case, mode, reps, warmup, device, log):
    variants = VARIANTS if case.has_onehot else VARIANTS[:-1]
    times = {v: [] for v in variants}
    peaks = {}
    for i in range(warmup + reps):
        k = i % len(variants)
        order = variants[k:] + variants[:k]  # rotate, so noise hits all alike
        for v in order:
            if i == 0 and v not in FLOORS:
                peaks[v] = peak_mb(lambda: case.call(v, mode), device)
                continue
            sync(device)
            t0 = time.perf_counter()
            case.call(v, mode)
            sync(device)
            if i >= warmup:
                times[v].append(time.perf_counter() - t0)
    ms = {v: 1000 * statistics.median(times[v]) for v in variants}
    onehot = "onehot" in ms
    r = {
        "config": case.name, "dtype": case.dtype, "mode": mode, "phase": case.phase, "skew": case.skew,
        "ours_ms": round(ms["ours"], 3), "floor_ms": round(ms["floor"], 3),
        "onehot_ms": round(ms["onehot"], 3) if onehot else None,
        "experts_ms": round(ms["experts"], 3),
        "ours_over_floor": round(ms["ours"] / ms["floor"], 3),
        "ours_over_experts": round(ms["ours"] / ms["experts"], 3),
        "passes_ms": round(ms["passes"], 3),
        "ours_over_passes": round(ms["ours"] / ms["passes"], 3),
        "passes_over_experts": round(ms["passes"] / ms["experts"], 3),
        "expert_runs": len(case.pass_chunks),
        "onehot_over_ours": round(ms["onehot"] / ms["ours"], 3) if onehot else None,
        "ours_peak_mb": round(peaks["ours"], 1), "onehot_peak_mb": round(peaks["onehot"], 1) if onehot else None,
        "tokens": case.x.shape[0] * case.x.shape[1], "rows": case.rows,
        "passes_per_token": round(case.passes, 3), "dropped_frac": round(case.drop_frac, 4),
        "imbalance": round(case.imbalance, 2), "reps": reps, "threads": torch.get_num_threads(),
        "device": str(device),
    }
    log(f"  {mode:8s} ours {r['ours_ms']:9.1f} ms  floor {r['floor_ms']:9.1f} ms  "
        f"experts {r['experts_ms']:9.1f} ms  ours/experts {r['ours_over_experts']:.2f}  "
        f"passes {r['passes_ms']:9.1f} ms  ours/passes {r['ours_over_passes']:.2f}  "
        f"onehot {_fmt(r['onehot_ms'], '9.1f')} ms  ours/floor {r['ours_over_floor']:.2f}  "
        f"onehot/ours {_fmt(r['onehot_over_ours'], '.2f')}  peak MB ours {r['ours_peak_mb']:.0f} "
        f"onehot {_fmt(r['onehot_peak_mb'], '.0f')}")
    return r


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _ms(v) -> str:
    """A time in ms: one decimal, two below 1 ms (GPU kernels)."""
    return "-" if v is None else format(v, ".2f" if v < 1 else ".1f")


def table(results) -> str:
    """The results as a Markdown table; a dtype column when any case is not fp32."""
    dt = any(r.get("dtype", "fp32") != "fp32" for r in results)
    head = ("| config |" + (" dtype |" if dt else "") + " phase | skew | mode | ours ms | floor ms | experts ms | "
            "passes ms | one-hot ms | ours/floor | ours/experts | ours/passes | one-hot/ours | per row vs balanced | "
            "ours peak MB | one-hot peak MB |")
    lines = [head, "|" + "---|" * (16 + dt)]
    for r in results:
        rel = r.get("per_row_over_balanced")
        lines.append(
            f"| {r['config']} |" + (f" {r['dtype']} |" if dt else "") + f" {r['phase']} | {r['skew']} | "
            f"{r['mode']} | {_ms(r['ours_ms'])} | "
            f"{_ms(r['floor_ms'])} | {_ms(r['experts_ms'])} | {_ms(r['passes_ms'])} | "
            f"{_ms(r['onehot_ms'])} | {r['ours_over_floor']:.2f} | {r['ours_over_experts']:.2f} | "
            f"{r['ours_over_passes']:.2f} | "
            f"{_fmt(r['onehot_over_ours'], '.2f')} | {'' if rel is None else f'{rel:.2f}'} | "
            f"{r['ours_peak_mb']:.0f} | {_fmt(r['onehot_peak_mb'], '.0f')} |"
        )
    return "\n".join(lines)


@errors.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print the results as a JSON list")
    p.add_argument("--quick", action="store_true",
                   help="512 tokens, 1 warm-up + 1 repetition (a smoke run, < 1 min on 2 cores)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 4096)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5)")
    p.add_argument("--configs", default=",".join(list(CONFIGS)[:4]),
                   help=f"comma-separated, of {', '.join(CONFIGS)} (default: the first four)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads (default: torch's, all cores)")
    p.add_argument("--skews", default="balanced",
                   help=f"comma-separated routing skews of {', '.join(SKEWS)} (default balanced)")
    p.add_argument("--no-onehot", action="store_true",
                   help="skip the one-hot baseline (slow under skew: its buffers grow with the busiest expert)")
    p.add_argument("--phases", default="train",
                   help="train (capacity, fwd and fwd_bwd) and/or eval (no capacity, fwd) (default train)")
    p.add_argument("--dtypes", default="fp32",
                   help=f"comma-separated, of {', '.join(DTYPES)}: the block, its input and the floor "
                        f"modules cast to each (default fp32)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    tokens = args.tokens or (512 if args.quick else 4096)
    reps = args.reps or (1 if args.quick else 5)
    warmup = 1
    names = [n for n in args.configs.split(",") if n]
    for n in names:
        if n not in CONFIGS:
            p.error(f"unknown config {n!r}; choose from {', '.join(CONFIGS)}")
    skews = [k for k in args.skews.split(",") if k]
    phases = [k for k in args.phases.split(",") if k]
    dtypes = [k for k in args.dtypes.split(",") if k]
    for values, known, flag in ((skews, SKEWS, "--skews"), (phases, PHASES, "--phases"), (dtypes, DTYPES, "--dtypes")):
        for v in values:
            if v not in known:
                p.error(f"{flag}: unknown {v!r}; choose from {', '.join(known)}")
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    log(f"# device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{reps} repetitions after {warmup} warm-up, medians")
    t0 = time.time()
    results = run(names, tokens, reps, warmup, device, log, skews=skews, phases=phases,
                  onehot=not args.no_onehot, dtypes=dtypes)
    log(f"# total {time.time() - t0:.0f} s")
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print()
        print(table(results))


if __name__ == "__main__":
    main()
