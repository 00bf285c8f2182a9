# Two commands do all the set-up on a fresh machine:
#   make main   # in-context linear regression study at its default size
#   make test   # the test suite (installs the dev and reference extras: torch/timm for the converter tests, natten)
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
	@# NATTEN (reference for neighborhood attention; builds from source against
	@# the torch just installed, without its CUDA library): its tests skip
	@# when the build is not possible here.
	$(PY) -m pip install -q --no-build-isolation --no-deps natten==0.21.7 || \
	  echo "natten could not be built: its reference tests will be skipped"
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed

main: $(VENV)/.installed
	$(PY) -m experiments.icl_regression --workdir=$(WORKDIR)

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --dist worksteal -q tests

.PHONY: install main test
