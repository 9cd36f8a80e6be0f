# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DeepSpeed compiles a small C++ op on first use; keep it across runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_BUILD_OPS := 0

.PHONY: install system-deps demo test test-fast test-floors fuzz lint compile bench bench-gpu clean images checkov check-cluster triton-venv

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

test: install checkov triton-venv
	$(BIN)/ruff check .
	$(BIN)/pytest -q -ra --durations=15 -n auto --dist loadfile

test-fast: install
	$(BIN)/pytest -q -m "not slow"

# The dependency floors of pyproject installed (uv, lowest allowed versions, layered over $(VENV)) and
# a wider set of unit tests run on them than tests/test_dependency_floors.py runs in `make test`.
test-floors: install
	$(BIN)/python -m tests.floors

# The generated-input tests at length, with a fresh seed each run (CI runs a small fixed set):
# data prep over hostile corpora and the predictor under schemathesis. FUZZ_EXAMPLES per test.
FUZZ_EXAMPLES ?= 2000
fuzz: install
	OMNI_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) OMNI_FUZZ_RANDOM=1 $(BIN)/pytest -q -p no:cacheprovider \
	  tests/model/data/test_prep_fuzz.py tests/serving/test_fuzz_requests.py

lint: install
	$(BIN)/ruff check .

compile: install
	$(BIN)/omni pipeline compile

# Training throughput (packed vs padded, FLOP/s vs GEMM peak), data-prep records/s, video
# sampling by seek vs decode-every-frame, peak RSS of composing pretrained parts, and serving
# (8 clients / 1, endpoint / in-process latency, a 10,000-request mixed load): see benchmarks/README.md.
bench: install
	$(BIN)/python -m benchmarks.bench_training
	$(BIN)/python -m benchmarks.bench_data
	$(BIN)/python -m benchmarks.bench_compose
	$(BIN)/python -m benchmarks.bench_serving

# Serving and training against the accelerator's own peak (benchmarks/bench_gpu.py); SIZE=tiny runs on a CPU.
SIZE ?= 1.5b
bench-gpu: install
	$(BIN)/python -m benchmarks.bench_gpu --size $(SIZE)

# The real tritonserver the tests start (serving/triton.py): the models get their own venv with
# numpy<2 (Triton 2.51's Python-backend stub breaks with numpy 2) and nvidia-pytriton's CPU server.
TRITON_VENV := .cache/triton-venv
triton-venv: $(TRITON_VENV)/.omni-ready

$(TRITON_VENV)/.omni-ready: | install
	$(BIN)/python -c 'from serving.triton import ensure_models_venv; ensure_models_venv("$(TRITON_VENV)")'

# Cluster artifacts (docs/deploy.md). checkov gets its own venv: its pins (packaging<24, networkx<2.7,
# tabulate<0.10, ...) clash with torch, mlflow and kfp in $(VENV).
CHECKOV_VENV := .cache/checkov-venv
checkov: $(CHECKOV_VENV)/.installed

$(CHECKOV_VENV)/.installed: constraints-checkov.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q -c constraints-checkov.txt checkov==3.3.30
	touch $@

# Render with default and production-like values, then kubernetes-validate --strict, CRD jsonschema,
# yamllint, helm lint, checkov (manifests + Dockerfiles) and hadolint. tests/components/cluster runs the same.
check-cluster: install checkov
	$(BIN)/python -m components.cluster.check --out build/cluster

# Build the cpu/gpu/serving images with the tags in conf/cluster. Exits 3 without a Docker engine
# (nothing built must not pass for built); `make images ARGS=--dry-run` prints the commands,
# `ARGS=--push` pushes.
images: install
	$(BIN)/python -m components.cluster.images $(ARGS)

clean:
	rm -rf .omni .pytest_cache .ruff_cache
