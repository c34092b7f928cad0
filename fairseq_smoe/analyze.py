"""Routing analysis of a trained SMoE model, as the paper's §5 and Figs 2-4 show it.

    python -m fairseq_smoe.analyze CHECKPOINT DATA_DIR OUT_DIR [--subset valid|test|train]
                                   [--max-sentences N] [--max-tokens 4096] [--cpu]

Runs the model once loaded, with teacher forcing (evaluation mode: deterministic routing, no
capacity limit unless the checkpoint sets one), over the chosen subset of every direction of
DATA_DIR (what ``scripts/prepare_data.sh`` writes; ``--max-sentences`` caps each direction), with
the routing record's per-pass detail (``modules/stats.py``), and writes CSV files and PNG plots:

* ``rc_direction.csv``, ``rc_per_direction.png``: requested capacity (RC: strata passes per token
  per SMoE block) per direction, encoder and decoder (Fig. 2), with the balanced-routing prior
  E[RC] = 1 + sum_j n_j / V_j (spec §1.7);
* ``rc_block.csv``, ``rc_per_block.png``: RC per SMoE block position (Fig. 4);
* ``token_rc.csv``, ``token_rc_frequency.png``: per block and direction the 25 tokens with the
  highest and the 25 with the lowest mean RC (among tokens seen ``--min-count`` times, default 3)
  with their frequency rank in the training data (the rank of their count in the data
  dictionary, which fairseq counts on the training text), and ``token_rc_summary.csv``: the
  paper's question (Fig. 3): are low-RC tokens frequent, high-RC tokens not?
* ``expert_load.csv``, ``expert_load_<side><layer>.png``: per block and stratum, the share of the
  stratum's top-1 choices and of all its assignments each expert gets, per target language (a
  heatmap per block);
* ``strata.csv``: per block and stratum, the rows routed there, assignments made and dropped by
  capacity (the dropped-assignment rate), and the mean router entropy (nats).

Encoder tokens are the source tokens (with their language tag); a decoder block's token at step
t is the decoder input token there (the previous target token). Padding is not counted.
``index.md`` lists the figures with one line of reading each.
"""

import argparse
import csv
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import errors
from .errors import UserError

TOP = 25


class AnalysisError(UserError, RuntimeError):
    pass


# ----------------------------------------------------------------------------- collection


class Collector:
    """Sums over batches, per (side, layer) block and direction (everything on the CPU)."""

    def __init__(self, directions: List[str], vocab: int, strata_of: Dict[str, tuple]):
        self.directions, self.vocab = directions, vocab
        self.strata_of = strata_of  # side -> strata of that side's blocks
        D = len(directions)
        self.rc = defaultdict(lambda: torch.zeros(D, 2, dtype=torch.float64))  # (passes, tokens)
        self.tok_sum = defaultdict(lambda: torch.zeros(D, vocab, dtype=torch.float64))
        self.tok_cnt = defaultdict(lambda: torch.zeros(D, vocab, dtype=torch.float64))
        # (side, layer, stratum) -> [D, E] counts of top-1 choices / all computed assignments
        self.top1 = {}
        self.assign = {}
        # (side, layer, stratum) -> [rows, assigned, kept, entropy sum]
        self.strata = defaultdict(lambda: [0, 0, 0, 0.0])

    def add(self, side: str, layer: int, stats, tokens_BT: torch.Tensor, dir_B: torch.Tensor,
            num_experts: int, k: int):
        passes_TB, routed_TB = stats.passes_TB.cpu(), stats.routed_TB.cpu()
        T, B = passes_TB.shape
        D = len(self.directions)
        dir_TB = dir_B.view(1, B).expand(T, B)
        key = (side, layer)
        self.rc[key][:, 0].index_add_(0, dir_TB[routed_TB], passes_TB[routed_TB].double())
        self.rc[key][:, 1].index_add_(0, dir_TB[routed_TB], torch.ones(int(routed_TB.sum()), dtype=torch.float64))
        flat = dir_TB[routed_TB] * self.vocab + tokens_BT.t()[routed_TB]
        self.tok_sum[key].view(-1).index_add_(0, flat, passes_TB[routed_TB].double())
        self.tok_cnt[key].view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        routed_N = routed_TB.reshape(-1)
        dir_N = dir_TB.reshape(-1)
        for tr in stats.trace:
            rows = torch.arange(T * B) if tr.rows_n is None else tr.rows_n.cpu()
            valid = routed_N[rows]
            experts = tr.experts_Kn.cpu()
            kept = tr.kept_Kn.cpu()
            d_n = dir_N[rows]
            skey = (side, layer, tr.stratum)
            if skey not in self.top1:
                self.top1[skey] = torch.zeros(D, num_experts, dtype=torch.float64)
                self.assign[skey] = torch.zeros(D, num_experts, dtype=torch.float64)
            self.top1[skey].view(-1).index_add_(
                0, d_n[valid] * num_experts + experts[0][valid], torch.ones(int(valid.sum()), dtype=torch.float64))
            d_Kn = d_n.unsqueeze(0).expand_as(experts)
            self.assign[skey].view(-1).index_add_(
                0, (d_Kn * num_experts + experts)[kept], torch.ones(int(kept.sum()), dtype=torch.float64))
            probs = tr.probs_nV.cpu().double()[valid]
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
            acc = self.strata[skey]
            acc[0] += int(valid.sum())
            acc[1] += int(valid.sum()) * min(k, probs.size(1))
            acc[2] += int(kept.sum())
            acc[3] += float(entropy.sum())


