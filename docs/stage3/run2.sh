#!/bin/sh
# Second try: the first fine-tune (lr 5e-4, 3000 steps = ~9 passes over 2,816 conversations) lost on
# held-out conversations of both kinds. Fewer passes at a lower rate: 700 steps (~2 passes), lr 2e-4.
set -e
C=data/corpus/smollm2-135m-instruct
DATA="$C-inputs-seed20 $C-inputs-seed21 $C-inputs-seed22 $C-openers-seed10"
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1
redrafter train --resume --init default --data $DATA --out runs/stage3/gentle \
  --hidden-cache build/hidden-stage3 --save-dtype bfloat16 \
  --steps 700 --lr 2e-4 --batch-size 8 --position-fraction 0.25 --warmup 50 \
  --eval-every 350 --checkpoint-every 100 --heldout-every 25
