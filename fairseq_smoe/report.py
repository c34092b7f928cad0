"""Score tables in the paper's layout, with seeds and significance.

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

Seeds (``--seeds``): the runs of one system are grouped by system name: ``NAME=DIR1,DIR2,...``,
``NAME=DIR`` given several times, or by folder name, where a folder called ``seedN`` takes its
parent's name and a trailing ``-seedN`` / ``_seedN`` / ``.seedN`` is dropped
(``runs/m4/moe-seed2/eval`` and ``runs/m4/moe/seed2/eval`` are both ``moe``).  Every cell is
then ``mean ± std`` over the runs of that column's value (each run's own mean over the column's
directions; std = sample standard deviation, n-1), with n next to the system name.  All runs
of a system must have been scored on the same directions with the same number of test lines.

Significance (``--baseline SYSTEM --data DATA_DIR``): sacreBLEU's paired bootstrap resampling
(``sacrebleu --paired-bs``) of every other system against SYSTEM, per direction, from the
hypotheses ``hyp.SRC-TGT.TGT`` that ``evaluate.sh`` leaves in each RESULT_DIR and the
references ``DATA_DIR/raw/test.SRC-TGT.TGT``.  See :func:`paired_bootstrap` for exactly what is
computed.
"""

import argparse
import csv
import os
import re
import statistics
import sys
from dataclasses import dataclass, field

import numpy as np

from . import benchmarks
from . import errors
from .errors import UserError


class ReportError(UserError, RuntimeError):
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


def column_directions(bench, column):
    """The directions whose unweighted mean is the value of a table column."""
    e = bench.english
    if column == "avg":
        return bench.directions()
    if "_" not in column:  # a direction (M4's per-direction table)
        return [column]
    side, group = column.split("_", 1)
    langs = bench.langs if group == "all" else bench.groups[group]
    return [f"{e}-{l}" if side == "e2x" else f"{l}-{e}" for l in langs]


def paper_columns(scores, bench, metric):
    """{column of bench.table_columns(): mean of metric} over the scored directions."""
    value = {d: s.get(metric) for d, s in scores.items()}
    return {c: _mean(value.get(d) for d in column_directions(bench, c) if d in value)
            for c in bench.table_columns()}


def missing_directions(scores, bench):
    return [d for d in bench.directions() if d not in scores]


def _fmt(v):
    return "" if v is None else f"{v:.2f}"


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _header(cols):
    return [c.replace("2", "→") for c in cols]


def grouped_table(scores, bench, metrics):
    """One row per metric, the benchmark's table columns (means over the scored directions)."""
    cols = bench.table_columns()
    rows = []
    for m in metrics:
        if all(s.get(m) is None for s in scores.values()):
            continue
        v = paper_columns(scores, bench, m)
        rows.append([m] + [_fmt(v[c]) for c in cols])
    return markdown(["metric"] + _header(cols), rows)


# ----------------------------------------------------------------------------------------
# systems and their seed runs

SEED_FOLDER = re.compile(r"^seed\d+$")
SEED_SUFFIX = re.compile(r"[-_.]seed\d+$")


