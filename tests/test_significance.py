"""reproduce_table.sh --baseline: sacreBLEU's paired bootstrap per direction (checked against
sacreBLEU's own CLI and PairedTest), group means bootstrapped from the same resamples, and the
errors that name the fix."""

import csv
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fairseq_smoe import benchmarks, report  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bible"
M4 = benchmarks.get("m4")
N_LINES = 300


def drop_words(lines, p, tag):
    """Each word dropped with probability p (a deterministic stand-in for a worse system)."""
    rng = random.Random(tag)  # str seeds are hashed with SHA-512: the same on every run
    return [" ".join(w for w in line.split() if rng.random() >= p) for line in lines]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """DATA_DIR with raw/test.SRC-TGT.TGT for M4's 8 directions: 300 different real verses each."""
    root = tmp_path_factory.mktemp("sig") / "data"
    (root / "raw").mkdir(parents=True)
    text = [l for f in sorted(FIXTURE.glob("train.*")) for l in f.read_text().splitlines()]
    refs = {}
    for k, d in enumerate(M4.directions()):
        refs[d] = text[k * N_LINES:(k + 1) * N_LINES]
        (root / "raw" / f"test.{d}.{d.split('-')[1]}").write_text("\n".join(refs[d]) + "\n")
    return root, refs


CHRF_DIRECTIONS = ("nso-eng", "tgl-eng", "eng-cat")  # the directions the chrF tests look at


