# The two set-up commands of the README: `make demo` and `make test`. Both create or update .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_MODEL ?= qwen2.5-coder:0.5b
DEMO_PROMPT ?= Write a Python function that returns the n-th Fibonacci number, with a one-line docstring.

.PHONY: demo test venv browser test-tools clean-venv llama-cpp

venv: $(STAMP)

# torch is pinned to the CPU build this machine keeps on disk (pip's find-links); everything else to requirements.lock.
$(STAMP): pyproject.toml setup.py requirements.lock qwenkit/kernels/build.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/qwenkit pull $(DEMO_MODEL)
	$(BIN)/qwenkit run $(DEMO_MODEL) "$(DEMO_PROMPT)" --temperature 0 --max-tokens 160

test: $(STAMP) browser test-tools
	$(BIN)/python -m pytest -q

# Debian's chromium, for the test that opens the live-caption page in a real browser (skipped where it cannot be had).
browser:
	@scripts/ensure_chromium.sh

# Debian's aarch64 cross compiler and qemu-user, for the test of the Arm kernels (skipped where they cannot be had).
test-tools:
	@scripts/ensure_test_tools.sh

# The CPU speed peer for benchmarks/: builds llama-cpp-python once per machine (30-40 min on 2 cores), then caches it.
llama-cpp: $(STAMP)
	scripts/build_llama_cpp.sh

clean-venv:
	rm -rf $(VENV)
