# seqfast: `make test` and `make bench` set everything up on first use (venv, deps, extension).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel; a bare `torch` would pull a multi-GB CUDA build on a CPU box.
# espeakng-loader: espeak-ng and its voices for examples/speech and its tests (seqfast never imports it).
# transformers: for the tests and benchmarks on third-party models only (seqfast itself does not need it).
DEPS := torch==2.13.0 triton ninja setuptools wheel pytest pytest-xdist pytest-benchmark hypothesis expecttest numpy matplotlib ruff espeakng-loader tqdm transformers==5.24.0
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h) setup.py seqfast/_version.py

.PHONY: all venv build test test-fast test-triton36 bench report lint clean gpu-check

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

# tests/test_benchmarks.py runs the benchmark suite on smoke shapes, pyctcdecode's case included.
test: build $(VENV)/.bench-deps-installed
	$(PY) -m pytest -q -n 2 tests

# The GPU machine's stack pins triton 3.6.0: the interpreter tests and the kernel report run under it too,
# in a venv of their own beside the default one (same torch, so the built extension loads in both).
# triton 3.6's interpreter converts one-element arrays with int(), which numpy 2.4 refuses: numpy<2.4 there.
VENV36 := .venv-triton36
TRITON36_TESTS := tests/test_attention_triton.py tests/test_ctc_loss_triton.py tests/test_kernel_report.py \
	tests/test_ctc_decode_triton.py tests/test_gpu_validate.py tests/test_attention_autotune.py \
	tests/test_attention_launch.py

$(VENV36)/.deps-installed: Makefile
	@test -x $(VENV36)/bin/python || $(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 triton==3.6.0 "numpy<2.4" pytest pytest-xdist hypothesis expecttest
	@touch $@

test-triton36: build $(VENV36)/.deps-installed
	$(VENV36)/bin/python -c "import triton; assert triton.__version__ == '3.6.0', triton.__version__"
	$(VENV36)/bin/python -m pytest -q -n 2 -p no:cacheprovider $(TRITON36_TESTS)

# The CTC beam search benchmark's baseline: pyctcdecode pins numpy<2 but runs on numpy 2, hence --no-deps;
# kenlm (its LM) builds from source and may fail: then the benchmark times pyctcdecode without an LM and says so.
$(VENV)/.bench-deps-installed: $(VENV)/.deps-installed
	$(PY) -m pip install -q --disable-pip-version-check --no-deps pyctcdecode==0.5.0 pygtrie
	-timeout 300 $(PY) -m pip install -q --disable-pip-version-check kenlm
	@touch $@

bench: build $(VENV)/.bench-deps-installed
	$(PY) benchmarks/run.py $(BENCH_ARGS)

report: venv
	$(PY) benchmarks/kernel_report.py $(REPORT_ARGS)

# One-shot GPU validation and timing (benchmarks/gpu_validate.py): the system python3 with its own torch and triton
# (no venv, no built extension needed); GPU_CHECK_ARGS=--dry-run proves it on CPU.
OUT ?= gpu_validate_out
gpu-check:
	python3 benchmarks/gpu_validate.py --out $(OUT) $(GPU_CHECK_ARGS)

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf build seqfast/*.so $(VENV)/.ext-built $(VENV36)
