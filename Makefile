# seqfast: `make test` and `make bench` set everything up on first use (venv, deps, extension).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel; a bare `torch` would pull a multi-GB CUDA build on a CPU box. transformers is
# for the tests and benchmarks on third-party models only (seqfast itself does not need it).
DEPS := torch==2.13.0 triton ninja setuptools wheel pytest pytest-xdist pytest-benchmark hypothesis expecttest numpy matplotlib ruff transformers==5.24.0
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h) setup.py seqfast/_version.py

.PHONY: all venv build test test-fast bench report lint clean

all: build

$(VENV)/.deps-installed: Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(DEPS)
	@touch $@

venv: $(VENV)/.deps-installed

# In-place build: seqfast/_C*.so next to the sources; runs from the checkout (pytest adds it to sys.path).
$(VENV)/.ext-built: $(VENV)/.deps-installed $(EXT_SOURCES)
	MAX_JOBS=2 $(PY) setup.py -q build_ext --inplace
	@touch $@

build: $(VENV)/.ext-built

test: build
	$(PY) -m pytest -q -n 2 tests

bench: build
	$(PY) benchmarks/run.py $(BENCH_ARGS)

report: venv
	$(PY) benchmarks/kernel_report.py $(REPORT_ARGS)

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf build seqfast/*.so $(VENV)/.ext-built
