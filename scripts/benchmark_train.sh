#!/usr/bin/env bash
# End-to-end throughput: train smoe_transformer_tiny (SMoE, 4 experts in strata 2,2), the
# top-2 MoE of the same size (one stratum of 4 experts) and a dense model of equal active
# FLOPs for a fixed number of updates each, with stock fairseq-train on the committed Bible
# fixture, and report fairseq's words/s (wps) of each and its ratio to the dense model; then
# generation sentences/s of the SMoE and the dense model (fairseq-generate, every test
# direction, fixed output length so both decode the same number of steps).
#
#   scripts/benchmark_train.sh
#   UPDATES=300 ROUNDS=3 scripts/benchmark_train.sh   # more updates; median over 3 rounds
#
# Environment: UPDATES (default 100), ROUNDS (default 2; the three trainings run round-robin
# per round and the reported wps is the median over rounds, so machine noise hits the models
# alike; generation alternates the two models per direction), THREADS (default 1: intra-op
# threads of every run; on a shared machine two OpenMP threads of these small models stall
# whenever another process takes a core, by up to 15x in our runs, which drowns the ratios),
# BENCH_DIR (default runs/bench_train),
# DENSE_FFN (default 768), PYTHON (default python), and extra fairseq flags in EXTRA.
#
# Equal active FLOPs: the tiny models have FFN 512 in layers 1 and 2 of each side, and layer
# 2 is the MoE layer. Top-2 MoE: 512 + 2 x 512 = 1536 FFN units per side and token, so the
# dense model has FFN 768 in both layers. SMoE-2-2 computes 2 x RC x 512 in its MoE layer,
# RC = 1.5 passes per token with balanced routing (spec §1.7): equal to a dense FFN of 1024.
# Words/s are training target words per second (fairseq's wps), medians over the log
# intervals after the first one (which includes start-up). Generation: beam 4, batch 64,
# sentences/s as fairseq-generate reports them, summed over the 8 test directions; the ratio
# is the median over directions (the two models run back to back on each).
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATES=${UPDATES:-100}
ROUNDS=${ROUNDS:-2}
OUT=${BENCH_DIR:-runs/bench_train}
DENSE_FFN=${DENSE_FFN:-768}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
INTERVAL=$(( UPDATES >= 40 ? 10 : (UPDATES >= 4 ? UPDATES / 4 : 1) ))

DEVICE=(--cpu)
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE=()
fi

mkdir -p "$OUT"
DATA=$OUT/data
"$PY" -m data_prep.spm_binarize --raw tests/fixtures/bible --pairs en-de,en-fr,en-es,en-ru \
  --out "$DATA" --vocab-size 2000 >"$OUT/data_prep.log" 2>&1 \
  || { cat "$OUT/data_prep.log" >&2; exit 1; }
PAIRS=$(cat "$DATA/lang_pairs.txt")
LANGS=$(cat "$DATA/langs.txt")
TASK=(--task smoe_translation --lang-pairs "$PAIRS" --langs "$LANGS"
      --encoder-langtok tgt --decoder-langtok)

declare -A MODEL
MODEL[smoe]="--moe-expert-count 4 --smoe-strata 2,2"
MODEL[moe]="--moe-expert-count 4"
MODEL[dense]="--moe-freq 0 --encoder-ffn-embed-dim $DENSE_FFN --decoder-ffn-embed-dim $DENSE_FFN"
NAMES=(smoe moe dense)

train() {  # name round
  local name=$1 save=$OUT/$1
  rm -rf "$save"
  # shellcheck disable=SC2086
  "$PY" -m fairseq_cli.train "$DATA/data-bin" --user-dir fairseq_smoe "${TASK[@]}" \
    --arch smoe_transformer_tiny ${MODEL[$name]} \
    --criterion smoe_label_smoothed_cross_entropy --label-smoothing 0.1 --moe-gate-loss-wt 0.01 \
    --share-all-embeddings --dropout 0.3 \
    --optimizer adam --adam-betas '(0.9, 0.98)' --lr 3e-3 --lr-scheduler inverse_sqrt \
    --warmup-updates 400 --max-tokens 2048 --num-workers 0 --seed 1 \
    --max-update "$UPDATES" --disable-validation --no-epoch-checkpoints \
    --save-dir "$save" --log-format json --log-interval "$INTERVAL" "${DEVICE[@]}" ${EXTRA:-} \
    >"$OUT/train.$name.$2.log" 2>&1 || { tail -30 "$OUT/train.$name.$2.log" >&2; exit 1; }
}

