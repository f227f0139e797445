# `make demo` and `make test` set everything up themselves (a .venv beside this file).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/digits_vae
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,nifti]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m jaxad.train --config=configs/digits_vae.py --workdir=$(WORKDIR)
	$(PY) -m jaxad.evaluate --workdir=$(WORKDIR)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) -m jaxad.bench --quick

clean:
	rm -rf $(VENV) workdirs .pytest_cache
