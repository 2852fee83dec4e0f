# flexio: `make run` installs and generates with the default model; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROMPT ?= The capital of France is
MODEL  ?= smollm2

.PHONY: install run test test-all bench bench-kernels bench-io bench-peer bench-sweep clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/python -m flexio generate --model '$(MODEL)' --prompt '$(PROMPT)' -n 64

# The fast suite (what CI runs), in one worker per core (pytest-xdist; a test file stays in one worker, so its
# module fixtures are built once). FLEXIO_SLOW=1 adds the slow tests. WORKERS=0 runs in this process.
WORKERS ?= auto
test: install
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile $(if $(FLEXIO_SLOW),,-m 'not slow')

test-all: install
	FLEXIO_SLOW=1 $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile

bench: bench-kernels bench-io bench-peer

bench-kernels: install
	$(BIN)/python bench/kernels.py

bench-io: install
	$(BIN)/python -m flexio bench-io $$($(BIN)/python -m flexio fetch $(MODEL)) --json

bench-peer: install
	$(BIN)/python -m flexio bench-peer $(MODEL)

# throughput vs memory budget on a 7B-shaped model (synthesized once, 3.9 GB); JSON lines + PNG in bench/results
SWEEP_MODEL ?= $(HOME)/.cache/flexio/llama2-7b-q4_0.gguf
bench-sweep: install
	test -f $(SWEEP_MODEL) || $(BIN)/python -m flexio synth --like llama2-7b --quant q4_0 --out $(SWEEP_MODEL)
	$(BIN)/python -m flexio bench-sweep $(SWEEP_MODEL) --budgets 10%,25%,50%,75%,90% \
		--modes flexinfer,no-balance,prefetch-only,sync,mmap -n 8 --reps 2 \
		--out bench/results/sweep-llama2-7b-q4_0.png | tee bench/results/sweep-llama2-7b-q4_0.jsonl

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
