# Two entry points do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# The venv is created on first use. TORCH_SPEC pins the CPU wheel that installs offline here;
# on a CUDA machine use e.g. `make TORCH_SPEC="torch>=2.4" test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: venv test demo clean

$(BIN)/m3ae: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/m3ae

venv: $(BIN)/m3ae

test: venv
	$(BIN)/python -m pytest -q

demo: venv
	bash scripts/demo.sh $(BIN)

clean:
	rm -rf $(VENV) runs
