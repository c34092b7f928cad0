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
