# Two commands do all the set-up on a fresh machine:
#   make main   # in-context linear regression study at its default size
#   make test   # the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/icl_regression

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $$(scripts/find_python.sh) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

main: $(VENV)/.installed
	$(PY) -m experiments.icl_regression --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q tests

.PHONY: install main test
