# Two commands a newcomer needs: `make demo` and `make test` (`make test-fast`: the pure tests only).
# They create .venv and install everything they need on first use (pinned by constraints.txt).
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.manu-installed
# torch is installed first: the CPU build where there is no CUDA (an unpinned `torch` would pull a
# multi-GB CUDA build). Off this project's machines, point pip at PyTorch's CPU wheel index with
# TORCH_PIP_ARGS="--index-url <cpu index>" if plain `pip install torch==2.13.0` gives a CUDA build.
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist) for `make test`: three on CI's two cores, each file on one worker (its
# module fixtures, e.g. one flow run shared by a file's tests, run once); each worker uses one torch
# thread. Three, not two: much of the suite waits (servers starting, workers polling, subprocesses
# importing, a worker waiting for the preset another one trains), and the third worker fills those
# waits (README, "Tests and benchmarks": measured side by side with two and four).
TEST_WORKERS ?= 3
# `make test-fast`: pure tests, CPU-bound from start to end; two workers, one per core.
FAST_WORKERS ?= 2

.PHONY: install demo test test-fast bench clean-artifacts ui-shots

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing torch==$(TORCH_VERSION) (CUDA build)"; \
	else \
		echo "no CUDA: installing torch==$(TORCH_VERSION) (CPU build) first"; \
	fi
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH_PIP_ARGS) "torch==$(TORCH_VERSION)"
	@# the rest through uv, with the same pins (parallel downloads: ~10 s where pip takes ~80 s); pip where
	@# uv cannot be installed or fails. --compile-bytecode: uv writes no .pyc files (pip does), and where
	@# PYTHONDONTWRITEBYTECODE is set (as on CI) no import writes them either, so every process would
	@# compile transformers and prefect from source again: ~5 s of CPU each (README, "Tests and benchmarks")
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt uv \
		&& $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt -e ".[test]" \
		|| $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

# A CUDA torch for a GPU server (bench/gpu_check.sh refuses to run on a CPU build): `make install` keeps
# whichever build pip chose, the CPU one where it found no CUDA or pip points at a CPU index. This puts
# torch==$(TORCH_VERSION)+$(TORCH_CUDA) from PyTorch's CUDA index over it (pip replaces a +cpu build), then
# the rest as `make install` does, and says what it got. Another CUDA: make install-gpu TORCH_CUDA=cu126.
TORCH_CUDA ?= cu128
TORCH_GPU_INDEX ?= https://download.pytorch.org/whl/$(TORCH_CUDA)
.PHONY: install-gpu
install-gpu: $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check --index-url $(TORCH_GPU_INDEX) "torch==$(TORCH_VERSION)+$(TORCH_CUDA)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
	@touch $(STAMP)
	@$(BIN)/python -c "import torch; ok = torch.version.cuda is not None; \
		print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}'); \
		raise SystemExit(0 if ok else 'install-gpu: still a CPU build of torch; check TORCH_GPU_INDEX')"

demo: $(STAMP)
	$(BIN)/manu run --model lite

# Files are handed out in the order tests/conftest.py sets (LONG_FILES), not xdist's by test count.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The pure tests: no trained model, no Prefect server (under a minute on 2 cores). No module fixture
# is worth a whole file per worker here, so tests go to whichever worker is free (worksteal).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(FAST_WORKERS) --dist worksteal -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_extract.py
	$(BIN)/python bench/bench_importance.py

# The Prefect UI in headless Chromium (apt-get install chromium): a server, the smoke deployment through a
# worker, then the screenshots in docs/ui/ (the README shows two). About 2 min once `tiny` is trained.
ui-shots: $(STAMP)
	$(BIN)/python docs/make_ui_shots.py

clean-artifacts:
	rm -rf artifacts/*
