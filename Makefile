# Two commands set up a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: venv demo test bench gpu-check lint typecheck clean chromium fuzz

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: this takes the CPU build, not a multi-GB CUDA one
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/diffsplit demo --dir demo-output

# Headless Chromium renders the HTML report in the profile tests; those tests
# skip with a reason where it cannot be installed (no root, no package registry).
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: HTML rendering tests will be skipped"; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider bench --benchmark-columns=min,median,max,rounds

# Full-size random-weight SD 1.5 and SDXL on one CUDA GPU, locally and on a worker (under 5 min on an H200):
# `make gpu-check GPU_CHECK_ARGS="--out gpu-check.json"`. Without CUDA it says so and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)

# The worker fuzz tests at length: 100,000 cases unless DIFFSPLIT_FUZZ_EXAMPLES says otherwise
# (`make fuzz DIFFSPLIT_FUZZ_EXAMPLES=20000`); prints the worker's RSS after warm-up and at the end.
fuzz: $(STAMP)
	DIFFSPLIT_FUZZ_EXAMPLES=$${DIFFSPLIT_FUZZ_EXAMPLES:-100000} $(BIN)/python -m pytest -q -s -p no:cacheprovider \
	  --timeout=0 tests/remote/test_fuzz_worker.py

lint: $(STAMP)
	$(BIN)/ruff check .

# mypy --strict on transport/, tracer/ and remote/ (STRICT_PACKAGES="engine profiles" to see the others)
typecheck: $(STAMP)
	.ci/typecheck

clean:
	rm -rf $(VENV) demo-output build *.egg-info