def write_run(path, refs, hyps, chrf=False):
    """A RESULT_DIR as scripts/evaluate.sh leaves it: hyp.SRC-TGT.TGT and scores.csv (chrF
    columns only with ``chrf``, for CHRF_DIRECTIONS: they are slow to compute)."""
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for d, h in hyps.items():
        (path / f"hyp.{d}.{d.split('-')[1]}").write_text("\n".join(h) + "\n")
        r = [refs[d]]
        bleu = sacrebleu.corpus_bleu(h, r).score
        rows.append({"direction": d, "lines": len(h), "bleu": bleu, "spbleu": "",
                     "chrf": sacrebleu.corpus_chrf(h, r).score if chrf and d in CHRF_DIRECTIONS else "",
                     "chrf++": sacrebleu.corpus_chrf(h, r, word_order=2).score if chrf and d in CHRF_DIRECTIONS else "",
                     "spm_bleu": bleu})
    with open(path / "scores.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    _, refs = data
    tmp = tmp_path_factory.mktemp("runs")
    base = {d: drop_words(r, 0.30, f"base/{d}") for d, r in refs.items()}
    better = {d: drop_words(r, 0.25, f"better/{d}") for d, r in refs.items()}

    def fix_one_line(same_position):
        # the baseline with one line per direction replaced by its reference: at line 3 in every
        # direction, or at a different line in each
        out = {}
        for k, (d, h) in enumerate(base.items()):
            i = 3 if same_position else 37 * k + 3
            out[d] = h[:i] + [refs[d][i]] + h[i + 1:]
        return out

    mixed = {d: (better[d] if d.endswith("-eng") else drop_words(refs[d], 0.35, f"worse/{d}")) for d in refs}
    return {
        "base": write_run(tmp / "base", refs, base, chrf=True),
        "better": write_run(tmp / "better", refs, better, chrf=True),
        "fix1": write_run(tmp / "fix1", refs, fix_one_line(same_position=False), chrf=True),
        "fix1-aligned": write_run(tmp / "fix1-aligned", refs, fix_one_line(same_position=True)),
        "mixed": write_run(tmp / "mixed", refs, mixed),
        "copy": write_run(tmp / "copy", refs, base),
    }


def systems(runs, *names, seeds=None):
    seeds = seeds or {}
    return [report.load_system(n, [str(runs[r]) for r in seeds.get(n, [n])]) for n in names]


def bootstrap(data, runs, names, metric="bleu", directions=None, seeds=None):
    return report.paired_bootstrap(M4, systems(runs, *names, seeds=seeds), names[0], metric, str(data[0]),
                                   directions=directions)


@pytest.fixture(scope="module")
def bleu(data, runs):
    """BLEU: every constructed system against base, in one call (one pass over the hypotheses)."""
    return bootstrap(data, runs, ["base", "better", "fix1", "fix1-aligned", "mixed", "copy"])


def test_resampled_sums_are_sacrebleus_gather_sums(data, runs):
    # sacreBLEU sums stats_np[idxs] in float32; our counts @ stats must give the same numbers
    _, refs = data
    d = "nso-eng"
    metric = CHRF(references=[refs[d]])
    stats = metric._extract_corpus_statistics(report.read_lines(runs["base"] / "hyp.nso-eng.eng"), None)
    idxs = np.random.default_rng(12345).choice(N_LINES, size=(1000, N_LINES), replace=True)
    theirs = np.array([s.sum(0) for s in np.array(stats, dtype="float32")[idxs]])
    ours = (report.Resampler().counts(N_LINES) @ np.asarray(stats, dtype=np.float64)).astype(np.float32)
    assert np.array_equal(theirs, ours)


@pytest.mark.parametrize("metric", ["bleu", "chrf", "chrf++"])
def test_direction_p_values_equal_sacrebleu_paired_test(data, runs, metric):
    data_dir, refs = data
    sig = bootstrap(data, runs, ["base", "better", "fix1"], metric, directions=["nso-eng", "eng-cat"])
    make = {"bleu": lambda r: BLEU(references=r), "chrf": lambda r: CHRF(references=r),
            "chrf++": lambda r: CHRF(word_order=2, references=r)}[metric]
    for d in ("nso-eng", "eng-cat"):
        hyp = lambda name: report.read_lines(runs[name] / f"hyp.{d}.{d.split('-')[1]}")
        named = [("base", hyp("base")), ("better", hyp("better")), ("fix1", hyp("fix1"))]
        _, theirs = PairedTest(named, {metric: make([refs[d]])}, references=None, test_type="bs")()
        (key,) = [k for k in theirs if k != "System"]
        base_result, better_result, fix_result = theirs[key]
        for name, result in (("better", better_result), ("fix1", fix_result)):
            ours = sig.directions[name][d]
            assert ours.p == result.p_value  # exactly: same resamples, same arithmetic
            assert ours.system == pytest.approx(result.score, abs=1e-9)
            assert ours.baseline == pytest.approx(base_result.score, abs=1e-9)


def test_p_values_equal_the_sacrebleu_command_line(data, runs):
    data_dir, _ = data
    d = "tgl-eng"
    ref, hyp = data_dir / "raw" / f"test.{d}.eng", lambda n: runs[n] / f"hyp.{d}.eng"
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp("base")), str(hyp("fix1")),
                          str(hyp("better")), "--paired-bs", "-m", "bleu", "chrf", "-f", "text", "--no-color"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr[-2000:]
    # the system rows are followed by a line with one "(p = 0.xxxx)" per metric (BLEU, chrF)
    p_lines = [re.findall(r"\(p = ([\d.]+)\)", l) for l in cli.stdout.splitlines()]
    p_lines = [[float(p) for p in l] for l in p_lines if l]
    assert len(p_lines) == 2
    for metric, column in (("bleu", 0), ("chrf", 1)):
        sig = bootstrap(data, runs, ["base", "fix1", "better"], metric, directions=[d])
        for name, printed in zip(("fix1", "better"), p_lines):
            # printed with 4 decimals; p = k / 1001, so the rounding identifies k exactly
            assert round(printed[column] * 1001) == round(sig.directions[name][d].p * 1001)
    assert p_lines[1] == [0.001, 0.001] and p_lines[0][0] > 0.05  # better: *, fix1: not


