# Two commands do all the set-up on a fresh machine:
#   make main   # in-context linear regression study at its default size
#   make test   # the test suite (installs the dev and reference extras: torch/timm for the converter tests)
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/icl_regression

define mkvenv
	@test -x $(PY) || $$(scripts/find_python.sh) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
endef

$(VENV)/.installed: pyproject.toml
	$(mkvenv)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

$(VENV)/.installed-test: pyproject.toml
	$(mkvenv)
	$(PY) -m pip install -q -e ".[dev,reference]"
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed

main: $(VENV)/.installed
	$(PY) -m experiments.icl_regression --workdir=$(WORKDIR)

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 -q tests

.PHONY: install main test
