#!/usr/bin/env bash
# Prepare a benchmark: scripts/prepare_data.sh BENCH OUT_DIR [options]
#   bible   the offline Bible benchmark (python -m data_prep.bible_benchmark --help for options)
# Output: OUT_DIR/spm.model, data-bin/, langs.txt, lang_pairs.txt, raw/test.SRC-TGT.{SRC,TGT}.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,5p' "$0" >&2; exit 2; fi
BENCH=$1
shift
case "$BENCH" in
  bible) exec python -m data_prep.bible_benchmark "$@" ;;
  *) echo "error: unknown benchmark '$BENCH' (available: bible)" >&2; exit 2 ;;
esac
