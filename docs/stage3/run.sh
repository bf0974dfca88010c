#!/bin/sh
# #16 lever 2: fine-tune the shipped drafter on the conversations over long given inputs
# (seeds 20-22) mixed with one chat folder (openers-seed10) so it keeps what it knows.
set -e
C=data/corpus/smollm2-135m-instruct
DATA="$C-inputs-seed20 $C-inputs-seed21 $C-inputs-seed22 $C-openers-seed10"
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1
redrafter train --resume --init default --data $DATA --out runs/stage3/drafter \
  --hidden-cache build/hidden-stage3 --save-dtype bfloat16 \
  --steps 3000 --lr 5e-4 --batch-size 8 --position-fraction 0.25 --warmup 100 \
  --eval-every 1000 --checkpoint-every 250 --heldout-every 25