def run_model(model, task, subset: str, max_tokens: int, max_sentences: Optional[int], cuda: bool):
    """Teacher-forced forwards over ``subset`` (the first ``max_sentences`` of every direction,
    default all), batched by size; returns the filled Collector."""
    import numpy as np
    from fairseq import utils

    from .modules.stats import recording

    if subset == "train":  # the per-direction datasets, not the sampled training mixture
        dataset = task.data_manager.load_dataset(subset, training=False)
    else:
        task.load_dataset(subset)
        dataset = task.dataset(subset)
    if not hasattr(dataset, "direction_ids"):
        raise AnalysisError(
            f"the {subset} data of this task carries no direction ids (fairseq's own dataset "
            f"with --lang-tok-replacing-bos-eos?); the analysis needs smoe_translation's layout"
        )
    starts = [0] + list(dataset.cumulative_sizes[:-1])
    cap = (lambda n: n) if max_sentences is None else (lambda n: min(n, max_sentences))
    from .evaluate import check_max_tokens

    sizes = np.asarray(dataset.sizes)
    names = [task.direction_names[d] for d in dataset.direction_ids]  # of each concatenated part
    parts = {name: sizes[s:s + cap(e - s)] for name, s, e in zip(names, starts, dataset.cumulative_sizes)}
    need = max((int(p.max()) for p in parts.values() if p.size), default=0)
    for name, part in parts.items():  # every sentence fits a batch (else fairseq's bare assertion)
        check_max_tokens(part, max_tokens, name, f"the {subset} data of {task.args.data}", need)
    indices = np.concatenate([np.arange(s, s + cap(e - s)) for s, e in zip(starts, dataset.cumulative_sizes)])
    indices = indices[np.argsort([dataset.num_tokens(int(i)) for i in indices], kind="stable")]
    batches = dataset.batch_by_size(indices, max_tokens=max_tokens, required_batch_size_multiple=1)
    directions = task.direction_names
    cfgs = {side: (model.smoe_blocks(side)[0].cfg if model.smoe_blocks(side) else None)
            for side in ("encoder", "decoder")}
    col = Collector(directions, len(task.target_dictionary),
                    {s: (c.strata if c else ()) for s, c in cfgs.items()})
    with torch.no_grad():
        for batch in batches:
            sample = dataset.collater([dataset[int(i)] for i in batch])
            if cuda:
                sample = utils.move_to_cuda(sample)
            net = sample["net_input"]
            with recording(detail=True) as record:
                model(**net)
            dir_B = sample["direction"].cpu()
            tokens = {"encoder": net["src_tokens"].cpu(), "decoder": net["prev_output_tokens"].cpu()}
            for entry in record.entries:
                cfg = cfgs[entry.side]
                for stats in entry.stats.blocks:
                    col.add(entry.side, entry.layer, stats, tokens[entry.side], dir_B,
                            cfg.num_experts, cfg.k)
    col.sentences = len(indices)
    if not len(indices):
        raise AnalysisError(f"no {subset} sentence was read")
    return col


# ----------------------------------------------------------------------------- tables


def balanced_rc(strata) -> float:
    from .cost import expected_passes

    return expected_passes(strata) if strata else float("nan")


def frequency_ranks(dictionary) -> torch.Tensor:
    """Rank (1 = most frequent) of every symbol's count in the data dictionary, specials last."""
    counts = torch.tensor(dictionary.count, dtype=torch.float64)
    counts[: dictionary.nspecial] = -1
    order = torch.argsort(-counts, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1)
    return ranks