def system_name(spec, seeds=False):
    """``NAME=DIR`` or ``DIR`` -> (name, DIR).  With ``seeds`` the folder-name convention of
    seed runs applies (a ``seedN`` folder takes its parent's name; ``-seedN`` is dropped)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, path
    path = os.path.normpath(spec)
    parts = path.split(os.sep)
    if parts[-1] == "eval" and len(parts) > 1:
        parts = parts[:-1]
    if seeds and SEED_FOLDER.match(parts[-1]) and len(parts) > 1:
        parts = parts[:-1]
    name = parts[-1]
    return (SEED_SUFFIX.sub("", name) if seeds else name), spec


def group_systems(specs, seeds=False):
    """Command-line result specs -> [(name, [DIR, ...])] in order of first appearance.

    Without ``seeds`` every system has exactly one run; a name given twice or a comma list of
    directories is refused (it is a seed group: pass --seeds)."""
    order, runs = [], {}
    for spec in specs:
        name, paths = system_name(spec, seeds)
        paths = [p for p in paths.split(",") if p] if "=" in spec else [paths]
        if not paths:
            raise ReportError(f"{spec}: no result directory after '='")
        if name not in runs:
            order.append(name)
            runs[name] = []
        runs[name] += paths
    if not seeds:
        for name in order:
            if len(runs[name]) > 1:
                raise ReportError(
                    f"system {name!r} has {len(runs[name])} result directories ({', '.join(runs[name])}); "
                    f"pass --seeds to show them as seed runs of one system (mean ± std), or give "
                    f"each its own name with NAME=DIR")
    for name in order:
        seen = set()
        for path in runs[name]:
            if os.path.normpath(path) in seen:
                raise ReportError(f"system {name!r}: {path} is given more than once")
            seen.add(os.path.normpath(path))
    return [(name, runs[name]) for name in order]


@dataclass
class System:
    """One system: its runs (one per training seed), each a (RESULT_DIR, scores) pair."""

    name: str
    runs: list = field(default_factory=list)

    @property
    def n(self):
        return len(self.runs)

    @property
    def directions(self):
        return list(self.runs[0][1])


def load_system(name, paths):
    return check_seed_runs(System(name, [(p, read_scores(p)) for p in paths]))


def check_seed_runs(system, metric=None):
    """All runs of a system must cover the same directions with the same test sizes (and,
    given ``metric``, have that metric for the same directions); else their means differ in
    what they average, not in how good the runs are."""
    if system.n < 2:
        return system
    union = list(dict.fromkeys(d for _, s in system.runs for d in s))  # in scores.csv order
    problems = []
    for path, scores in system.runs:
        lacks = [d for d in union if d not in scores]
        if lacks:
            problems.append(f"{path} lacks {', '.join(lacks[:6])}{' ...' if len(lacks) > 6 else ''}")
    if problems:
        raise ReportError(
            f"{system.name}: its {system.n} seed runs were scored on different directions ({'; '.join(problems)}); "
            f"evaluate every run on the same directions (scripts/evaluate.sh) before averaging them")
    for d in union:
        lines = [s[d].get("lines") for _, s in system.runs]
        if len(set(lines)) > 1:
            sizes = ", ".join(f"{p}: {n if n is None else int(n)}" for (p, _), n in zip(system.runs, lines))
            raise ReportError(
                f"{system.name}: its seed runs were scored on {d} test sets of different sizes "
                f"({sizes} lines); "
                f"evaluate every run on the same prepared DATA_DIR")
        if metric is not None:
            have = [p for p, s in system.runs if s[d].get(metric) is not None]
            if have and len(have) < system.n:
                lack = [p for p, _ in system.runs if p not in have]
                raise ReportError(
                    f"{system.name}: {metric} of {d} is in the scores.csv of {', '.join(have)} but empty in "
                    f"{', '.join(lack)}; re-run scripts/evaluate.sh there (or choose another --metric)")
    return system


def _as_system(item):
    """comparison_table accepts System objects or (name, scores) / (name, [scores, ...])."""
    if isinstance(item, System):
        return item
    name, scores = item
    runs = scores if isinstance(scores, list) else [scores]
    return check_seed_runs(System(name, [(f"{name}#{i + 1}", s) for i, s in enumerate(runs)]))


def mean_std(values):
    """(mean, sample std or None for one value) of the non-None values; (None, None) if none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt_ms(mean, std):
    if mean is None:
        return ""
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def system_columns(system, bench, metric):
    """{column: (mean over runs, std over runs)} of each run's paper_columns."""
    per_run = [paper_columns(s, bench, metric) for _, s in system.runs]
    return {c: mean_std([r[c] for r in per_run]) for c in bench.table_columns()}


