# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both bootstrap .venv first; torch is pinned through constraints.txt (see README, "Setup").

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RESULTS ?= results

.PHONY: venv data demo test test-all clean-results help bench bench-check bench-targets paper-price wheel-check

help:
	@echo "make demo      set up .venv, judge every claim of the paper from three seeds (quick cells) -> $(RESULTS)/demo/report.html"
	@echo "make data      set up .venv, generate and check the reference data the tests need (two at a time)"
	@echo "make test      set up .venv and run the test suite (slow tests excluded)"
	@echo "make test-all  the test suite including tests marked slow"
	@echo "make wheel-check  build sdist + wheel, pip-install it and the zuko example into a fresh venv, run the README's bring-your-own-flow walk-through elsewhere (CI)"
	@echo "make bench     asv benchmarks of this commit -> .asv/results, dashboard .asv/html (asv preview)"
	@echo "make bench-check  run every asv benchmark once, reduced sizes, nothing saved (CI)"
	@echo "make bench-targets  measure the performance-target ratios (JSON on stdout)"
	@echo "make paper-price  run every task's calibrate profile (resumable), then price the paper grid"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Every claim of the paper judged from three seeds (eqbench.demo: narrowed quick cells on DW-2 and
# DW-4 in one pool of two workers), then the HTML report and the headline table on the terminal.
# Rerunning skips finished cells.
demo: $(STAMP)
	$(PY) -m eqbench data dw4 dw2 --jobs 2
	$(PY) -m eqbench demo --jobs 2 --threads 1 --results $(RESULTS)/demo

# What the full paper grid costs on this machine: every task's calibrate profile (the paper's
# per-unit settings, few units of work; 20 min with two workers here), then `--dry-run` of the paper
# profile priced from those cells. Rerunning skips finished calibration cells.
PAPER_TASKS = density-estimation bg-reweighting metastable-states divergence-cost dto-vs-otd timing
CALIBRATION ?= $(RESULTS)/calibrate
JOBS ?= 2

paper-price: $(STAMP)
	for task in $(PAPER_TASKS); do \
		$(PY) -m eqbench sweep --task $$task --profile calibrate --jobs $(JOBS) --threads 1 \
			--results $(CALIBRATION) --no-plot || echo "($$task: failed calibration cells leave their paper cells unpriced)"; done
	for task in $(PAPER_TASKS); do echo "== $$task"; \
		$(PY) -m eqbench sweep --task $$task --profile paper --dry-run --jobs $(JOBS) \
			--results $(RESULTS)/paper --calibrate $(CALIBRATION) --summary; done

# Reference data first, two data sets at a time (a fresh cache: ~13 min of Metropolis one after
# the other, dominated by LJ-13; half that side by side on 2 cores); cached runs skip it in seconds.
# Systems in eqbench.catalog.DATA_ON_REQUEST (lj13-single) are left out: `eqbench data lj13-single`.
data: $(STAMP)
	$(PY) -m eqbench data --jobs 2 > $(VENV)/data-diagnostics.txt
	@echo "reference data ready (diagnostics: $(VENV)/data-diagnostics.txt)"

# One single-threaded pytest worker per core (TEST_JOBS, default 2, the machine CI runs on): the
# suite is hundreds of small independent tests, so two workers halve its wall time where two
# torch threads in one process would slow it. --dist loadfile keeps each file in one worker, so
# a file's tests that share a built wheel or a module-scoped fixture never race each other.
TEST_JOBS ?= 2
PYTEST_PARALLEL := -n $(TEST_JOBS) --dist loadfile

test: data
	$(PY) -m pytest -m "not slow" -q $(PYTEST_PARALLEL)

test-all: data
	$(PY) -m pytest -q $(PYTEST_PARALLEL)

# `pip install .` / a wheel must work outside the checkout: build the sdist and, from it, the wheel
# (as pip does from an sdist) into $(DIST)/, install the wheel with its dependencies into a fresh
# venv, and run one smoke cell and the report from a temporary directory; the reference data come
# from the user's cache ($EQBENCH_CACHE or ~/.cache/eqbench) as always. --no-compile: compiling
# torch's bytecode at install time took ~100 of the ~150 s; Python compiles what it imports.
# .venv's pip installs into the new venv (--python), which saves ensurepip's ~12 s.
DIST ?= dist
wheel-check: $(STAMP)
	@set -e; start=$$(date +%s); tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	rm -f $(DIST)/eqbench-*; \
	$(PY) -m build --no-isolation --outdir $(DIST) . > "$$tmp/build.log" 2>&1 || { cat "$$tmp/build.log"; exit 1; }; \
	wheel=$$(cd $(DIST) && ls "$$PWD"/eqbench-*.whl); \
	$(PYTHON) -m venv --without-pip "$$tmp/venv"; \
	$(PY) -m pip --python "$$tmp/venv/bin/python" install --quiet --no-compile -c constraints.txt "$$wheel"; \
	$(PY) -m pip --python "$$tmp/venv/bin/python" install --quiet --no-compile -c constraints.txt \
		"$(CURDIR)/examples/zuko_spline"; \
	echo "wheel-check: built and installed in $$(( $$(date +%s) - start )) s"; \
	mkdir "$$tmp/work"; cd "$$tmp/work"; \
	"$$tmp/venv/bin/python" -c 'import sys, eqbench, eqbench.config as c, eqbench.report as r; \
	site = sys.argv[1]; paths = [eqbench.__file__, c.tasks_dir(), r.baselines_path()]; \
	assert all(str(p).startswith(site) for p in paths), f"not the installed copy: {paths}"; \
	assert len(r.load_baselines()) > 0, "no published baselines shipped"' "$$tmp/venv/"; \
	PATH="$$tmp/venv/bin:$$PATH" bash "$(CURDIR)/examples/zuko_spline/walkthrough.sh" "$$tmp/work/results"; \
	cd /; rm -rf "$$tmp"; \
	echo "wheel-check ok in $$(( $$(date +%s) - start )) s, cleanup of the venv included ($$wheel)"

clean-results:
	rm -rf $(RESULTS)/*/cells $(RESULTS)/*/results.csv

# ---- performance tracking (asv; README "Performance tracking") ------------------------------
# Timings need a fixed environment: one torch thread, and glibc's mmap/trim thresholds raised
# so large tensors are not returned to the OS after every operation (2-4x slower and erratic
# otherwise). The variables must be set before the interpreter starts; the suites also call
# eqbench.timing.stable_malloc() (mallopt, same effect) in every setup.
ASV := $(VENV)/bin/asv
BENCH_STAMP := $(VENV)/.bench-stamp
BENCH_ENV := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483648 \
	EQBENCH_BENCH_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(ASV) machine --yes
	$(BENCH_ENV) $(ASV) run --python=same --set-commit-hash $$(git rev-parse HEAD)
	$(ASV) publish
	@echo "dashboard: .asv/html/index.html (serve it with: $(ASV) preview)"

# Every benchmark once (--quick), at reduced sizes (EQBENCH_BENCH_SMOKE=1), results not saved;
# exits non-zero when any benchmark fails to import, set up or run.
bench-check: $(BENCH_STAMP)
	$(ASV) machine --yes
	$(BENCH_ENV) EQBENCH_BENCH_SMOKE=1 $(ASV) run --python=same --quick --dry-run --show-stderr --launch-method=forkserver

# The performance targets of the note (ratios, medians of repeats; about 5 minutes on 2 cores).
bench-targets: $(STAMP)
	$(BENCH_ENV) $(PY) -m benchmarks.targets
