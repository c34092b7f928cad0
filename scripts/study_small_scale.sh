#!/usr/bin/env bash
# The small-scale study: when does SMoE beat top-2 MoE and dense on the Bible benchmark, and
# what holds it back before that. Reproducible (fixed seeds), resumable (a finished run is
# skipped, an interrupted one resumes from its checkpoint_last.pt), meant for the background:
#
#   nohup scripts/study_small_scale.sh [OUT_DIR] > study.log 2>&1 &     # default OUT_DIR runs/study
#
# Budgets can grow: re-run with a larger MAIN_UPDATES (say) and the runs below it continue from
# their last checkpoint; their scores at the shorter budget move to <run>/u<updates>/ (kept: the
# report compares systems at equal updates) and are recomputed at the new one.
#
# Every run is the `make demo` recipe (configs/demo/: smoe_transformer_tiny, 2+2 layers, d 128,
# FFN 512, dropout 0, lr 5e-3, 2048 tokens per batch) with one thing changed, one math thread,
# JOBS (default 2) runs at a time:
#   main systems, MAIN_UPDATES (default 1250) updates: dense, moe (top-2, 4 experts), smoe (2,2,
#     official residual), smoe-paper (2,2, the paper's residual: --smoe-residual paper); dense,
#     moe and smoe again with the other SEEDS (default "1 2"), SEED_UPDATES (default 500) updates
#     (the seed spread of the curves; SEED_EVAL=1 scores them on the test set too);
#   ablations of smoe, ABL_UPDATES (default 500): balance-loss weight 0, dropless, second
#     expert = argmax (policy all), a 3x longer warm-up, MoE in every layer (--moe-freq 1);
#     EXTRA_ABLATIONS=1 adds balance-loss weight 0.1 and the top-2 MoE dropless;
#   the extended language set (eng <-> deu,fra,spa,rus,ita,ara,fas,vie,tgl: 18 directions),
#     EXT_UPDATES (default 400): dense, moe, smoe;
#   compute dial and strata widths (issue 13), DIAL_UPDATES (default MAIN_UPDATES): smoe-elastic
#     (--smoe-elastic-passes),
#     smoe-w256-768 and smoe-w768-256 (--smoe-strata-ffn, as many parameters as smoe).
# Validation loss (base 2) every VALID_EVERY (250) updates on the first VALID_STEPS (30) valid
# batches (the same sentences for every run). The first-seed main, dial and width systems are
# then scored on the test set (Mark, beam 5; scripts/evaluate.sh); smoe and smoe-elastic at every
# --smoe-max-passes K (python -m fairseq_smoe.dial; its K = L decode, the model as trained, is
# their evaluation: eval -> dial/K<L>). Finally scripts/study_report.py writes
# OUT_DIR/study.md and OUT_DIR/study.png (valid loss vs updates and vs training FLOPs) and the
# paired bootstrap of chrF against dense and against moe.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/study}
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-"1 2"}
MAIN_UPDATES=${MAIN_UPDATES:-1250}
ABL_UPDATES=${ABL_UPDATES:-500}
EXT_UPDATES=${EXT_UPDATES:-400}
DIAL_UPDATES=${DIAL_UPDATES:-$MAIN_UPDATES}
SEED_UPDATES=${SEED_UPDATES:-500}
SEED_EVAL=${SEED_EVAL:-0}
VALID_EVERY=${VALID_EVERY:-250}
VALID_STEPS=${VALID_STEPS:-30}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
# one study per OUT_DIR at a time: two would train the same runs into the same checkpoints
exec 9>"$OUT/.study.lock"
flock -n 9 || { echo "error: another study_small_scale.sh is running on $OUT (its log: where its nohup wrote);" \
  "wait for it to finish or stop it, then run this again (finished runs are kept)" >&2; exit 1; }

bash scripts/prepare_data.sh bible "$OUT/bible" >"$OUT/prepare_bible.log" 2>&1 \
  || { tail -20 "$OUT/prepare_bible.log" >&2; exit 1; }
bash scripts/prepare_data.sh bible "$OUT/bible-ext" --langs deu,fra,spa,rus,ita,ara,fas,vie,tgl \
  >"$OUT/prepare_bible_ext.log" 2>&1 || { tail -20 "$OUT/prepare_bible_ext.log" >&2; exit 1; }