def tables(col: Collector, dictionary, min_count: int = 3):
    """Every CSV as a list of dict rows."""
    dirs = col.directions
    out = {"rc_direction": [], "rc_block": [], "token_rc": [], "token_rc_summary": [],
           "expert_load": [], "strata": []}
    for side in ("encoder", "decoder"):
        keys = sorted(k for k in col.rc if k[0] == side)
        if not keys:
            continue
        prior = balanced_rc(col.strata_of[side])
        total = sum(col.rc[k] for k in keys)
        for d, name in enumerate(dirs):
            if total[d, 1] > 0:
                out["rc_direction"].append({"direction": name, "side": side, "rc": float(total[d, 0] / total[d, 1]),
                                            "block_tokens": int(total[d, 1]), "balanced_prior": prior})
        for key in keys:
            acc = col.rc[key].sum(0)
            out["rc_block"].append({"side": side, "layer": key[1] + 1, "rc": float(acc[0] / acc[1]),
                                    "tokens": int(acc[1]), "balanced_prior": prior})
    ranks = frequency_ranks(dictionary)
    pooled = {"top": set(), "bottom": set()}
    for key in sorted(col.tok_sum):
        side, layer = key
        cnt, tot = col.tok_cnt[key], col.tok_sum[key]
        for d, name in enumerate(dirs):
            ok = cnt[d] >= min_count
            if not ok.any():
                continue
            ids = ok.nonzero().squeeze(1)
            mean = tot[d, ids] / cnt[d, ids]
            order = torch.argsort(mean, descending=True, stable=True)
            n = min(TOP, len(ids) // 2)
            for group, pick in (("top", order[:n]), ("bottom", order.flip(0)[:n])):
                for i in pick.tolist():
                    tok = int(ids[i])
                    pooled[group].add(tok)
                    out["token_rc"].append({
                        "side": side, "layer": layer + 1, "direction": name, "group": group,
                        "token_id": tok, "token": dictionary[tok], "count": int(cnt[d, tok]),
                        "mean_rc": float(mean[i]), "freq_rank": int(ranks[tok]),
                    })
    vocab = len(dictionary) - dictionary.nspecial
    for group, toks in pooled.items():
        r = sorted(int(ranks[t]) for t in toks)
        if not r:
            continue
        out["token_rc_summary"].append({
            "group": group, "unique_tokens": len(r), "median_freq_rank": r[len(r) // 2],
            "share_in_top_10pct_frequent": sum(x <= 0.1 * vocab for x in r) / len(r),
            "vocab": vocab,
        })
    for skey in sorted(col.top1):
        side, layer, stratum = skey
        top1, assign = col.top1[skey], col.assign[skey]
        first = sum(col.strata_of[side][:stratum])
        for d, name in enumerate(dirs):
            tgt = name.split("-")[1]
            n1, na = top1[d].sum(), assign[d].sum()
            if n1 == 0:
                continue
            for e in range(first, top1.size(1)):
                out["expert_load"].append({
                    "side": side, "layer": layer + 1, "stratum": stratum, "direction": name,
                    "target": tgt, "expert": e, "top1_share": float(top1[d, e] / n1),
                    "assignment_share": float(assign[d, e] / na) if na > 0 else 0.0,
                })
        rows, assigned, kept, entropy = col.strata[skey]
        out["strata"].append({
            "side": side, "layer": layer + 1, "stratum": stratum, "rows": rows, "assigned": assigned,
            "dropped": assigned - kept, "dropped_rate": (assigned - kept) / assigned if assigned else 0.0,
            "router_entropy": entropy / rows if rows else 0.0,
        })
    return out


def write_csv(path: Path, rows: List[dict]):
    with open(path, "w", newline="", encoding="utf-8") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


# ----------------------------------------------------------------------------- figures


def figures(out: dict, out_dir: Path) -> List[tuple]:
    """The PNGs; returns (file, one line of reading) for index.md."""
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's root logger is chatty
    import matplotlib.pyplot as plt

    made = []
    rcd = out["rc_direction"]
    if rcd:
        dirs = list(dict.fromkeys(r["direction"] for r in rcd))
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(dirs) + 2), 4))
        width = 0.4
        for i, side in enumerate(("encoder", "decoder")):
            vals = {r["direction"]: r["rc"] for r in rcd if r["side"] == side}
            if vals:
                ax.bar([j + (i - 0.5) * width for j in range(len(dirs))], [vals.get(d, 0) for d in dirs],
                       width, label=side)
                prior = next(r["balanced_prior"] for r in rcd if r["side"] == side)
                ax.axhline(prior, color=f"C{i}", linestyle="--", linewidth=1,
                           label=f"{side} balanced prior {prior:.2f}")
        ax.set_xticks(range(len(dirs)))
        ax.set_xticklabels(dirs, rotation=60, ha="right")
        ax.set_ylabel("requested capacity (passes / token / block)")
        ax.set_title("Requested capacity per direction (cf. paper Fig. 2)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "rc_per_direction.png", dpi=120)
        plt.close(fig)
        hi = max(rcd, key=lambda r: r["rc"])
        lo = min(rcd, key=lambda r: r["rc"])
        made.append(("rc_per_direction.png",
                     f"passes per token per block by direction; highest {hi['direction']} "
                     f"({hi['side']}, {hi['rc']:.2f}), lowest {lo['direction']} ({lo['side']}, {lo['rc']:.2f}); "
                     f"dashed: the balanced-routing prior"))
    rcb = out["rc_block"]
    if rcb:
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [f"{r['side'][:3]} L{r['layer']}" for r in rcb]
        ax.plot(range(len(rcb)), [r["rc"] for r in rcb], marker="o")
        for side in ("encoder", "decoder"):
            prior = next((r["balanced_prior"] for r in rcb if r["side"] == side), None)
            if prior is not None:
                ax.axhline(prior, linestyle="--", linewidth=1, color="gray")
        ax.set_xticks(range(len(rcb)))
        ax.set_xticklabels(labels)
        ax.set_xlabel("SMoE block (side, layer)")
        ax.set_ylabel("requested capacity")
        ax.set_title("Requested capacity per block position (cf. paper Fig. 4)")
        fig.tight_layout()
        fig.savefig(out_dir / "rc_per_block.png", dpi=120)
        plt.close(fig)
        made.append(("rc_per_block.png", "passes per token by block position: "
                     + ", ".join(f"{lab} {r['rc']:.2f}" for lab, r in zip(labels, rcb))))
    tok = out["token_rc"]
    if tok:
        fig, ax = plt.subplots(figsize=(6, 4))
        for group, color in (("top", "C3"), ("bottom", "C0")):
            ranks = [math.log10(r["freq_rank"]) for r in tok if r["group"] == group]
            ax.hist(ranks, bins=20, alpha=0.6, color=color, label=f"{group}-{TOP} RC tokens")
        ax.set_xlabel("log10 frequency rank in the training data (0 = most frequent)")
        ax.set_ylabel("tokens (per block and direction)")
        ax.set_title("Frequency of high- and low-RC tokens (cf. paper Fig. 3)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "token_rc_frequency.png", dpi=120)
        plt.close(fig)
        summ = {r["group"]: r for r in out["token_rc_summary"]}
        made.append(("token_rc_frequency.png",
                     "frequency ranks of the top/bottom RC tokens; median rank "
                     + ", ".join(f"{g} {summ[g]['median_freq_rank']} ({100 * summ[g]['share_in_top_10pct_frequent']:.0f}% "
                                 f"in the 10% most frequent)" for g in ("bottom", "top") if g in summ)))
    load = out["expert_load"]
    for side, layer in sorted({(r["side"], r["layer"]) for r in load}):
        rows = [r for r in load if (r["side"], r["layer"]) == (side, layer)]
        strata = sorted({r["stratum"] for r in rows})
        targets = sorted({r["target"] for r in rows})
        fig, axes = plt.subplots(1, len(strata), figsize=(3.5 * len(strata) + 1, 0.4 * len(targets) + 2), squeeze=False)
        for ax, s in zip(axes[0], strata):
            sub = [r for r in rows if r["stratum"] == s]
            experts = sorted({r["expert"] for r in sub})
            grid = torch.zeros(len(targets), len(experts))
            counts = torch.zeros(len(targets), 1)
            for r in sub:
                grid[targets.index(r["target"]), experts.index(r["expert"])] += r["assignment_share"]
            for r in sub:
                if r["expert"] == experts[0]:
                    counts[targets.index(r["target"])] += 1
            grid = grid / counts.clamp_min(1)  # mean over the directions into that target
            im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0)
            ax.set_xticks(range(len(experts)))
            ax.set_xticklabels(experts)
            ax.set_yticks(range(len(targets)))
            ax.set_yticklabels(targets)
            ax.set_xlabel("expert (global id)")
            ax.set_title(f"stratum {s}")
            fig.colorbar(im, ax=ax, fraction=0.05)
        axes[0][0].set_ylabel("target language")
        fig.suptitle(f"{side} layer {layer}: share of the stratum's assignments per expert")
        fig.tight_layout()
        name = f"expert_load_{side[:3]}{layer}.png"
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        made.append((name, f"{side} layer {layer}: which experts each target language uses at each "
                     f"stratum (uniform rows = language-independent routing)"))
    return made


def write_index(out_dir: Path, made, out, subset, checkpoint):
    lines = [f"# Routing analysis of {checkpoint} ({subset} subset)", "",
             "Teacher forcing, evaluation mode. CSV files hold every number behind the figures.", ""]
    for name, reading in made:
        lines.append(f"* [{name}]({name}): {reading}.")
    summ = {r["group"]: r for r in out["token_rc_summary"]}
    if "bottom" in summ and "top" in summ:
        b, t = summ["bottom"], summ["top"]
        verdict = ("yes" if b["median_freq_rank"] < t["median_freq_rank"] else "no")
        lines += ["", f"Are low-RC tokens frequent? {verdict}: the lowest-RC tokens have median "
                  f"frequency rank {b['median_freq_rank']} ({b['unique_tokens']} unique), the highest-RC "
                  f"tokens {t['median_freq_rank']} ({t['unique_tokens']} unique), of {b['vocab']} "
                  f"(paper Fig. 3: low-RC tokens skew to frequent ones, high-RC tokens show no clear relation)."]
    dropped = sum(r["dropped"] for r in out["strata"])
    lines += ["", f"Dropped assignments: {dropped} (`strata.csv`: per stratum, with the router entropy).",
              "", f"Sentences analysed: {out['sentences']} (every direction of the subset)."]
    (out_dir / "index.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- entry point


@errors.missing_files_are_user_errors()
def analyze(checkpoint, data_dir, out_dir, subset="valid", max_sentences=None, max_tokens=4096,
            cpu=None, min_count=3):
    from fairseq import checkpoint_utils

    import fairseq_smoe  # noqa: F401

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    data_bin = data_dir / "data-bin" if (data_dir / "data-bin").is_dir() else data_dir
    if not data_bin.is_dir():
        raise AnalysisError(f"{data_dir} is not a prepared data directory (no data-bin/): "
                            f"prepare it with scripts/prepare_data.sh")
    if subset not in ("valid", "test", "train"):
        raise AnalysisError(f"--subset must be valid, test or train, not {subset!r}")
    if max_sentences is not None and max_sentences < 1:
        raise AnalysisError(f"--max-sentences must be >= 1, got {max_sentences}")
    if max_tokens < 1:
        raise AnalysisError(f"--max-tokens {max_tokens}: a batch must hold at least one token (default 4096)")
    cuda = torch.cuda.is_available() and not cpu
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data_bin)})
    model = models[0].eval()
    if not hasattr(model, "smoe_blocks"):
        from .cost import stock_model

        raise AnalysisError(f"{checkpoint} is {stock_model(_cfg.model) or 'not an smoe_transformer model'}: "
                            f"there is no routing to analyse (analyze needs an smoe_transformer checkpoint)")
    if not (model.smoe_blocks("encoder") + model.smoe_blocks("decoder")):
        raise AnalysisError(f"{checkpoint} is a dense smoe_transformer model (--moe-freq 0): it has no SMoE "
                            f"blocks, so there is no routing to analyse")
    if cuda:
        model.cuda()
    col = run_model(model, task, subset, max_tokens, max_sentences, cuda)
    out = tables(col, task.target_dictionary, min_count)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in out.items():
        write_csv(out_dir / f"{name}.csv", rows)
    out["sentences"] = col.sentences
    made = figures(out, out_dir)
    write_index(out_dir, made, out, subset, checkpoint)
    return out


@errors.cli
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fairseq_smoe.analyze",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("data_dir")
    p.add_argument("out_dir")
    p.add_argument("--subset", default="valid", help="valid (default), test or train")
    p.add_argument("--max-sentences", type=int, default=None, help="per direction (default: all)")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--min-count", type=int, default=3,
                   help="a token enters the top/bottom RC lists when seen this often (default 3)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even with a GPU")
    a = p.parse_args(argv)
    analyze(a.checkpoint, a.data_dir, a.out_dir, a.subset, a.max_sentences, a.max_tokens, a.cpu, a.min_count)
    print(f"analysis written to {a.out_dir} (see {os.path.join(a.out_dir, 'index.md')})")


if __name__ == "__main__":
    main()
