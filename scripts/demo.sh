#!/usr/bin/env bash
# make demo: prepare the committed Bible fixture (en<->de,fr,es,ru; SentencePiece + fairseq-
# preprocess), train a small SMoE (4 experts in strata 2,2) on CPU for DEMO_MINUTES, then
# decode every direction and print BLEU/chrF and the mean strata passes per token.
#   DEMO_MINUTES=10 make demo     # train longer (default 5)
#   DEMO_DIR=/tmp/demo make demo  # where data, checkpoints and scores go (default runs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${DEMO_MINUTES:-5}
OUT=${DEMO_DIR:-runs/demo}

python -m data_prep.spm_binarize --raw tests/fixtures/bible --pairs en-de,en-fr,en-es,en-ru \
  --out "$OUT/data" --vocab-size 2000

rm -rf "$OUT/checkpoints"  # a fresh run each time (fairseq would otherwise resume)
fairseq-train "$OUT/data/data-bin" --user-dir fairseq_smoe \
  --task smoe_translation --lang-pairs "$(cat "$OUT/data/lang_pairs.txt")" \
  --langs "$(cat "$OUT/data/langs.txt")" --encoder-langtok tgt --decoder-langtok \
  --arch smoe_transformer_tiny --moe-expert-count 4 --smoe-strata 2,2 \
  --criterion smoe_label_smoothed_cross_entropy --label-smoothing 0.1 --moe-gate-loss-wt 0.01 \
  --share-all-embeddings --dropout 0.3 \
  --optimizer adam --adam-betas '(0.9, 0.98)' --lr 3e-3 --lr-scheduler inverse_sqrt --warmup-updates 400 \
  --max-tokens 2048 --max-update 1000000 --stop-time-hours "$(python -c "print($MINUTES / 60)")" \
  --cpu --num-workers 0 --seed 1 \
  --save-dir "$OUT/checkpoints" --no-epoch-checkpoints \
  --validate-interval-updates 250 --save-interval-updates 250 --keep-interval-updates 1 \
  --log-format simple --log-interval 100

python -m fairseq_smoe.evaluate "$OUT/checkpoints/checkpoint_best.pt" "$OUT/data" "$OUT/eval"
echo "Hypotheses and scores.{csv,md} are in $OUT/eval"