generate_one() {  # name direction -> "sentences seconds" as fairseq-generate reports them
  local name=$1 dir=$2 line
  line=$("$PY" -m fairseq_cli.generate "$DATA/data-bin" --user-dir fairseq_smoe "${TASK[@]}" \
    --source-lang "${dir%-*}" --target-lang "${dir#*-}" --path "$OUT/$name/checkpoint_last.pt" \
    --gen-subset test --beam 4 --batch-size 64 --min-len 30 --max-len-a 0 --max-len-b 30 \
    "${DEVICE[@]}" 2>&1 | tee -a "$OUT/generate.$name.log" | grep "Translated ") \
    || { echo "fairseq-generate failed for $name $dir, see $OUT/generate.$name.log" >&2; exit 1; }
  sed -E 's/.*Translated ([0-9,]+) sentences .* in ([0-9.]+)s .*/\1 \2/; s/,//g' <<<"$line"
}

echo "benchmark_train: $UPDATES updates x ${#NAMES[@]} models x $ROUNDS round(s)," \
  "$OMP_NUM_THREADS thread(s); logs in $OUT" >&2
for ((r = 1; r <= ROUNDS; r++)); do
  order=("${NAMES[@]}")
  if (( r % 2 == 0 )); then order=(dense moe smoe); fi  # alternate the order between rounds
  for name in "${order[@]}"; do
    echo "  round $r: training $name" >&2
    train "$name" "$r"
  done
done
echo "  generating (SMoE and dense, alternating per direction)" >&2
: >"$OUT/generate.smoe.log"
: >"$OUT/generate.dense.log"
: >"$OUT/generate.tsv"
i=0
for pair in ${PAIRS//,/ }; do
  for dir in "$pair" "${pair#*-}-${pair%-*}"; do
    order=(smoe dense)
    if (( i++ % 2 )); then order=(dense smoe); fi
    for name in "${order[@]}"; do
      res=$(generate_one "$name" "$dir")
      echo "$name $dir $res" >>"$OUT/generate.tsv"
    done
  done
done

"$PY" - "$OUT" "$ROUNDS" "$DENSE_FFN" <<'EOF'
import json, re, statistics, sys
out, rounds, dense_ffn = sys.argv[1], int(sys.argv[2]), sys.argv[3]
gen, per_dir = {}, {}  # name -> (sentences, seconds) summed over the directions
for line in open(f"{out}/generate.tsv"):
    name, direction, sents, secs = line.split()
    s, t = gen.get(name, (0, 0.0))
    gen[name] = (s + int(sents), t + float(secs))
    per_dir.setdefault(direction, {})[name] = int(sents) / float(secs)
# the ratio to dense: median over directions of the two models' back-to-back runs
gen_ratio = statistics.median(d["smoe"] / d["dense"] for d in per_dir.values())
labels = {"smoe": "SMoE-2-2 (4 experts)", "moe": "top-2 MoE (4 experts)",
          "dense": f"dense, FFN {dense_ffn}"}
wps, rc = {}, {}
for name in labels:
    per_round = []
    for r in range(1, rounds + 1):
        text = open(f"{out}/train.{name}.{r}.log").read()
        logs = [json.loads(m) for m in re.findall(r"\| train_inner \| (\{.*\})", text)]
        if not logs:
            sys.exit(f"no train_inner log in {out}/train.{name}.{r}.log")
        logs = logs[1:] or logs  # the first interval includes start-up
        per_round.append(statistics.median(float(l["wps"]) for l in logs))
        if "rc_enc" in logs[-1]:
            rc[name] = (float(logs[-1]["rc_enc"]), float(logs[-1]["rc_dec"]))
    wps[name] = statistics.median(per_round)
print(f"| model | train wps | wps / dense | generation sent/s | sent/s / dense |")
print(f"|---|---|---|---|---|")
for name, label in labels.items():
    g = ""
    if name in gen:
        s, t = gen[name]
        sps = s / t
        g = f"{sps:.1f} | {gen_ratio if name == 'smoe' else 1.0:.2f}"
    else:
        g = "- | -"
    extra = f" (passes/token enc {rc[name][0]:.2f}, dec {rc[name][1]:.2f})" if name == "smoe" and name in rc else ""
    print(f"| {label}{extra} | {wps[name]:.0f} | {wps[name] / wps['dense']:.2f} | {g} |")
EOF