def comparison_table(bench, systems, metric, allow_partial=False, seeds=False):
    """Our systems next to the paper's rows for the same systems, in the paper's layout.

    ``systems``: :class:`System` objects (or ``(name, scores)`` pairs).  With ``seeds`` each
    row is labelled with its number of runs n and each cell is ``mean ± std`` over them."""
    cols = bench.table_columns()
    rows, notes = [], []
    for system in map(_as_system, systems):
        name, scores = system.name, system.runs[0][1]
        check_seed_runs(system, metric)
        missing = missing_directions(scores, bench)
        if missing and not allow_partial:
            raise ReportError(
                f"{name}: {len(missing)} of the {len(bench.directions())} {bench.name} directions were "
                f"not scored ({', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}); averages "
                f"would not compare to the paper. Evaluate every direction, or pass --allow-partial."
            )
        if missing:
            more = f" ... ({len(missing) - 12} more)" if len(missing) > 12 else ""
            notes.append(f"{name}: means over {len(scores)} scored directions; missing: {', '.join(missing[:12])}{more}")
        for path, run in system.runs:
            if all(s.get(metric) is None for s in run.values()):
                where = f"the scores.csv of {path}" if system.n > 1 else "scores.csv"
                raise ReportError(f"{name}: {where} has no {metric!r} values")
        ours = system_columns(system, bench, metric)
        label = f"{name} (ours, n={system.n})" if seeds else f"{name} (ours)"
        rows.append([label] + [_fmt_ms(*ours[c]) for c in cols])
        paper = bench.paper.get(name)
        if paper is not None:
            rows.append([f"{name} (paper)"] + [_fmt(paper.get(c)) for c in cols])
        else:
            notes.append(f"{name}: no row of that name in the paper's {bench.paper_table or 'tables'}")
    if seeds:
        notes.insert(0, "ours: mean ± sample standard deviation (n-1) over n training seeds of each column's "
                        "value (each seed's own unweighted mean over the column's directions)")
    title = f"{bench.name}: {metric}" + (f"; paper: {bench.paper_table}" if bench.paper_table else "")
    text = f"{title}\n\n" + markdown(["system"] + _header(cols), rows)
    return text + "".join(f"\n* {n}" for n in notes) + ("\n" if notes else "")


# ----------------------------------------------------------------------------------------
# paired bootstrap resampling (sacreBLEU's --paired-bs)

# sacreBLEU 2.6.0's defaults for --paired-bs: --paired-bs-n 1000 and SACREBLEU_SEED 12345
# (significance.PairedTest); its output marks p <= 0.05 with '*' (utils._format_score_lines).
PAIRED_BS_N = 1000
PAIRED_BS_SEED = 12345
ALPHA = 0.05
NO_DIFFERENCE = 1e-9  # score points; a group mean of identical scores in another order differs by ~1e-15
EXACT_FLOAT32 = 2 ** 24  # sacreBLEU sums resampled statistics in float32: exact below this


def sacrebleu_metric(metric, refs):
    """The sacreBLEU metric object behind a scores.csv column, as fairseq_smoe.evaluate.score
    computes it (default arguments), with ``refs`` cached."""
    from sacrebleu.metrics import BLEU, CHRF

    make = {
        "bleu": lambda: BLEU(references=[refs]),
        "spbleu": lambda: BLEU(tokenize="flores200", references=[refs]),
        "chrf": lambda: CHRF(references=[refs]),
        "chrf++": lambda: CHRF(word_order=2, references=[refs]),
    }
    if metric not in make:
        why = (" (fairseq's BLEU over SentencePiece ids, which evaluate.sh does not keep per sentence)"
               if metric == "spm_bleu" else "")
        raise ReportError(
            f"--baseline: no paired bootstrap for {metric!r}{why}; significance is computed for the "
            f"sacreBLEU metrics {', '.join(make)}: pass e.g. --metric bleu or --metric chrf")
    try:
        return make[metric]()
    except (Exception, SystemExit) as err:  # sacreBLEU exits when the flores200 model cannot be fetched
        raise ReportError(
            f"cannot build sacreBLEU's {metric} ({type(err).__name__}: {err})"
            + ("; spbleu needs sacreBLEU's flores200 SentencePiece model: run scripts/evaluate.sh once with "
               "--flores200-spm PATH, which installs it" if metric == "spbleu" else "")) from err


def read_lines(path):
    """Lines split on '\\n' only (a CR before the LF dropped), as evaluate.py and data_prep read them."""
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n").removesuffix("\r") for line in f]


