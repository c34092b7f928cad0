#!/usr/bin/env bash
# Decode and score every direction of a prepared data directory.
#
#   scripts/evaluate.sh CHECKPOINT DATA_DIR OUT_DIR [--beam 5 --lenpen 1.0 --flores200-spm PATH]
#
# Every test line of every direction in DATA_DIR/lang_pairs.txt (count checked against
# DATA_DIR/raw), deterministic, no token dropped by capacity. Scores: sacreBLEU 13a, spBLEU
# (flores200), chrF, chrF++, the paper's SentencePiece-piece BLEU (M4/M15), copy-source chrF,
# strata passes. Writes OUT_DIR/hyp.SRC-TGT.TGT, scores.csv, scores.md (with the paper's
# e->x / x->e resource-group means). Details: python -m fairseq_smoe.evaluate --help
set -euo pipefail
if [ $# -lt 3 ]; then sed -n '2,/^[^#]/{/^#/p}' "$0" >&2; exit 2; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)  # an assignment of its own: `export X=$(...)` hides a failure
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec python -m fairseq_smoe.evaluate "$@"
