# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DeepSpeed compiles a small C++ op on first use; keep it across runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_BUILD_OPS := 0

.PHONY: install system-deps demo test test-fast lint compile bench clean

install: $(VENV)/.installed

# espeak-ng makes the demo's speech; g++ builds DeepSpeed's CPU op. Installed only when missing.
system-deps:
	@missing=""; command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml constraints.txt | system-deps
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (torch 2.13.0 CPU wheel)"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: nothing below may pull another torch build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: install
	$(BIN)/omni demo

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q -ra --durations=15

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

compile: install
	$(BIN)/omni pipeline compile

# Training throughput (packed vs padded, FLOP/s vs GEMM peak): see benchmarks/README.md.
bench: install
	$(BIN)/python -m benchmarks.bench_training

clean:
	rm -rf .omni .pytest_cache .ruff_cache
