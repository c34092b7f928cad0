#!/usr/bin/env bash
# Several systems' scores side by side in the layout of the paper's Table 1 (m4), 2 (m15)
# or 3 (opus100), each followed by the paper's row for the same system.
#
#   scripts/reproduce_table.sh {m4,m15,opus100} RESULT_DIR... [--metric spm_bleu] [--allow-partial]
#
# RESULT_DIR: an OUT_DIR of scripts/evaluate.sh. The system name (which picks the paper's row)
# is the folder name, or its parent's when the folder is called eval
# (runs/m4/smoe-2-2-2-2/eval -> smoe-2-2-2-2); NAME=DIR sets it.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,/^[^#]/{/^#/p}' "$0" >&2; exit 2; fi
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
exec python -m fairseq_smoe.report "$@"
