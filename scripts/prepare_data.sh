#!/usr/bin/env bash
# Prepare a benchmark: scripts/prepare_data.sh BENCH OUT_DIR [options]
#   bible    offline Bible benchmark, eng <-> deu,fra,spa,rus (python -m data_prep.bible_benchmark --help)
#   m15      the authors' m15.zip: 15 languages <-> eng, 30 directions (python -m data_prep.nllb_m15 --help)
#   m4       its nso,msa,tgl,cat <-> eng subset, 8 directions, same SentencePiece model and dictionary
#   opus100  OPUS-100 v1.0, 94 pairs, joint 64k SentencePiece (python -m data_prep.opus100 --help)
# Every benchmark takes --archive PATH for an already-downloaded archive, and re-running skips
# finished steps. Output: OUT_DIR/spm.model, data-bin/, langs.txt, lang_pairs.txt, raw/test.SRC-TGT.{SRC,TGT}.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,/^[^#]/{/^#/p}' "$0" >&2; exit 2; fi
BENCH=$1
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)  # an assignment of its own: `export X=$(...)` hides a failure
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # data_prep without an install
case "$BENCH" in
  bible) exec python -m data_prep.bible_benchmark "$@" ;;
  m15) exec python -m data_prep.nllb_m15 "$@" --subset m15 ;;
  m4) exec python -m data_prep.nllb_m15 "$@" --subset m4 ;;
  opus100) exec python -m data_prep.opus100 "$@" ;;
  *) echo "error: unknown benchmark '$BENCH' (available: bible, m15, m4, opus100)" >&2; exit 2 ;;
esac
