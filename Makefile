# tinyk: `make demo` trains a chat model end to end on CPU; `make test` runs the test suite.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: venv test test-llama-cpp demo lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" -e ".[data,plot,demo,test]"
	touch $(STAMP)

# Tests in JOBS processes (pytest-xdist): on 2 cores two of them overlap the suite's many subprocesses,
# servers and browser waits (5.5 to 8 minutes on a 2-core EPYC); JOBS=0 runs them in this process.
JOBS ?= 2
test: venv
	bash tests/install_test_tools.sh
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -x -n $(JOBS)

# The GGUF tests against llama.cpp itself, built from source first (minutes; needs cmake and g++).
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
test-llama-cpp: venv
	LLAMA_CPP_PYTHON_VERSION=$(LLAMA_CPP_PYTHON_VERSION) bash tests/build_llama_cpp.sh
	TINYK_LLAMA_CPP=$(CURDIR)/.cache/llama.cpp-$(LLAMA_CPP_PYTHON_VERSION)/build/bin $(PY) -m pytest tests/test_gguf.py

demo: venv
	$(PY) -m tinyk demo --out runs/demo

lint: venv
	$(PY) -m ruff check src tests bench

clean:
	rm -rf runs build .pytest_cache .cache