# name|data|config|updates|evaluate|dial|extra flags
first=${SEEDS%% *}
{
  echo "dense-s$first|bible|demo/dense-tiny|$MAIN_UPDATES|1|0|--seed $first"
  echo "moe-s$first|bible|demo/moe-tiny|$MAIN_UPDATES|1|0|--seed $first"
  echo "smoe-s$first|bible|demo/smoe-tiny|$MAIN_UPDATES|1|1|--seed $first"
  echo "smoe-paper-s$first|bible|demo/smoe-tiny|$MAIN_UPDATES|1|0|--seed $first --smoe-residual paper"
  echo "smoe-elastic-s$first|bible|demo/smoe-tiny-elastic|$DIAL_UPDATES|1|1|--seed $first"
  echo "smoe-w256-768-s$first|bible|demo/smoe-tiny-w256-768|$DIAL_UPDATES|1|0|--seed $first"
  echo "smoe-w768-256-s$first|bible|demo/smoe-tiny-w768-256|$DIAL_UPDATES|1|0|--seed $first"
  echo "ext-dense-s$first|bible-ext|demo/dense-tiny|$EXT_UPDATES|0|0|--seed $first"
  echo "ext-moe-s$first|bible-ext|demo/moe-tiny|$EXT_UPDATES|0|0|--seed $first"
  echo "ext-smoe-s$first|bible-ext|demo/smoe-tiny|$EXT_UPDATES|0|0|--seed $first"
  for s in ${SEEDS#"$first"}; do
    echo "dense-s$s|bible|demo/dense-tiny|$SEED_UPDATES|$SEED_EVAL|0|--seed $s"
    echo "moe-s$s|bible|demo/moe-tiny|$SEED_UPDATES|$SEED_EVAL|0|--seed $s"
    echo "smoe-s$s|bible|demo/smoe-tiny|$SEED_UPDATES|$SEED_EVAL|0|--seed $s"
  done
  echo "abl-gate0-s$first|bible|demo/smoe-tiny|$ABL_UPDATES|0|0|--seed $first --moe-gate-loss-wt 0"
  echo "abl-dropless-s$first|bible|demo/smoe-tiny|$ABL_UPDATES|0|0|--seed $first --moe-dropless"
  echo "abl-policy-all-s$first|bible|demo/smoe-tiny|$ABL_UPDATES|0|0|--seed $first --moe-second-expert-policy all"
  echo "abl-warmup1200-s$first|bible|demo/smoe-tiny|$ABL_UPDATES|0|0|--seed $first --warmup-updates 1200"
  echo "abl-every-layer-s$first|bible|demo/smoe-tiny|$ABL_UPDATES|0|0|--seed $first --moe-freq 1"
  if [ "${EXTRA_ABLATIONS:-0}" = 1 ]; then
    echo "abl-gate0.1-s$first|bible|demo/smoe-tiny|$ABL_UPDATES|0|0|--seed $first --moe-gate-loss-wt 0.1"
    echo "abl-moe-dropless-s$first|bible|demo/moe-tiny|$ABL_UPDATES|0|0|--seed $first --moe-dropless"
  fi
} >"$OUT/runs.txt"
# in order of what a shortened study most needs: the main systems, the dial and width runs
# (long), the extended languages, the other seeds, the ablations
echo "study: $(wc -l <"$OUT/runs.txt") runs, $JOBS at a time, logs in $OUT/<run>/" >&2

run_one() {
  local line=$1 name data config updates eval dial flags dir
  IFS='|' read -r name data config updates eval dial flags <<<"$line"
  dir=$OUT/$name
  mkdir -p "$dir"
  # "trained" holds the updates a run was trained to; a larger budget continues the run from its
  # checkpoint_last.pt
  local done_updates=0
  if [ -f "$dir/trained" ]; then done_updates=$(cat "$dir/trained"); done_updates=${done_updates:-0}; fi
  if [ "$done_updates" -lt "$updates" ]; then
    # keep the shorter run's scores (eval may be a link into dial: move both together); a
    # continuation that was interrupted has moved them already
    local kept=$dir/u$done_updates f
    if [ "$done_updates" -gt 0 ] && [ ! -d "$kept" ]; then
      mkdir -p "$kept"
      for f in eval dial eval.log dial.log; do
        if [ -e "$dir/$f" ] || [ -L "$dir/$f" ]; then mv "$dir/$f" "$kept/"; fi
      done
    fi
    echo "  $(date +%H:%M) training $name ($updates updates)" >&2
    # shellcheck disable=SC2086
    bash scripts/train.sh "$config" "$OUT/$data" "$dir/ckpt" $flags \
      --max-update "$updates" --validate-interval-updates "$VALID_EVERY" --max-valid-steps "$VALID_STEPS" \
      --save-interval-updates "$VALID_EVERY" --keep-interval-updates 1 --no-epoch-checkpoints \
      --log-format json --log-interval 50 >>"$dir/train.log" 2>&1 \
      || { echo "  training $name failed: see $dir/train.log" >&2; return 1; }
    echo "$updates" >"$dir/trained"
  fi
  if [ "$dial" = 1 ] && [ ! -f "$dir/dial/dial.csv" ]; then
    echo "  $(date +%H:%M) compute dial of $name" >&2
    python -m fairseq_smoe.dial "$dir/ckpt/checkpoint_last.pt" "$OUT/$data" "$dir/dial" --beam 5 \
      >"$dir/dial.log" 2>&1 || { echo "  dial of $name failed: see $dir/dial.log" >&2; return 1; }
  fi
  if [ "$dial" = 1 ] && [ ! -e "$dir/eval" ]; then
    # the dial's K = L decode is the model as trained (tests/test_dial.py: identical outputs)
    local last
    last=$(cd "$dir/dial" && ls -d K* | sort -V | tail -1) || last=
    [ -n "$last" ] || { echo "  dial of $name wrote no K* folder: see $dir/dial.log" >&2; return 1; }
    ln -s "$last" "$dir/dial/as-trained"
    ln -s dial/as-trained "$dir/eval"
  fi
  if [ "$eval" = 1 ] && [ ! -f "$dir/eval/scores.csv" ]; then
    echo "  $(date +%H:%M) evaluating $name" >&2
    bash scripts/evaluate.sh "$dir/ckpt/checkpoint_last.pt" "$OUT/$data" "$dir/eval" --beam 5 \
      >"$dir/eval.log" 2>&1 || { echo "  evaluating $name failed: see $dir/eval.log" >&2; return 1; }
  fi
}
export -f run_one
export OUT VALID_EVERY VALID_STEPS

# xargs runs JOBS at a time; one failed run does not stop the others (they are reported)
status=0
# (each run in its own bash: set -e and pipefail are not inherited, so they are set there again)
tr '\n' '\0' <"$OUT/runs.txt" | xargs -0 -P "$JOBS" -I{} bash -c 'set -euo pipefail; run_one "$1"' _ {} || status=$?
python scripts/study_report.py "$OUT" || status=1
echo "study: done (status $status); see $OUT/study.md" >&2
exit $status
