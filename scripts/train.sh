#!/usr/bin/env bash
# Train a named recipe on a prepared data directory with fairseq's own (distributed) trainer.
#
#   scripts/train.sh CONFIG DATA_DIR SAVE_DIR [extra fairseq-train args]
#
# CONFIG: a file in configs/ without .conf (e.g. demo/smoe-tiny, m4/smoe-2-2-2-2); extra args
# override it. DATA_DIR: output of data_prep (data-bin/, lang_pairs.txt, langs.txt).
# Workers: all visible GPUs of this node (fairseq spawns one process each); under torchrun
# (WORLD_SIZE/RANK set, one process per GPU) or SLURM (srun, one task per GPU) fairseq joins the
# job from those variables. No GPU: trains on CPU; CPU_RANKS=N runs N CPU processes (gloo) to
# try the distributed paths (expert parallelism) without GPUs. --update-freq is derived so the
# global batch matches the recipe's @global-batch-tokens (the paper: 32 GPUs x 4096 tokens).
# --moe-expert-parallel (recipe or extra args) splits each SMoE block's experts over the
# workers. Run again with the same SAVE_DIR to resume from SAVE_DIR/checkpoint_last.pt.
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
LAUNCH=exec
if [ -n "${WORLD_SIZE:-}" ] && [ -n "${RANK:-}" ]; then
  WORLD=$WORLD_SIZE                                   # torchrun
  LAUNCHER=torchrun
elif [ -n "${SLURM_NTASKS:-}" ] && [ "${SLURM_NTASKS}" -gt 1 ]; then
  WORLD=$SLURM_NTASKS                                 # srun, one task per GPU
  LAUNCHER=slurm
elif [ -n "${CPU_RANKS:-}" ] && [ "${CPU_RANKS}" -gt 1 ]; then
  WORLD=$CPU_RANKS                                    # N CPU processes started here (gloo)
  LAUNCHER=cpu-ranks
  LAUNCH=cpu-ranks
  DEVICE_FLAGS=(--cpu --distributed-backend gloo)
elif [ "$NGPU" -gt 0 ]; then
  WORLD=$NGPU
  LAUNCHER="fairseq's spawn"
else
  WORLD=1
  LAUNCHER=none
  DEVICE_FLAGS=(--cpu)
fi
if [ "$WORLD" -gt 1 ]; then
  # a stratum no token reached in a step has no gradient; legacy_ddp fills it with zeros (and
  # leaves the expert parameters of --moe-expert-parallel alone)
  DEVICE_FLAGS+=(--distributed-world-size "$WORLD" --ddp-backend legacy_ddp)
fi
if [ "$LAUNCHER" = slurm ] && [[ " $* " != *" --distributed-port "* ]]; then
  # fairseq derives the rendezvous (first node of the allocation) from SLURM only with a port;
  # without one it falls back to localhost, which fails on more than one node
  DEVICE_FLAGS+=(--distributed-port "${MASTER_PORT:-$((10000 + ${SLURM_JOB_ID:-0} % 50000))}")
fi

# the recipe's flags, one per line; read into a variable first so that a recipe the tool cannot
# parse stops here with its `error:` line (a process substitution would lose its exit status)
RECIPE=$(python -m fairseq_smoe.recipes "$CONFIG" --world-size "$WORLD") || exit $?
FLAGS=()
if [ -n "$RECIPE" ]; then mapfile -t FLAGS <<<"$RECIPE"; fi
if [ "${DEVICE_FLAGS[0]:-}" = "--cpu" ]; then
  # the paper's recipes train in fp16, which fairseq can only do on a GPU: a recipe's GPU
  # precision flags are dropped here (said, and the run is fp32); --smoe-bf16 works on CPU and
  # stays. Such flags given on this command line stay too: the plugin refuses them with the fix
  # (docs/gpu.md)
  KEEP=()
  for f in "${FLAGS[@]}"; do
    case $f in
      --fp16|--memory-efficient-fp16|--bf16|--memory-efficient-bf16|--amp)
        echo "train.sh: no GPU, dropping the recipe's $f (training in fp32)" >&2 ;;
      *) KEEP+=("$f") ;;
    esac
  done
  FLAGS=("${KEEP[@]}")
fi
ALL=" ${FLAGS[*]} $* "
EP=
if [[ "$ALL" == *" --moe-expert-parallel "* ]]; then
  EP=" with --moe-expert-parallel"
  if [[ "$ALL" =~ \ --(fp16|bf16)\  ]] && [[ "$ALL" != *" --fp16-no-flatten-grads "* ]] \
      && [[ "$ALL" != *" --memory-efficient-"* ]]; then
    # fairseq's flat fp32 buffer would mix every rank's own experts into one tensor
    echo "train.sh: expert parallelism with ${BASH_REMATCH[1]}: adding --fp16-no-flatten-grads" >&2
    DEVICE_FLAGS+=(--fp16-no-flatten-grads)
  fi
fi
echo "train.sh: $CONFIG on $WORLD worker(s)$EP, launcher: $LAUNCHER ($NGPU GPU(s) visible here)" >&2
mkdir -p "$SAVE"
if [ -e "$SAVE/checkpoint_last.pt" ] && [[ "$ALL" != *" --restore-file "* ]]; then
  echo "train.sh: resuming from $SAVE/checkpoint_last.pt" >&2
fi
CMD=(fairseq-train "$DATA/data-bin" --user-dir "$ROOT/fairseq_smoe" "${FLAGS[@]}"
  --lang-pairs "$(cat "$DATA/lang_pairs.txt")" --langs "$(cat "$DATA/langs.txt")"
  --save-dir "$SAVE" "${DEVICE_FLAGS[@]}" "$@")
if [ "$LAUNCH" = exec ]; then
  exec "${CMD[@]}"
fi
# CPU_RANKS: one process per rank, as torchrun would start them; the first one to fail stops
# the others (each would also stop by itself, within --moe-ep-timeout)
PORT=${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
PIDS=()
for ((r = 0; r < WORLD; r++)); do
  "${CMD[@]}" --distributed-rank "$r" --distributed-init-method "tcp://127.0.0.1:$PORT" \
    --distributed-no-spawn &
  PIDS+=($!)
done
trap 'kill "${PIDS[@]}" 2>/dev/null' INT TERM
STATUS=0
while [ ${#PIDS[@]} -gt 0 ]; do
  STATUS=0
  wait -n -p DONE "${PIDS[@]}" || STATUS=$?
  LEFT=()
  for p in "${PIDS[@]}"; do [ "$p" = "$DONE" ] || LEFT+=("$p"); done
  PIDS=("${LEFT[@]}")
  if [ "$STATUS" -ne 0 ]; then
    echo "train.sh: a rank (pid $DONE) exited with status $STATUS; stopping the other ranks" >&2
    [ ${#PIDS[@]} -gt 0 ] && kill "${PIDS[@]}" 2>/dev/null
    wait
    break
  fi
done
exit "$STATUS"
