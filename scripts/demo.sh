#!/usr/bin/env bash
# make demo: the committed real fixture (public-domain Bible verses, English <-> German, French,
# Spanish, Russian: tests/fixtures/bible) -> joint SentencePiece -> fairseq-preprocess, a small SMoE
# (4 experts in strata 2,2) trained on CPU for DEMO_MINUTES, then every direction decoded and scored.
#   DEMO_MINUTES=10 make demo     # train longer (default 5)
#   DEMO_DIR=/tmp/demo make demo  # where data, checkpoints and scores go (default runs/demo)
# The full offline Bible benchmark (30k verses per pair) is `scripts/prepare_data.sh bible DIR`.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${DEMO_MINUTES:-5}
OUT=${DEMO_DIR:-runs/demo}

python -m data_prep.spm_binarize --raw tests/fixtures/bible --pairs en-de,en-fr,en-es,en-ru \
  --out "$OUT/data" --vocab-size 2000                     # skips finished steps on a re-run

rm -rf "$OUT/checkpoints"  # a fresh run each time (fairseq would otherwise resume)
bash scripts/train.sh demo/smoe-tiny "$OUT/data" "$OUT/checkpoints" \
  --max-update 1000000 --stop-time-hours "$(python -c "print($MINUTES / 60)")" \
  --no-epoch-checkpoints --validate-interval-updates 250 --save-interval-updates 250 \
  --keep-interval-updates 1 --log-format simple --log-interval 100

python -m fairseq_smoe.evaluate "$OUT/checkpoints/checkpoint_best.pt" "$OUT/data" "$OUT/eval"
echo "Hypotheses and scores.{csv,md} are in $OUT/eval"
