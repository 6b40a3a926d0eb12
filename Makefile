# `make test` and `make demo` do all set-up on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: install test lint demo bench docs docs-serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Install the CPU build of torch first so the dependency below is already satisfied
	# (a bare `torch` requirement can pull a multi-GB CUDA build). Override with TORCH_SPEC=...
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples docs/hooks
	$(PY) -m ruff format --check src tests benchmarks examples docs/hooks

# The docs extra too, so that tests/test_docs.py builds the site with --strict (it skips
# that build, saying why, where mkdocs is missing). One pytest-xdist worker per CPU, each
# test file on one worker (tests/conftest.py gives each worker its share of torch's threads).
test: lint $(DOCS_STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile

demo: $(STAMP)
	$(PY) examples/logreg_weight_decay.py

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m pip install --quiet --no-deps hypergrad==0.0.1 hippotrainer==1.0.0 rich torchopt==0.7.3 optree graphviz
	$(PY) benchmarks/implicit_solvers.py
	$(PY) benchmarks/hvp_cost.py
	$(PY) benchmarks/quadratic_bilevel.py
	$(PY) benchmarks/hyperoptimizer_methods.py
	$(PY) benchmarks/vs_hippotrainer.py
	$(PY) benchmarks/mixed_precision.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/distributed.py
	$(PY) benchmarks/vs_optuna.py
	$(PY) benchmarks/vs_torchopt.py
	$(PY) benchmarks/unrolled_speed.py
	$(PY) benchmarks/hyperstep_cost.py
	$(PY) benchmarks/reuse.py
	$(PY) benchmarks/reuse.py --size 100k
	$(PY) benchmarks/product_modes.py
	$(PY) benchmarks/holdout_guard.py
	$(PY) benchmarks/hybrid_optuna.py --seeds 0 1 2
	$(PY) benchmarks/make_results_md.py

# The documentation site (mkdocs-material + mkdocstrings): the docs extra goes into .venv once.
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve --strict

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .ruff_cache
