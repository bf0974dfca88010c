#!/usr/bin/env bash
# Issue #16, levers 2 and 3, in one call on a lent GPU (an H200 here): the target self-distils
# conversations over long given inputs, then three fine-tunes of the shipped drafter train on every
# corpus folder, side by side. Each phase is bounded in time; what a phase finished is kept (complete
# corpus shards; a drafter's last checkpoint). Run from the repository root with redrafter importable.
#
# Scaled down on a CPU to check the flow: DEVICE=cpu GEN_SECONDS=60 BATCH=4 STEPS=4 ... bash run.sh
set -uo pipefail
RUN=${RUN:-runs/inputs-gpu}
DEVICE=${DEVICE:-cuda}
GENERATORS=${GENERATORS:-6}      # generator processes sharing the device, seeds 23, 24, ...
BATCH=${BATCH:-512}              # conversations per generation batch and per shard
NUM_PROMPTS=${NUM_PROMPTS:-16384}  # per generator: more than the time allows; whole shards are kept
GEN_SECONDS=${GEN_SECONDS:-230}
STEPS=${STEPS:-4000}
TRAIN_SECONDS=${TRAIN_SECONDS:-260}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
RD="python3 -m redrafter.cli"
CORPUS=data/corpus/smollm2-135m-instruct
mkdir -p "$RUN"
date +%s >"$RUN/start"

# Convert the GGUF once, before the generators start side by side.
python3 -c "from redrafter.models import resolve_model_path; print(resolve_model_path('default'))"

echo "== distill: $GENERATORS generators, ${GEN_SECONDS}s"
for i in $(seq 0 $((GENERATORS - 1))); do
  seed=$((23 + i))
  timeout -s INT "$GEN_SECONDS" $RD distill --device "$DEVICE" --out "$CORPUS-inputs-gpu-seed$seed" --seed $seed \
    --num-prompts "$NUM_PROMPTS" --shard-size "$BATCH" --batch-size "$BATCH" --max-new-tokens 256 \
    --openers default --prompt-max-tokens 96 --tasks default >"$RUN/distill-$seed.log" 2>&1 &
done
wait
for f in "$CORPUS"-inputs-gpu-seed*; do echo "$f: $(ls "$f" | grep -c '^shard-') shards"; done

echo "== train: 3 arms, $STEPS steps, ${TRAIN_SECONDS}s"
FOLDERS=${DATA:-$(ls -d "$CORPUS" "$CORPUS"-seed* "$CORPUS"-gpu-seed* "$CORPUS"-openers-seed* "$CORPUS"-inputs-seed* \
  "$CORPUS"-inputs-gpu-seed*)}
DATA=""
for f in $FOLDERS; do compgen -G "$f/shard-*" >/dev/null && DATA="$DATA $f"; done  # a generator may have made none
echo "data:$DATA"
COMMON="--device $DEVICE --init default --steps $STEPS --warmup 200 --eval-every $STEPS --checkpoint-every 500
  --heldout-every 25 --save-dtype bfloat16"
arm() {  # name, then the arm's own options
  local name=$1
  shift
  timeout -s INT "$TRAIN_SECONDS" $RD train --data $DATA --out "$RUN/$name" $COMMON "$@" >"$RUN/train-$name.log" 2>&1
}
arm a --lr 5e-4 --batch-size 8 --position-fraction 0.25 &
arm b --lr 5e-4 --batch-size 16 --position-fraction 0.5 &
arm c --lr 2e-4 --batch-size 16 --position-fraction 0.5 &
wait
echo "seconds: $(($(date +%s) - $(cat "$RUN/start")))"
