"""Score tables in the paper's layout: group means, paper rows, missing directions, spBLEU."""

import csv
import statistics
import sys
from pathlib import Path

import pytest
import sacrebleu
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fairseq_smoe import benchmarks, evaluate, report  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bible"


def write_scores(path, values):
    """scores.csv with the given {direction: spm_bleu} (other metrics derived from it)."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "scores.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=evaluate.COLUMNS)
        w.writeheader()
        for d, v in values.items():
            w.writerow({"direction": d, "lines": 10, "bleu": v / 2, "spbleu": "", "chrf": v + 1,
                        "chrf++": v, "spm_bleu": v, "copy_chrf": 1.0, "rc_enc": 1.5, "rc_dec": 1.5})
    return path


@pytest.mark.parametrize("name", ["m4", "m15", "opus100", "bible"])
def test_groups_partition_the_languages(name):
    b = benchmarks.get(name)
    members = [l for g in b.groups.values() for l in g]
    assert sorted(members) == sorted(b.langs) and len(set(members)) == len(members)
    assert len(b.directions()) == 2 * len(b.langs)


def test_paper_numbers_are_self_consistent():
    # catches transcription typos: the paper's averages must follow from its other columns
    for row in benchmarks.get("m4").paper.values():
        assert statistics.mean(v for k, v in row.items() if k != "avg") == pytest.approx(row["avg"], abs=0.011)
    for row in benchmarks.get("m15").paper.values():  # groups have 5 languages each
        for side in ("e2x", "x2e"):
            groups = [row[f"{side}_{g}"] for g in ("high", "low", "very-low")]
            assert statistics.mean(groups) == pytest.approx(row[f"{side}_all"], abs=0.011)
        assert (row["e2x_all"] + row["x2e_all"]) / 2 == pytest.approx(row["avg"], abs=0.011)
    for row in benchmarks.get("opus100").paper.values():
        assert (row["e2x_all"] + row["x2e_all"]) / 2 == pytest.approx(row["avg"], abs=0.011)


def test_m15_group_means(tmp_path):
    b = benchmarks.get("m15")
    values = {d: float(i) for i, d in enumerate(b.directions())}
    cols = report.paper_columns(report.read_scores(write_scores(tmp_path, values)), b, "spm_bleu")
    high_e2x = [values[f"eng-{l}"] for l in ("ind", "msa", "isl", "slv", "tgl")]
    assert cols["e2x_high"] == pytest.approx(statistics.mean(high_e2x))
    assert cols["x2e_very-low"] == pytest.approx(statistics.mean(values[f"{l}-eng"] for l in ("ssw", "fao", "fur", "ltz", "lim")))
    assert cols["avg"] == pytest.approx(statistics.mean(values.values()))


def test_comparison_table_has_paper_rows_and_refuses_partial_results(tmp_path):
    b = benchmarks.get("m4")
    full = write_scores(tmp_path / "smoe-2-2-2-2" / "eval", {d: 30.0 for d in b.directions()})
    part = write_scores(tmp_path / "moe", {d: 20.0 for d in b.directions()[:5]})
    systems = [report.system_name(str(full)), report.system_name(f"moe={part}")]
    assert [n for n, _ in systems] == ["smoe-2-2-2-2", "moe"]
    loaded = [(n, report.read_scores(p)) for n, p in systems]
    with pytest.raises(report.ReportError, match="3 of the 8 m4 directions were not scored"):
        report.comparison_table(b, loaded, "spm_bleu")
    text = report.comparison_table(b, loaded, "spm_bleu", allow_partial=True)
    assert "| smoe-2-2-2-2 (ours) | 30.00 |" in text
    assert "| smoe-2-2-2-2 (paper) | 30.96 | 41.88 |" in text and "40.78 |" in text
    assert "moe: means over 5 scored directions; missing: eng-msa, eng-tgl, eng-cat" in text


def test_report_cli_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit, match="does not exist; run scripts/evaluate.sh first"):
        report.main(["m4", str(tmp_path / "nowhere")])


def test_spbleu_uses_the_given_flores200_model(tmp_path, monkeypatch):
    # The real flores200 model cannot be downloaded in CI; a SentencePiece model trained on
    # the fixture stands in for it, to check that --flores200-spm reaches sacreBLEU's tokenizer.
    from sacrebleu.tokenizers import tokenizer_spm

    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path / "sacrebleu"))
    text = (FIXTURE / "train.en-de.de").read_text().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "m"),
                                   vocab_size=300, minloglevel=2)
    with pytest.raises(evaluate.EvaluationError, match="does not exist"):
        evaluate.flores200_ready(str(tmp_path / "missing.model"))
    assert evaluate.flores200_ready(str(tmp_path / "m.model")) is None
    refs = (FIXTURE / "test.en-de.de").read_text().splitlines()
    hyps = [" ".join(r.split()[::-1]) if i % 2 else r for i, r in enumerate(refs)]
    got = evaluate.score(hyps, refs, refs, with_spbleu=True)["spbleu"]
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    piece = lambda lines: [" ".join(sp.encode(l, out_type=str)) for l in lines]
    assert got == pytest.approx(sacrebleu.corpus_bleu(piece(hyps), [piece(refs)], tokenize="none").score)
    assert got != pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)


def seed_runs(tmp_path, name, per_seed, layout="{name}-seed{i}/eval"):
    """One scores.csv per seed: per_seed[i] = {direction: spm_bleu}."""
    return [str(write_scores(tmp_path / layout.format(name=name, i=i + 1), v)) for i, v in enumerate(per_seed)]


def test_seed_mean_and_std_by_hand(tmp_path, capsys):
    b = benchmarks.get("m4")
    # seed k scores 29+k in every direction, except nso-eng: 10, 20, 60
    per_seed = [{d: (x if d == "nso-eng" else 29.0 + k) for d in b.directions()}
                for k, x in zip((1, 2, 3), (10.0, 20.0, 60.0))]
    dirs = seed_runs(tmp_path, "smoe-2-2-2-2", per_seed)
    moe = write_scores(tmp_path / "moe" / "eval", {d: 25.0 for d in b.directions()})
    systems = [report.load_system(n, p) for n, p in report.group_systems(dirs + [str(moe)], seeds=True)]
    assert [(s.name, s.n) for s in systems] == [("smoe-2-2-2-2", 3), ("moe", 1)]
    cols = report.system_columns(systems[0], b, "spm_bleu")
    # nso-eng: mean 30, std sqrt((20^2 + 10^2 + 30^2) / 2) = sqrt(700) = 26.458
    assert cols["nso-eng"] == pytest.approx((30.0, 26.4575131))
    assert cols["eng-cat"] == pytest.approx((31.0, 1.0))  # 30, 31, 32
    # avg per seed: (10 + 7*30)/8 = 27.5, (20 + 7*31)/8 = 29.625, (60 + 7*32)/8 = 35.5
    # -> mean 30.875, std sqrt((3.375^2 + 1.25^2 + 4.625^2) / 2) = sqrt(17.171875) = 4.1439
    assert cols["avg"] == pytest.approx((30.875, 4.1438961))
    report.main(["m4", *dirs, str(moe), "--seeds"])
    out = capsys.readouterr().out
    assert "| smoe-2-2-2-2 (ours, n=3) | 30.00 ± 26.46 | 31.00 ± 1.00 |" in out and "| 30.88 ± 4.14 |" in out
    assert "| moe (ours, n=1) | 25.00 | 25.00 |" in out
    assert "| smoe-2-2-2-2 (paper) | 30.96 |" in out
    assert "mean ± sample standard deviation (n-1) over n training seeds" in out


def test_seed_group_means_by_resource_group(tmp_path):
    b = benchmarks.get("m15")
    runs = [{d: float(i + k) for i, d in enumerate(b.directions())} for k in (0, 2)]
    system = report.load_system("smoe-4-12", seed_runs(tmp_path, "smoe-4-12", runs))
    cols = report.system_columns(system, b, "spm_bleu")
    high = [runs[0][f"eng-{l}"] for l in ("ind", "msa", "isl", "slv", "tgl")]
    # the two seeds' e2x_high means differ by 2: mean +1, sample std sqrt(2)
    assert cols["e2x_high"] == pytest.approx((statistics.mean(high) + 1, 2 ** 0.5))


def test_seed_naming_conventions(tmp_path):
    assert report.system_name("runs/m4/moe-seed2/eval", seeds=True)[0] == "moe"
    assert report.system_name("runs/m4/moe_seed13", seeds=True)[0] == "moe"
    assert report.system_name("runs/m4/moe/seed2/eval", seeds=True)[0] == "moe"
    assert report.system_name("runs/m4/moe-seed2/eval")[0] == "moe-seed2"  # only with --seeds
    assert report.system_name("runs/m4/seed2/eval", seeds=True)[0] == "m4"
    assert report.group_systems(["moe=a,b", "moe=c", "smoe=d"], seeds=True) == [("moe", ["a", "b", "c"]), ("smoe", ["d"])]
    with pytest.raises(report.ReportError, match=r"system 'moe' has 2 result directories \(a, b\); pass --seeds"):
        report.group_systems(["moe=a,b"])
    with pytest.raises(report.ReportError, match=r"pass --seeds"):
        report.group_systems(["runs/moe/eval", "other/moe/eval"])
    with pytest.raises(report.ReportError, match=r"system 'moe': runs/x/ is given more than once"):
        report.group_systems(["moe=runs/x,runs/x/"], seeds=True)


def test_seed_runs_must_cover_the_same_directions(tmp_path, capsys):
    b = benchmarks.get("m4")
    full = {d: 30.0 for d in b.directions()}
    dirs = seed_runs(tmp_path, "moe", [full, {d: v for d, v in full.items() if d not in ("eng-cat", "eng-tgl")}])
    with pytest.raises(SystemExit, match=r"moe: its 2 seed runs were scored on different directions \(.*moe-seed2/eval "
                                         r"lacks eng-tgl, eng-cat\); evaluate every run on the same directions"):
        report.main(["m4", *dirs, "--seeds"])
    other = seed_runs(tmp_path / "o", "moe", [full, full])
    with open(Path(other[1]) / "scores.csv") as f:
        text = f.read().replace("nso-eng,10,", "nso-eng,12,")
    (Path(other[1]) / "scores.csv").write_text(text)
    with pytest.raises(report.ReportError, match=r"nso-eng test sets of different sizes \(.*: 10, .*: 12 lines\)"):
        report.load_system("moe", other)


def test_baseline_must_be_a_system_of_the_table(tmp_path):
    b = benchmarks.get("m4")
    a = write_scores(tmp_path / "moe", {d: 30.0 for d in b.directions()})
    with pytest.raises(SystemExit, match=r"--baseline 'dense' is not one of the systems in the table \(moe, smoe\)"):
        report.main(["m4", str(a), f"smoe={a}", "--baseline", "dense", "--data", str(tmp_path), "--metric", "bleu"])
