# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both bootstrap .venv first; torch is pinned through constraints.txt (see README, "Setup").

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RESULTS ?= results

.PHONY: venv demo test test-all clean-results help

help:
	@echo "make demo      set up .venv, generate reference data, run the quick benchmark -> $(RESULTS)/results.csv"
	@echo "make test      set up .venv and run the test suite (slow tests excluded)"
	@echo "make test-all  the test suite including tests marked slow"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m eqbench data dw4 lj13
	$(PY) -m eqbench run --task test-nll --model gaussian --system dw4 --profile quick --results $(RESULTS)
	$(PY) -m eqbench run --task test-nll --model kernel-flow --system dw4 --profile quick --results $(RESULTS)
	$(PY) -m eqbench run --task test-nll --model node --system dw4 --profile quick --results $(RESULTS)
	$(PY) -m eqbench run --task test-nll --model gaussian --system lj13 --profile quick --results $(RESULTS)
	$(PY) -m eqbench collect --results $(RESULTS)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

clean-results:
	rm -rf $(RESULTS)/cells $(RESULTS)/results.csv
