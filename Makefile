# Two commands on a fresh machine with only Python: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-all lint install compare bench clean

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## The main experiment on the bundled default data: TAME on Split-Digits (scikit-learn digits).
run: $(STAMP)
	$(VENV)/bin/adaptlab fit --config configs/tame/split_digits.yaml

## The default test suite (what CI runs): fast tests, Avalanche ones included.
test: $(STAMP)
	$(PY) -m pytest -q

## Also the heavier tests marked `slow`.
test-all: $(STAMP)
	$(PY) -m pytest -q -m "not cuda"

lint: $(STAMP)
	$(PY) -m ruff check adaptlab strategies streams tools tests

clean:
	rm -rf $(VENV) lightning_logs build *.egg-info