class Resampler:
    """sacreBLEU's paired bootstrap resamples for a test set of N lines, as count matrices.

    ``sacrebleu --paired-bs`` draws ``default_rng(12345).choice(N, size=(1000, N))`` (one seed
    for every system) and scores each resample from the summed per-sentence statistics.  Here
    resample b's sums are ``counts[b] @ stats`` (counts[b, i] = how often line i was drawn):
    the same integers, in one matrix product instead of a [1000, N, k] gather."""

    def __init__(self, n_samples=PAIRED_BS_N, seed=PAIRED_BS_SEED):
        self.n_samples, self.seed = n_samples, seed
        self._counts = {}

    def counts(self, n_lines):
        if n_lines not in self._counts:
            if len(self._counts) >= 4:  # 1000 x N float64 each; test sets of few sizes recur
                self._counts.pop(next(iter(self._counts)))
            rng = np.random.default_rng(self.seed)
            idxs = rng.choice(n_lines, size=(self.n_samples, n_lines), replace=True)
            flat = (np.arange(self.n_samples)[:, None] * n_lines + idxs).ravel()
            counts = np.bincount(flat, minlength=self.n_samples * n_lines)
            self._counts[n_lines] = counts.reshape(self.n_samples, n_lines).astype(np.float64)
        return self._counts[n_lines]

    def scores(self, metric, stats):
        """Per-sentence sufficient statistics -> (corpus score, resampled scores, exact).

        The corpus score and every resample's score come from sacreBLEU's own
        ``_aggregate_and_compute`` / ``_compute_score_from_stats`` on the same float32 sums as
        sacreBLEU's ``_paired_bs_test`` (``exact``: the sums are below 2**24, where float32
        holds them exactly, so sacreBLEU's own sums are the same numbers)."""
        actual = float(metric._aggregate_and_compute(stats).score)
        sums = self.counts(len(stats)) @ np.asarray(stats, dtype=np.float64)
        exact = bool(sums.max(initial=0) < EXACT_FLOAT32)
        resampled = np.array([metric._compute_score_from_stats(s).score for s in sums.astype(np.float32)])
        return actual, resampled, exact


def paired_bs_p_value(sys_score, base_score, sys_resampled, base_resampled):
    """sacreBLEU's paired bootstrap p-value (``significance._paired_bs_test``): the observed
    |difference| against the resampled |differences| shifted to mean 0, with add-one:
    p = (1 + #{b: |d_b| - mean_b |d_b| > |d|}) / (1 + resamples)."""
    diff = abs(base_score - sys_score)
    sample_diffs = np.abs(sys_resampled - base_resampled)
    stats = sample_diffs - sample_diffs.mean()
    return (np.sum(stats > diff).item() + 1) / (len(stats) + 1)


@dataclass
class Comparison:
    """One paired test: a direction or a table column, a system against the baseline."""

    system: float  # the system's score (mean over its runs)
    baseline: float
    p: float
    n_directions: int = 1

    @property
    def delta(self):
        return self.system - self.baseline

    def significant(self, alpha):
        """p <= alpha (sacreBLEU's '*'), and a difference at all: for two identical systems every
        resampled difference is 0 and sacreBLEU 2.6.0 still returns p = 1/(n+1)."""
        return self.p <= alpha and abs(self.delta) > NO_DIFFERENCE


@dataclass
class Significance:
    baseline: str
    metric: str
    n_samples: int
    alpha: float
    directions: dict  # system -> {direction: Comparison}
    columns: dict  # system -> {table column: Comparison}
    notes: list


