#!/usr/bin/env bash
# Several systems' scores side by side in the layout of the paper's Table 1 (m4), 2 (m15)
# or 3 (opus100), each followed by the paper's row for the same system.
#
#   scripts/reproduce_table.sh {m4,m15,opus100} RESULT_DIR... [--metric spm_bleu] [--allow-partial]
#       [--seeds] [--baseline SYSTEM --data DATA_DIR [--paired-bs-n 1000] [--alpha 0.05]]
#
# RESULT_DIR: an OUT_DIR of scripts/evaluate.sh. The system name (which picks the paper's row)
# is the folder name, or its parent's when the folder is called eval
# (runs/m4/smoe-2-2-2-2/eval -> smoe-2-2-2-2); NAME=DIR sets it.
# --seeds: runs of one system, NAME=DIR1,DIR2,... or folders runs/m4/moe-seed1/eval,
# runs/m4/moe/seed2/eval (-seedN / seedN/ dropped from the name), show mean ± std (n-1), n.
# --baseline SYSTEM --data DATA_DIR: sacreBLEU's paired bootstrap (--paired-bs) of every other
# system against SYSTEM per direction and per group mean, from each RESULT_DIR's hyp.SRC-TGT.TGT
# and DATA_DIR/raw/test.SRC-TGT.TGT (the DATA_DIR given to evaluate.sh); needs --metric bleu,
# chrf, chrf++ or spbleu.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,/^[^#]/{/^#/p}' "$0" >&2; exit 2; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)  # an assignment of its own: `export X=$(...)` hides a failure
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec python -m fairseq_smoe.report "$@"
