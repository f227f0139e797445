# `make demo` and `make test` set everything up themselves (a .venv beside this file).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/digits_vae
PYTEST_ARGS ?=
# Test files run in parallel, one worker per core of the 2-core CI machine.
PYTEST_WORKERS ?= 2

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
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: install
	$(PY) -m jaxad.bench --quick

clean:
	rm -rf $(VENV) workdirs .pytest_cache
