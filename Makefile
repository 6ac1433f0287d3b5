# Two entry points do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# The venv is created on first use. TORCH_SPEC pins the CPU wheel that installs offline here;
# on a CUDA machine use e.g. `make TORCH_SPEC="torch>=2.4" test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

# test-avx2 runs a few modules again with torch's and oneDNN's kernels limited to AVX2 (x86 only):
# the path of a CPU without AVX-512 (most laptops), where `precision: auto` takes fp32, exercised on
# whatever CPU runs CI. The suite's header line says which kernels and precision each run got.
AVX2_TESTS ?= tests/test_official_parity.py tests/test_train_loop.py

.PHONY: venv test test-avx2 demo clean

$(BIN)/m3ae: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/m3ae

venv: $(BIN)/m3ae

test: venv
	$(BIN)/python -m pytest -q

test-avx2: venv
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q $(AVX2_TESTS)

demo: venv
	bash scripts/demo.sh $(BIN)

clean:
	rm -rf $(VENV) runs
