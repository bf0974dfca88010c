#!/bin/sh
# Lever 1 (#16): fine-tune the shipped drafter for the same steps on the same data, with and without
# fused layers 2 and 15; one thread (the long-input corpus generator has the other core).
set -e
C=data/corpus/smollm2-135m-instruct
DATA="$C-seed9 $C-openers-seed10"
ARGS="--init default --steps 1500 --lr 5e-4 --batch-size 8 --position-fraction 0.25 --warmup 100 --eval-every 750 --checkpoint-every 250 --heldout-every 25 --resume"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
redrafter train $ARGS --data $DATA --fused-layers 2 15 --hidden-cache build/hidden-fused-2-15 --out runs/fusion/fused
redrafter train $ARGS --data $DATA --hidden-cache build/hidden-final --out runs/fusion/final
