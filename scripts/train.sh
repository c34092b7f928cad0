#!/usr/bin/env bash
# Train a named recipe on a prepared data directory with fairseq's own (distributed) trainer.
#
#   scripts/train.sh CONFIG DATA_DIR SAVE_DIR [extra fairseq-train args]
#
# CONFIG: a file in configs/ without .conf (e.g. demo/smoe-tiny, m4/smoe-2-2-2-2); extra args
# override it. DATA_DIR: output of data_prep (data-bin/, lang_pairs.txt, langs.txt).
# Workers: all visible GPUs of this node (fairseq spawns one process each); under torchrun
# (WORLD_SIZE/RANK set, one process per GPU) or SLURM (srun, one task per GPU) fairseq joins the
# job from those variables. No GPU: trains on CPU. --update-freq is derived so the global batch
# matches the recipe's @global-batch-tokens (the paper: 32 GPUs x 4096 tokens).
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,/^[^#]/{/^#/p}' "$0" >&2
  exit 2
fi
CONFIG=$1 DATA=$2 SAVE=$3
shift 3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
for f in "$DATA/data-bin" "$DATA/lang_pairs.txt" "$DATA/langs.txt"; do
  [ -e "$f" ] || { echo "error: $f is missing; prepare $DATA with data_prep first" >&2; exit 2; }
done

NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
DEVICE_FLAGS=()
if [ -n "${WORLD_SIZE:-}" ] && [ -n "${RANK:-}" ]; then
  WORLD=$WORLD_SIZE                                   # torchrun
elif [ -n "${SLURM_NTASKS:-}" ] && [ "${SLURM_NTASKS}" -gt 1 ]; then
  WORLD=$SLURM_NTASKS                                 # srun, one task per GPU
elif [ "$NGPU" -gt 0 ]; then
  WORLD=$NGPU
else
  WORLD=1
  DEVICE_FLAGS=(--cpu)
fi
if [ "$WORLD" -gt 1 ]; then
  # a stratum no token reached in a step has no gradient; legacy_ddp fills it with zeros
  DEVICE_FLAGS+=(--distributed-world-size "$WORLD" --ddp-backend legacy_ddp)
fi

mapfile -t FLAGS < <(python -m fairseq_smoe.recipes "$CONFIG" --world-size "$WORLD")
if [ "${DEVICE_FLAGS[0]:-}" = "--cpu" ]; then
  # the paper's recipes train in fp16, which fairseq can only do on a GPU
  KEEP=()
  for f in "${FLAGS[@]}"; do
    case $f in
      --fp16|--memory-efficient-fp16|--bf16) echo "train.sh: no GPU, dropping $f" >&2 ;;
      *) KEEP+=("$f") ;;
    esac
  done
  FLAGS=("${KEEP[@]}")
fi
echo "train.sh: $CONFIG on $WORLD worker(s) ($NGPU GPU(s) visible here)" >&2
mkdir -p "$SAVE"
exec fairseq-train "$DATA/data-bin" --user-dir "$ROOT/fairseq_smoe" "${FLAGS[@]}" \
  --lang-pairs "$(cat "$DATA/lang_pairs.txt")" --langs "$(cat "$DATA/langs.txt")" \
  --save-dir "$SAVE" "${DEVICE_FLAGS[@]}" "$@"
