#!/usr/bin/env python
"""The small-scale study's report (scripts/study_small_scale.sh writes the runs it reads).

    python scripts/study_report.py OUT_DIR

Reads every OUT_DIR/<run>/train.log (fairseq's JSON log lines: validation loss at every
validation, words per batch and strata passes per log interval) and writes:

* OUT_DIR/study.png: validation loss (base 2) against updates and against training FLOPs, one
  line per run (seeds of a system in one colour);
* OUT_DIR/dial.png: the compute dial (chrF against FLOPs per token at every --smoe-max-passes K)
  of the dial runs, with the dense model's point;
* OUT_DIR/study.md: the tables: validation loss per run at every validation, the test scores of
  the evaluated systems (mean +- std over seeds) and sacreBLEU's paired bootstrap of chrF against
  dense and against the top-2 MoE (fairseq_smoe.report), one section per training budget (a run
  continued to a larger budget keeps its shorter run's scores in <run>/u<updates>/, so systems are
  only compared at equal updates), the strata widths against smoe at their budget, the ablations
  next to smoe at the same update, the dial table.

Training FLOPs: 3 x the forward FLOPs per token of the run's recipe (python -m fairseq_smoe.cost:
Kaplan's count, with the strata passes per token measured in that log interval) x the target
tokens of the interval. Forward + backward ~ 3x forward is the usual approximation; it is the same
for every run, so the comparison between systems holds.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAIN = ("dense", "moe", "smoe", "smoe-paper")


def parse_log(path: Path):
    """(validations [(update, loss)], intervals [(update, target words, rc_enc, rc_dec)])."""
    valid, inner = [], {}
    for line in path.read_text(errors="replace").splitlines():
        m = re.search(r"\| (valid|train_inner) \| (\{.*\})", line)
        if not m:
            continue
        rec = json.loads(m.group(2))
        if m.group(1) == "valid":
            valid.append((int(rec["valid_num_updates"]), float(rec["valid_loss"])))
        else:
            # keyed by update: a resumed run logs the updates after its checkpoint again
            inner[int(rec["num_updates"])] = (float(rec["wpb"]) * 50,  # --log-interval 50
                                              float(rec.get("rc_enc", 0) or 0), float(rec.get("rc_dec", 0) or 0))
    # a resumed run logs some validations twice: keep the last of each update; a run resumed
    # at its last update validates once more at the end (one update later): keep the first
    points = []
    for update, loss in sorted(dict(valid).items()):
        if points and update - points[-1][0] < 10:
            continue
        points.append((update, loss))
    return points, [(u, *inner[u]) for u in sorted(inner)]


def run_flags(out: Path, name: str):
    """(config, extra flags) of a run from runs.txt."""
    for line in (out / "runs.txt").read_text().splitlines():
        fields = line.split("|")
        if fields[0] == name:
            return fields[2], fields[6].split()
    raise KeyError(name)


def vocab_of(data: Path) -> int:
    """The model's vocabulary on a prepared directory: dict.txt, fairseq's 4 specials, one
    language token per language."""
    return sum(1 for _ in open(data / "dict.txt", encoding="utf-8")) + 4 + len((data / "langs.txt").read_text().split(","))


def shape_of(out: Path, name: str):
    """The cost module's model shape of a run: its recipe and flags from runs.txt, the vocabulary
    of its data."""
    from fairseq_smoe.cost import parse_model_args, shape_from_args
    from fairseq_smoe.recipes import load_config

    config, extra = run_flags(out, name)
    flags, _ = load_config(config)
    data = out / ("bible-ext" if name.startswith("ext-") else "bible")
    return shape_from_args(parse_model_args([*flags, *extra]), vocab_of(data))


def params_and_flops(shape, rc_enc, rc_dec):
    """(#params, forward FLOPs per token) with rc_enc / rc_dec strata passes in every MoE slot."""
    from fairseq_smoe.cost import count

    if not shape.moe_freq:
        return count(shape)[:2]
    slots = max(1, sum(1 for i in range(shape.enc_layers) if (i + 1) % shape.moe_freq == 0))
    return count(shape, [rc_enc] * slots, [rc_dec] * slots)[:2]


def flops_curve(out: Path, name: str, inner):
    """Cumulative training FLOPs at each logged update."""
    shape = shape_of(out, name)
    total, curve = 0.0, {}
    for update, words, rc_enc, rc_dec in inner:
        total += 3 * params_and_flops(shape, rc_enc, rc_dec)[1] * words
        curve[update] = total
    return curve


def system_of(name: str) -> str:
    return re.sub(r"-s\d+$", "", name)


def scored(out: Path, runs, kind: str = "eval"):
    """[(run, updates, directory)] of every ``kind`` ("eval": scores.csv, "dial": dial.csv) the
    study kept: the run's current one at the updates in its ``trained`` marker, and those of
    shorter budgets it was continued from in ``<run>/u<updates>/``; largest budget first."""
    found = []
    target = "scores.csv" if kind == "eval" else "dial.csv"
    for r in runs:
        marker = out / r / "trained"
        current = marker.read_text().strip() if marker.exists() else ""
        if current and (out / r / kind / target).exists():
            found.append((r, int(current), out / r / kind))
        for kept in (out / r).glob("u*"):
            if re.fullmatch(r"u\d+", kept.name) and (kept / kind / target).exists():
                found.append((r, int(kept.name[1:]), kept / kind))
    return sorted(found, key=lambda x: (-x[1], x[0]))


def mean_scores(eval_dir: Path):
    """{column: mean over the directions of scores.csv} for chrf, rc_enc, rc_dec (the strata
    passes; None for a model without SMoE blocks, whose scores.csv leaves them empty)."""
    import csv

    rows = list(csv.DictReader(open(eval_dir / "scores.csv", encoding="utf-8")))
    means = {}
    for k in ("chrf", "rc_enc", "rc_dec"):
        xs = [float(x[k]) for x in rows if x.get(k)]
        means[k] = sum(xs) / len(xs) if xs and len(xs) == len(rows) else None
    return means


def main(argv=None):
    out = Path((argv or sys.argv[1:])[0])
    runs = [p.name for p in sorted(out.iterdir()) if (p / "train.log").exists()]
    if not runs:
        sys.exit(f"error: no run in {out} (expected <run>/train.log from scripts/study_small_scale.sh)")
    logs = {r: parse_log(out / r / "train.log") for r in runs}
    flops = {r: flops_curve(out, r, logs[r][1]) for r in runs}

    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's logging set DEBUG on import
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    seen = set()

    def draw(ax, r, x_of=None, style="-", colour=None):
        valid = logs[r][0]
        if not valid:
            return
        sys_name = system_of(r)
        colour = colour or colours.setdefault(sys_name, f"C{len(colours) % 10}")
        label = None if (ax, sys_name) in seen else sys_name
        seen.add((ax, sys_name))
        ups = [u for u, _ in valid]
        xs = x_of(r, ups) if x_of else ups
        ax.plot(xs, [l for _, l in valid], style, color=colour, label=label, linewidth=1.2, marker=".")

    def flops_at(r, ups):
        f = flops[r]
        return [f.get(u, f[max(k for k in f if k <= u)] if any(k <= u for k in f) else 0.0) / 1e15 for u in ups]

    bible = [r for r in runs if not r.startswith(("abl-", "ext-"))]
    for r in bible:
        style = "-" if system_of(r) in MAIN else "--"
        draw(axes[0, 0], r, style=style)
        draw(axes[0, 1], r, flops_at, style=style)
    # the ablations of smoe (and its paper-residual twin) in colour, smoe dotted black, dense and moe grey
    variants = [q for q in runs if q.startswith("abl-") or q == "smoe-paper-s1"]
    for r in variants + [q for q in bible if system_of(q) in ("dense", "moe", "smoe") and q.endswith("-s1")]:
        own = r in variants
        draw(axes[1, 0], r, style="-" if own else ":", colour=None if own else "k" if system_of(r) == "smoe" else "0.6")
    for r in [q for q in runs if q.startswith("ext-")]:
        draw(axes[1, 1], r)
    titles = [["Bible, 8 directions: main, dial and width systems", "the same against training compute"],
              ["ablations of smoe (black dotted: smoe, grey: dense and moe)", "extended Bible set, 18 directions"]]
    for i in range(2):
        for j in range(2):
            ax = axes[i, j]
            ax.set_title(titles[i][j], fontsize=10)
            ax.set_xlabel("training FLOPs (PFLOP, 3 x forward)" if (i, j) == (0, 1) else "updates")
            ax.set_ylabel("validation loss (base 2)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Small-scale study on the Bible benchmark (demo recipe, smoe_transformer_tiny)")
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=110)
    plt.close(fig)

    lines = ["# Small-scale study (scripts/study_small_scale.sh)", "",
             "![validation loss](study.png)", "", "## Validation loss (base 2) per run", ""]
    updates = sorted({u for r in runs for u, _ in logs[r][0]})
    lines.append("| run | " + " | ".join(str(u) for u in updates) + " |")
    lines.append("|---|" + "---|" * len(updates))
    for r in runs:
        v = dict(logs[r][0])
        lines.append(f"| {r} | " + " | ".join(f"{v[u]:.3f}" if u in v else "" for u in updates) + " |")

    seeded = {}
    for r in runs:
        if system_of(r) in MAIN and logs[r][0]:
            seeded.setdefault(system_of(r), []).append(dict(logs[r][0]))
    common = sorted(set.intersection(*(set(v) for vs in seeded.values() for v in vs))) if seeded else []
    if common and max(len(vs) for vs in seeded.values()) > 1:
        lines += ["", "## Seed spread of the main systems: validation loss, mean +- std over seeds", "",
                  "| system | seeds | " + " | ".join(str(u) for u in common) + " |",
                  "|---|---|" + "---|" * len(common)]
        for sys_name, vs in seeded.items():
            cells = []
            for u in common:
                xs = [v[u] for v in vs]
                m = sum(xs) / len(xs)
                sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
                cells.append(f"{m:.3f} +- {sd:.3f}")
            lines.append(f"| {sys_name} | {len(vs)} | " + " | ".join(cells) + " |")

    evaluated = scored(out, runs, "eval")
    for budget in sorted({u for _, u, _ in evaluated}, reverse=True):
        groups = {}
        for r, u, d in evaluated:
            if u == budget:
                groups.setdefault(system_of(r), []).append(str(d))
        specs = [f"{s}={','.join(d)}" for s, d in groups.items()]
        lines += ["", f"## Test set at {budget} updates (Mark, beam 5), chrF: mean +- std over seeds, "
                  "paired bootstrap", ""]
        for base in ("dense", "moe"):
            if base not in groups or len(groups) < 2:
                continue
            # --allow-partial: the study's eight directions, not the extended Bible set
            cmd = [sys.executable, "-m", "fairseq_smoe.report", "bible", *specs, "--seeds", "--metric", "chrf",
                   "--allow-partial",
                   "--baseline", base, "--data", str(out / "bible")]
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            lines += [f"### against {base}", "", "```", (run.stdout or run.stderr).strip(), "```", ""]

        # strata widths: the width runs against smoe at the same budget
        widths = [(r, d) for r, u, d in evaluated
                  if u == budget and system_of(r) in ("smoe", "smoe-w256-768", "smoe-w768-256") and r.endswith("-s1")]
        if len(widths) > 1:
            lines += ["", f"## Strata widths (--smoe-strata-ffn) at equal parameters, {budget} updates", "",
                      "| run | strata FFN | parameters | passes/token enc / dec | FLOPs/token (measured passes) "
                      "| chrF | valid loss |", "|---|---|---|---|---|---|---|"]
            for r, d in widths:
                shape = shape_of(out, r)
                m = mean_scores(d)
                params, flops = params_and_flops(shape, m["rc_enc"], m["rc_dec"])
                ffn = ",".join(str(f) for f in shape.strata_ffn) if getattr(shape, "strata_ffn", None) else "uniform"
                loss = dict(logs[r][0]).get(budget)
                lines.append(f"| {r} | {ffn} | {params / 1e6:.2f}M | {m['rc_enc']:.3f} / {m['rc_dec']:.3f} | "
                             f"{flops / 1e6:.2f}M | {m['chrf']:.2f} | {'' if loss is None else f'{loss:.3f}'} |")

    base = {u: l for u, l in logs.get("smoe-s1", ([], []))[0]}
    abl = [r for r in runs if r.startswith("abl-")]
    if abl and base:
        lines += ["", "## Ablations of smoe (seed 1): validation loss at their last update", "",
                  "| run | updates | loss | smoe at that update | difference |", "|---|---|---|---|---|"]
        for r in abl:
            if not logs[r][0]:
                continue
            u, l = logs[r][0][-1]
            ref = base.get(u)
            diff = f"{l - ref:+.3f}" if ref is not None else ""
            lines.append(f"| {r} | {u} | {l:.3f} | {'' if ref is None else f'{ref:.3f}'} | {diff} |")

    dials = scored(out, runs, "dial")
    if dials:
        import csv

        fig, ax = plt.subplots(figsize=(6, 4.5))
        lines += ["", "## Compute dial (chrF mean over directions at every --smoe-max-passes K)", "",
                  "![dial](dial.png)", "", "| model | updates | K | passes/token | FLOPs/token | chrF | BLEU |",
                  "|---|---|---|---|---|---|---|"]
        for r, u, d in dials:
            rows = list(csv.DictReader(open(d / "dial.csv", encoding="utf-8")))
            ax.plot([float(x["flops_per_token"]) / 1e6 for x in rows], [float(x["chrf"]) for x in rows],
                    marker="o", label=f"{system_of(r)}, {u} updates")
            for x in rows:
                lines.append(f"| {r} | {u} | {x['k']} | {float(x['passes_per_token']):.3f} | "
                             f"{float(x['flops_per_token']) / 1e6:.2f}M | {float(x['chrf']):.2f} | {float(x['bleu']):.2f} |")
        from fairseq_smoe.cost import config_shape, count

        dense_flops = count(config_shape("demo/dense-tiny", vocab_of(out / "bible")))[1]
        for budget in sorted({u for _, u, _ in dials}):
            chrfs = [mean_scores(d)["chrf"] for r, u, d in evaluated if u == budget and system_of(r) == "dense"]
            if chrfs:
                ax.scatter([dense_flops / 1e6], [sum(chrfs) / len(chrfs)], marker="*", s=150,
                           label=f"dense, {budget} updates")
        ax.set_xlabel("FLOPs per token (M, forward, measured passes)")
        ax.set_ylabel("chrF (mean over directions)")
        ax.set_title("Compute dial: --smoe-max-passes K = 1..L")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "dial.png", dpi=120)
        plt.close(fig)
    (out / "study.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out / 'study.md'}, {out / 'study.png'}")


if __name__ == "__main__":
    main()