def test_a_clear_gain_is_significant_everywhere(bleu):
    for test in bleu.directions["better"].values():
        assert test.delta > 2 and test.p < 0.01 and test.significant(0.05)
    assert bleu.columns["better"]["avg"].p == 1 / 1001  # none of the 1000 resamples comes close


def test_small_gains_in_every_direction_are_significant_as_a_group(bleu):
    # one better sentence per direction: not significant in any single direction, but the same
    # gain in all 8 directions is (the group mean is bootstrapped from the directions' resamples)
    sig = bleu
    per_direction = sig.directions["fix1"].values()
    assert all(0 < t.delta < 0.5 and 0.1 < t.p and not t.significant(0.05) for t in per_direction)
    avg = sig.columns["fix1"]["avg"]
    assert avg.n_directions == 8 and avg.significant(0.05) and avg.p < 0.02
    assert avg.delta == pytest.approx(np.mean([t.delta for t in per_direction]))
    # the M4 table's direction columns are the per-direction tests themselves
    assert sig.columns["fix1"]["nso-eng"] is sig.directions["fix1"]["nso-eng"]


def test_directions_of_equal_size_share_resampled_lines(bleu):
    # sacreBLEU's fixed seed draws the same line numbers for every test set of N lines, so the
    # same line fixed in every direction moves together in every resample (right for multi-way
    # parallel test sets): the group is then no more significant than one direction
    avg = bleu.columns["fix1-aligned"]["avg"]
    assert not avg.significant(0.05) and avg.p > 0.05


def test_opposite_gains_cancel_in_the_group_mean(bleu):
    tests = bleu.directions["mixed"]
    assert all(tests[d].delta > 2 and tests[d].significant(0.05) for d in M4.directions() if d.endswith("-eng"))
    assert all(tests[d].delta < -2 and tests[d].significant(0.05) for d in M4.directions() if d.startswith("eng-"))
    avg = bleu.columns["mixed"]["avg"]
    assert abs(avg.delta) < 1 and avg.p > 0.1 and not avg.significant(0.05)


def test_identical_systems_are_not_significant(bleu):
    # sacreBLEU 2.6.0 returns p = 1/1001 for two identical outputs (every resampled difference
    # is 0): the same p here, but no '*'
    for test in list(bleu.directions["copy"].values()) + [bleu.columns["copy"]["avg"]]:
        assert test.delta == 0 and test.p == 1 / 1001 and not test.significant(0.05)
    text = report.significance_table(M4, bleu)
    assert "+0.00 (p = 0.0010) |" in text and "no difference at all" in text


def test_seed_runs_are_averaged_on_the_same_resamples(data, runs, bleu):
    one, dirs = bleu, ["nso-eng", "eng-cat"]
    # two seed runs with the same output (copy = base): the same scores and p-values as one run
    twice = bootstrap(data, runs, ["base", "better"], seeds={"base": ["base", "copy"]}, directions=dirs)
    for d, t in twice.directions["better"].items():
        assert t.p == one.directions["better"][d].p and t.baseline == one.directions["better"][d].baseline
    # two different seeds: the system's score is the mean of its runs' scores
    pooled = bootstrap(data, runs, ["base", "sys"], seeds={"sys": ["better", "fix1"]}, directions=dirs)
    for d, t in pooled.directions["sys"].items():
        assert t.system == pytest.approx((one.directions["better"][d].system + one.directions["fix1"][d].system) / 2)
        assert t.significant(0.05)


