"""Score tables in the paper's layout.

``scores.csv`` (one row per direction, written by ``fairseq_smoe.evaluate``) -> means by
direction side (e->x = English source, x->e = English target) and resource group of the
benchmark (``fairseq_smoe.benchmarks``), and several systems side by side with the paper's
numbers::

    python -m fairseq_smoe.report m4 runs/m4/smoe-2-2-2-2/eval runs/m4/moe/eval [--metric spm_bleu]

A RESULT_DIR's system name is its parent folder's name when the folder itself is called
``eval`` (``runs/m4/moe/eval`` -> ``moe``), else its own name; ``NAME=DIR`` sets it.  The
name picks the paper's reference row (the names of ``configs/<bench>/*.conf``).  Averages
are unweighted means over directions, like the authors' ``get_m15_mean.py``; a table is only
printed when every direction of the benchmark was scored (``--allow-partial`` prints means
over what is there and says so).
"""

import argparse
import csv
import os
import sys

from . import benchmarks


class ReportError(RuntimeError):
    pass


def read_scores(path):
    """scores.csv -> {direction: {metric: float or None}}."""
    path = os.path.join(path, "scores.csv") if os.path.isdir(path) else path
    if not os.path.exists(path):
        raise ReportError(f"{path} does not exist; run scripts/evaluate.sh first")
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out[row["direction"]] = {k: (float(v) if v not in ("", None) else None)
                                     for k, v in row.items() if k != "direction"}
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def paper_columns(scores, bench, metric):
    """{column of bench.table_columns(): mean of metric} over the scored directions."""
    value = {d: s.get(metric) for d, s in scores.items()}
    e, cols = bench.english, {}
    for c in bench.table_columns():
        if c == "avg":
            cols[c] = _mean(value.get(d) for d in bench.directions() if d in value)
        elif "_" not in c:  # a direction (M4's per-direction table)
            cols[c] = value.get(c)
        else:
            side, group = c.split("_", 1)
            langs = bench.langs if group == "all" else bench.groups[group]
            dirs = [f"{e}-{l}" if side == "e2x" else f"{l}-{e}" for l in langs]
            cols[c] = _mean(value.get(d) for d in dirs if d in value)
    return cols


def missing_directions(scores, bench):
    return [d for d in bench.directions() if d not in scores]


def _fmt(v):
    return "" if v is None else f"{v:.2f}"


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def grouped_table(scores, bench, metrics):
    """One row per metric, the benchmark's table columns (means over the scored directions)."""
    cols = bench.table_columns()
    rows = []
    for m in metrics:
        if all(s.get(m) is None for s in scores.values()):
            continue
        v = paper_columns(scores, bench, m)
        rows.append([m] + [_fmt(v[c]) for c in cols])
    return markdown(["metric"] + [c.replace("2", "→") for c in cols], rows)


def system_name(spec):
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, path
    path = os.path.normpath(spec)
    base = os.path.basename(path)
    return (os.path.basename(os.path.dirname(path)) if base == "eval" else base), spec


def comparison_table(bench, systems, metric, allow_partial=False):
    """Our systems next to the paper's rows for the same systems, in the paper's layout."""
    cols = bench.table_columns()
    rows, notes = [], []
    for name, scores in systems:
        missing = missing_directions(scores, bench)
        if missing and not allow_partial:
            raise ReportError(
                f"{name}: {len(missing)} of the {len(bench.directions())} {bench.name} directions were "
                f"not scored ({', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}); averages "
                f"would not compare to the paper. Evaluate every direction, or pass --allow-partial."
            )
        if missing:
            notes.append(f"{name}: means over {len(scores)} scored directions; missing: {', '.join(missing)}")
        if all(s.get(metric) is None for s in scores.values()):
            raise ReportError(f"{name}: scores.csv has no {metric!r} values")
        ours = paper_columns(scores, bench, metric)
        rows.append([f"{name} (ours)"] + [_fmt(ours[c]) for c in cols])
        paper = bench.paper.get(name)
        if paper is not None:
            rows.append([f"{name} (paper)"] + [_fmt(paper.get(c)) for c in cols])
        else:
            notes.append(f"{name}: no row of that name in the paper's {bench.paper_table or 'tables'}")
    title = f"{bench.name}: {metric}" + (f"; paper: {bench.paper_table}" if bench.paper_table else "")
    text = f"{title}\n\n" + markdown(["system"] + [c.replace("2", "→") for c in cols], rows)
    return text + "".join(f"\n* {n}" for n in notes) + ("\n" if notes else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench", choices=benchmarks.names())
    p.add_argument("results", nargs="+", help="evaluate.sh OUT_DIRs (or NAME=DIR)")
    p.add_argument("--metric", help="a scores.csv column (default: the paper's metric of the benchmark)")
    p.add_argument("--allow-partial", action="store_true")
    a = p.parse_args(argv)
    bench = benchmarks.get(a.bench)
    try:
        systems = [(name, read_scores(path)) for name, path in map(system_name, a.results)]
        print(comparison_table(bench, systems, a.metric or bench.metric, a.allow_partial))
    except ReportError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
