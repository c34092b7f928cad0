"""scripts/study_report.py reads fairseq's JSON training logs as the study writes them."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import study_report  # noqa: E402


def _line(kind, rec):
    return f"2026-12-01 12:00:00 | INFO | {kind} | {json.dumps(rec)}"


def test_parse_log_keeps_one_validation_per_update_and_the_interval_words(tmp_path):
    log = tmp_path / "train.log"
    lines = [
        _line("train_inner", {"num_updates": "50", "wpb": "1700.0", "rc_enc": "1.5", "rc_dec": "1.25"}),
        _line("valid", {"valid_num_updates": "250", "valid_loss": "8.7"}),
        _line("valid", {"valid_num_updates": "500", "valid_loss": "7.9"}),
        "train.sh: resumed",  # a resumed run validates 500 again, then once more at its end
        _line("valid", {"valid_num_updates": "500", "valid_loss": "7.95"}),
        _line("valid", {"valid_num_updates": "501", "valid_loss": "7.96"}),
        _line("train_inner", {"num_updates": "100", "wpb": "1600.0"}),
        _line("train_inner", {"num_updates": "50", "wpb": "1800.0"}),  # logged again after a resume
    ]
    log.write_text("\n".join(lines) + "\n")
    valid, inner = study_report.parse_log(log)
    assert valid == [(250, 8.7), (500, 7.95)]
    # target words of a 50-update log interval, and the strata passes (0 where not logged)
    # (the last record of an update counts once: training FLOPs are not double-counted)
    assert inner == [(50, 1800.0 * 50, 0.0, 0.0), (100, 1600.0 * 50, 0.0, 0.0)]


def test_system_of_strips_the_seed():
    assert study_report.system_of("smoe-w256-768-s12") == "smoe-w256-768"
    assert study_report.system_of("abl-paper-residual-s1") == "abl-paper-residual"


def test_scored_finds_the_current_scores_and_those_kept_from_shorter_budgets(tmp_path):
    # what study_small_scale.sh leaves after continuing smoe-s1 from 1250 to 3000 updates: the
    # 1250-update dial (its eval a link into it) moved to u1250/, the new scores not yet written
    # for moe-s1 (still training), a run never continued
    def write(path, text="chrf,rc_enc,rc_dec\n20,1,1\n"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    run = tmp_path / "smoe-s1"
    write(run / "trained", "3000\n")
    write(run / "dial" / "dial.csv", "k\n")
    write(run / "dial" / "K2" / "scores.csv")
    (run / "dial" / "as-trained").symlink_to("K2")
    (run / "eval").symlink_to("dial/as-trained")
    write(run / "u1250" / "dial" / "dial.csv", "k\n")
    write(run / "u1250" / "dial" / "K2" / "scores.csv")
    (run / "u1250" / "dial" / "as-trained").symlink_to("K2")
    (run / "u1250" / "eval").symlink_to("dial/as-trained")
    write(tmp_path / "moe-s1" / "trained", "1250\n")  # being continued: marker not yet raised
    write(tmp_path / "moe-s1" / "u500" / "eval" / "scores.csv")
    write(tmp_path / "dense-s1" / "trained", "1250\n")
    write(tmp_path / "dense-s1" / "eval" / "scores.csv")
    write(tmp_path / "dense-s2" / "trained", "\n")  # never finished: nothing counts
    write(tmp_path / "dense-s2" / "eval" / "scores.csv")
    runs = ["dense-s1", "dense-s2", "moe-s1", "smoe-s1"]
    got = [(r, u, d.relative_to(tmp_path).as_posix()) for r, u, d in study_report.scored(tmp_path, runs)]
    assert got == [("smoe-s1", 3000, "smoe-s1/eval"), ("dense-s1", 1250, "dense-s1/eval"),
                   ("smoe-s1", 1250, "smoe-s1/u1250/eval"), ("moe-s1", 500, "moe-s1/u500/eval")]
    dials = [(r, u) for r, u, _ in study_report.scored(tmp_path, runs, "dial")]
    assert dials == [("smoe-s1", 3000), ("smoe-s1", 1250)]
    assert study_report.mean_scores(run / "u1250" / "eval") == {"chrf": 20.0, "rc_enc": 1.0, "rc_dec": 1.0}
    (tmp_path / "dense-s1" / "eval" / "scores.csv").write_text("chrf,rc_enc,rc_dec\n20,,\n22,,\n")
    assert study_report.mean_scores(tmp_path / "dense-s1" / "eval") == {"chrf": 21.0, "rc_enc": None, "rc_dec": None}


_REPORT = """bible: chrf

| system | avg |
|---|---|
| dense (ours, n=2) | 27.05 ± 2.16 |
| smoe (ours, n=2) | 27.81 ± 0.79 |

* ours: mean ± sample standard deviation (n-1) over n training seeds
* dense: means over 8 scored directions; missing: ita-eng, eng-ita
* dense: no row of that name in the paper's tables
* smoe: means over 8 scored directions; missing: ita-eng, eng-ita
* smoe: no row of that name in the paper's tables

Paired bootstrap resampling against dense"""


def test_condense_notes_says_what_every_system_lacks_once():
    got = study_report.condense_notes(_REPORT).split("\n")
    assert "* every system: means over the 8 scored directions; not run: ita-eng, eng-ita" in got
    assert "* no system has a row of its name in the paper's tables" in got
    assert not [line for line in got if "missing:" in line or "no row of that name" in line]
    # everything else stays, in order
    assert got[:7] == _REPORT.split("\n")[:7] and got[-1] == "Paired bootstrap resampling against dense"
    assert len(got) == len(_REPORT.split("\n")) - 2


def test_condense_notes_keeps_notes_that_differ_between_systems():
    differ = _REPORT.replace("* smoe: means over 8 scored directions; missing: ita-eng, eng-ita",
                             "* smoe: means over 7 scored directions; missing: ita-eng, eng-ita, eng-deu")
    assert study_report.condense_notes(differ) == differ
    assert study_report.condense_notes("no notes\n") == "no notes\n"


def test_the_committed_study_document_is_the_generators():
    # the prose lives in study_report's template: edit it there, not in docs/study/study.md
    doc = (ROOT / "docs" / "study" / "study.md").read_text(encoding="utf-8")
    assert doc.startswith("\n".join([study_report.TITLE, *study_report.PROSE.split("\n")]))
    assert "missing:" not in doc and "no row of that name" not in doc