def test_cli_table_with_baseline(data, runs, capsys):
    report.main(["m4", f"moe={runs['base']}", f"smoe-2-2-2-2={runs['better']}", "--baseline", "moe",
                 "--data", str(data[0]), "--metric", "bleu"])
    out = capsys.readouterr().out
    assert "| smoe-2-2-2-2 (ours) |" in out and "| smoe-2-2-2-2 (paper) | 30.96 |" in out
    assert "Paired bootstrap resampling against moe (bleu; sacreBLEU --paired-bs: 1000 resamples, seed 12345)" in out
    row = next(l for l in out.splitlines() if l.startswith("| smoe-2-2-2-2 − moe |"))
    assert row.count(")*") == 9 and row.endswith("(p = 0.0010)* |")  # 8 directions, and avg
    assert re.search(r"\| nso-eng \| \d+\.\d\d \| \d+\.\d\d \| \+\d+\.\d\d \(p = 0\.0\d\d\d\)\* \|", out)


def test_errors_name_the_fix(data, runs, tmp_path):
    data_dir, refs = data
    two = systems(runs, "base", "better")
    one = ["nso-eng"]
    with pytest.raises(report.ReportError, match=r"--baseline 'dense' is not one of the systems in the table "
                                                 r"\(base, better\)"):
        report.paired_bootstrap(M4, two, "dense", "bleu", str(data_dir))
    with pytest.raises(report.ReportError, match="pass --data DATA_DIR"):
        report.paired_bootstrap(M4, two, "base", "bleu", None)
    with pytest.raises(report.ReportError, match=r"no paired bootstrap for 'spm_bleu'.*pass e.g. --metric bleu"):
        report.paired_bootstrap(M4, two, "base", "spm_bleu", str(data_dir))
    # hypotheses of another test set: the line count, then the score check, catch it
    short = write_run(tmp_path / "short", {d: r[:-1] for d, r in refs.items()},
                      {d: r[:-1] for d, r in refs.items()})
    with pytest.raises(report.ReportError, match=r"has 299 lines but the reference .* has 300; is --data"):
        report.paired_bootstrap(M4, [two[0], report.load_system("short", [str(short)])], "base", "bleu",
                                str(data_dir), directions=one)
    stale = write_run(tmp_path / "stale", refs, {d: drop_words(r, 0.5, d) for d, r in refs.items()})
    (stale / "hyp.nso-eng.eng").write_text("\n".join(refs["nso-eng"]) + "\n")  # not what scores.csv scored
    with pytest.raises(report.ReportError, match=r"scores 100\.0000 against .* but its scores.csv says"):
        report.paired_bootstrap(M4, [two[0], report.load_system("stale", [str(stale)])], "base", "bleu",
                                str(data_dir), directions=one)
    (runs["copy"] / "hyp.nso-eng.eng").rename(tmp_path / "moved")
    try:
        with pytest.raises(report.ReportError, match=r"hyp.nso-eng.eng is missing; scripts/evaluate.sh writes it"):
            bootstrap(data, runs, ["base", "copy"], directions=one)
    finally:
        (tmp_path / "moved").rename(runs["copy"] / "hyp.nso-eng.eng")
    with pytest.raises(SystemExit, match="--data is only used with --baseline"):
        report.main(["m4", str(runs["base"]), "--data", str(data_dir)])


def test_worker_processes_give_the_same_results(data, runs, bleu):
    names = ["base", "better", "fix1", "fix1-aligned", "mixed", "copy"]
    dirs = ["nso-eng", "eng-cat", "tgl-eng"]
    parallel = report.paired_bootstrap(M4, systems(runs, *names), "base", "bleu", str(data[0]), directions=dirs, jobs=2)
    for name in names[1:]:
        for d in dirs:
            assert parallel.directions[name][d] == bleu.directions[name][d]
    (runs["copy"] / "hyp.eng-cat.cat").rename(runs["copy"] / "moved")
    try:  # an error in a worker reaches the caller as the same ReportError
        with pytest.raises(report.ReportError, match=r"copy: .*hyp.eng-cat.cat is missing"):
            report.paired_bootstrap(M4, systems(runs, *names), "base", "bleu", str(data[0]), directions=dirs, jobs=2)
    finally:
        (runs["copy"] / "moved").rename(runs["copy"] / "hyp.eng-cat.cat")
