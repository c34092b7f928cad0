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