def _direction_scores(job):
    """One direction's work (a process-pool job): {system: (score, resampled scores)}, and
    whether every resampled sum was exact in float32.

    ``job`` = (direction, data_dir, metric name, n_samples, seed,
    [(system, [(RESULT_DIR, scores.csv value or None), ...]), ...]).  A system's score is the
    mean over its runs of each run's corpus score, its b-th resampled score the mean of its
    runs' b-th resampled scores (every run resampled with the same lines)."""
    direction, data_dir, metric_name, n_samples, seed, systems = job
    tgt = direction.split("-")[1]
    ref_file = os.path.join(data_dir, "raw", f"test.{direction}.{tgt}")
    if not os.path.exists(ref_file):
        raise ReportError(f"the reference {ref_file} does not exist; is --data the DATA_DIR the systems "
                          f"were evaluated on (scripts/prepare_data.sh writes raw/test.SRC-TGT.TGT)?")
    refs = read_lines(ref_file)
    metric = sacrebleu_metric(metric_name, refs)
    resampler = _resampler(n_samples, seed)
    out, all_exact = {}, True
    for name, runs in systems:
        scores, resampled = [], []
        for path, recorded in runs:
            hyp_file = os.path.join(path, f"hyp.{direction}.{tgt}")
            if not os.path.exists(hyp_file):
                raise ReportError(f"{name}: {hyp_file} is missing; scripts/evaluate.sh writes it "
                                  f"(re-run it for that result directory)")
            hyps = read_lines(hyp_file)
            if len(hyps) != len(refs):
                raise ReportError(
                    f"{name}: {hyp_file} has {len(hyps)} lines but the reference {ref_file} has "
                    f"{len(refs)}; is --data the DATA_DIR it was evaluated on?")
            actual, res, exact = resampler.scores(metric, metric._extract_corpus_statistics(hyps, None))
            if recorded is not None and abs(recorded - actual) > 1e-4:
                raise ReportError(
                    f"{name}: {hyp_file} scores {actual:.4f} against {ref_file}, but its scores.csv says "
                    f"{recorded:.4f}; is --data the DATA_DIR it was evaluated on, and are the hypotheses "
                    f"those of that scores.csv?")
            all_exact &= exact
            scores.append(actual)
            resampled.append(res)
        if len(scores) == 1:  # exactly sacreBLEU's numbers (float32 for chrF, as it computes them)
            out[name] = scores[0], resampled[0]
        else:
            out[name] = statistics.fmean(scores), np.mean(np.stack(resampled).astype(np.float64), axis=0)
    return direction, out, all_exact


_RESAMPLERS = {}


def _resampler(n_samples, seed):
    key = (n_samples, seed)
    if key not in _RESAMPLERS:
        _RESAMPLERS.clear()
        _RESAMPLERS[key] = Resampler(n_samples, seed)
    return _RESAMPLERS[key]


def paired_bootstrap(bench, systems, baseline, metric_name, data_dir, n_samples=PAIRED_BS_N,
                     alpha=ALPHA, directions=None, progress=False, jobs=1):
    """Paired bootstrap resampling of every system against ``baseline``, per direction and
    per column of the benchmark's table.

    Per direction (exactly ``sacrebleu REF -i BASE SYS --paired-bs`` on that direction's test
    set): resample b draws N test lines with replacement, ``default_rng(12345).choice(N, (n, N))``
    (n = 1000), the same lines for every system; each system is scored on each resample from its
    per-sentence sacreBLEU statistics; with d = the observed score difference and d_b the
    resampled ones, p = (1 + #{b: |d_b| - mean(|d_b|) > |d|}) / (n + 1).

    Per table column (a resource group's mean, or avg): the b-th resample of a system's column
    value is the unweighted mean over the column's directions of their b-th resampled scores,
    so each direction keeps its own test set and its sacreBLEU resamples (directions with test
    sets of equal size draw the same line numbers, which for multi-way parallel test sets
    resamples the same source sentences in every direction); p from the column means the same
    way.  Significant: p <= alpha (sacreBLEU marks p <= 0.05 with '*').

    A system with several runs (seeds) is scored by the mean over its runs of each run's score
    on the same resample: the p-value then covers the resampling of test sentences, not the
    variance between training seeds (the ± std of the table shows that).

    ``directions``: the directions to test (default: every direction the baseline was scored on).
    ``jobs``: worker processes, one direction at a time each (the results do not depend on it)."""
    systems = [_as_system(s) for s in systems]
    names = [s.name for s in systems]
    if baseline not in names:
        raise ReportError(f"--baseline {baseline!r} is not one of the systems in the table "
                          f"({', '.join(names)}); pass one of those names (see NAME=DIR)")
    base = systems[names.index(baseline)]
    others = [s for s in systems if s.name != baseline]
    if not others:
        raise ReportError(f"--baseline {baseline!r}: there is no other system to compare it with")
    if not data_dir or not os.path.isdir(os.path.join(data_dir, "raw")):
        raise ReportError(
            "--baseline needs the test references: pass --data DATA_DIR, the prepared directory given to "
            "scripts/evaluate.sh (it holds raw/test.SRC-TGT.TGT)"
            + (f"; {data_dir}/raw does not exist" if data_dir else ""))
    directions = list(directions or base.directions)
    for s in others:
        lack = [d for d in directions if d not in s.runs[0][1]]
        if lack:
            raise ReportError(f"{s.name} was not scored on {', '.join(lack[:6])}, which the baseline "
                              f"{baseline} was; a paired test needs both systems' hypotheses for every direction")
    jobs_in = [(d, data_dir, metric_name, n_samples, PAIRED_BS_SEED,
                [(s.name, [(path, table.get(d, {}).get(metric_name)) for path, table in s.runs]) for s in systems])
               for d in directions]
    sacrebleu_metric(metric_name, [""])  # a wrong metric name fails here, before any work
    resampled = {s.name: {} for s in systems}
    inexact = []
    pool = None
    if jobs > 1 and len(directions) > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(min(jobs, len(directions)))
    try:
        done = pool.imap(_direction_scores, jobs_in) if pool else map(_direction_scores, jobs_in)
        for i, (d, scores, exact) in enumerate(done):
            if progress and len(directions) >= 20 and (i + 1) % max(1, len(directions) // 10) == 0:
                print(f"paired bootstrap: {i + 1}/{len(directions)} directions", file=sys.stderr, flush=True)
            for name, value in scores.items():
                resampled[name][d] = value
            if not exact:
                inexact.append(d)
    finally:
        if pool:
            pool.terminate()
    results = {s.name: {} for s in others}
    for d in directions:
        b_score, b_res = resampled[baseline][d]
        for s in others:
            score, res = resampled[s.name][d]
            results[s.name][d] = Comparison(score, b_score, paired_bs_p_value(score, b_score, res, b_res))
    columns = {s.name: {} for s in others}
    for c in bench.table_columns():
        dirs = [d for d in column_directions(bench, c) if d in resampled[baseline]]
        if not dirs:
            continue
        if len(dirs) == 1:  # a direction column (M4), or a group with one scored direction
            for s in others:
                columns[s.name][c] = results[s.name][dirs[0]]
            continue
        mean_of = lambda name: (statistics.fmean(resampled[name][d][0] for d in dirs),
                                np.mean([resampled[name][d][1].astype(np.float64) for d in dirs], axis=0))
        b_score, b_res = mean_of(baseline)
        for s in others:
            score, res = mean_of(s.name)
            columns[s.name][c] = Comparison(score, b_score, paired_bs_p_value(score, b_score, res, b_res), len(dirs))
    notes = []
    partial = [f"{c} over {t.n_directions} of {len(column_directions(bench, c))}"
               for c, t in next(iter(columns.values())).items() if t.n_directions < len(column_directions(bench, c))]
    if partial:
        notes.append(f"group tests over the scored directions only: {', '.join(partial)}")
    if inexact:
        notes.append(f"{', '.join(inexact)}: resampled statistics reach 2**24, where sacreBLEU's float32 "
                     f"sums round; ours are exact, so p-values may differ slightly from `sacrebleu --paired-bs`")
    return Significance(baseline, metric_name, n_samples, alpha, results, columns, notes)


def _fmt_test(t, alpha):
    if t is None:
        return ""
    return f"{t.delta:+.2f} (p = {t.p:.4f})" + ("*" if t.significant(alpha) else "")


def significance_table(bench, sig, seeds=False):
    """The table columns' differences to the baseline with their p-values, then every direction."""
    cols = bench.table_columns()
    rows = [[f"{name} − {sig.baseline}"] + [_fmt_test(tests.get(c), sig.alpha) for c in cols]
            for name, tests in sig.columns.items()]
    text = (f"Paired bootstrap resampling against {sig.baseline} ({sig.metric}; sacreBLEU --paired-bs: "
            f"{sig.n_samples} resamples, seed {PAIRED_BS_SEED}); Δ = system − baseline, "
            f"* = p ≤ {sig.alpha:g}\n\n" + markdown(["system"] + _header(cols), rows))
    directions = list(next(iter(sig.directions.values())))
    header = ["direction", sig.baseline]
    for name in sig.directions:
        header += [name, "Δ (p)"]
    body = []
    for d in directions:
        row = [d, f"{next(iter(sig.directions.values()))[d].baseline:.2f}"]
        for name, tests in sig.directions.items():
            row += [f"{tests[d].system:.2f}", _fmt_test(tests[d], sig.alpha)]
        body.append(row)
    text += f"\nPer direction ({sig.metric})\n\n" + markdown(header, body)
    notes = [
        "per direction: sacreBLEU's paired bootstrap on that direction's test set (the same resampled lines for "
        "every system); p = (1 + #{b: |Δ_b| − mean_b|Δ_b| > |Δ|}) / (resamples + 1)",
        "group columns: resample b of a group mean = the mean over its directions of their resample-b scores; "
        "p the same way",
    ]
    if seeds:
        notes.append("systems with several seeds: score = the mean over seeds on the same resample; p reflects "
                     "test-set resampling only, not seed variance (see ± std above)")
    same = [f"{name} {k}" for name, tests in list(sig.directions.items()) + list(sig.columns.items())
            for k, t in tests.items() if abs(t.delta) <= NO_DIFFERENCE and t.p <= sig.alpha]
    if same:
        notes.append(f"no difference at all ({', '.join(sorted(set(same))[:8])}{' ...' if len(set(same)) > 8 else ''}): "
                     f"every resampled difference is 0, for which sacreBLEU's --paired-bs reports "
                     f"p = 1/(resamples + 1); not marked significant")
    notes += sig.notes
    return text + "".join(f"\n* {n}" for n in notes) + "\n"


@errors.cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench", choices=benchmarks.names())
    p.add_argument("results", nargs="+", help="evaluate.sh OUT_DIRs (or NAME=DIR, NAME=DIR1,DIR2,... with --seeds)")
    p.add_argument("--metric", help="a scores.csv column (default: the paper's metric of the benchmark)")
    p.add_argument("--allow-partial", action="store_true")
    p.add_argument("--seeds", action="store_true",
                   help="group results of the same system name as seed runs: mean ± std over them")
    p.add_argument("--baseline", metavar="SYSTEM",
                   help="paired bootstrap resampling (sacreBLEU --paired-bs) of every system against SYSTEM")
    p.add_argument("--data", metavar="DATA_DIR", help="the prepared DATA_DIR the systems were evaluated on "
                   "(its raw/test.SRC-TGT.TGT are the references); needed by --baseline")
    p.add_argument("--paired-bs-n", type=int, default=PAIRED_BS_N, help="bootstrap resamples (sacreBLEU's default)")
    p.add_argument("--alpha", type=float, default=ALPHA, help="significance level: p <= alpha is marked '*'")
    p.add_argument("--jobs", type=int, default=1, help="processes for --baseline, one direction each at a time "
                   "(sacreBLEU's per-sentence statistics are most of the time)")
    a = p.parse_args(argv)
    bench = benchmarks.get(a.bench)
    metric = a.metric or bench.metric
    if a.data and not a.baseline:
        raise ReportError("--data is only used with --baseline SYSTEM")
    if a.paired_bs_n < 1:
        raise ReportError(f"--paired-bs-n must be at least 1 (sacreBLEU's default: {PAIRED_BS_N})")
    if not 0 < a.alpha < 1:
        raise ReportError(f"--alpha {a.alpha} is not a significance level between 0 and 1 (default {ALPHA})")
    if a.jobs < 1:
        raise ReportError("--jobs must be at least 1")
    systems = [load_system(name, paths) for name, paths in group_systems(a.results, a.seeds)]
    text = comparison_table(bench, systems, metric, a.allow_partial, a.seeds)
    if a.baseline:
        sig = paired_bootstrap(bench, systems, a.baseline, metric, a.data, a.paired_bs_n, a.alpha,
                               progress=True, jobs=a.jobs)
        text += "\n" + significance_table(bench, sig, a.seeds)
    print(text)


if __name__ == "__main__":
    main()
