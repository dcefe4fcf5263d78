# Everything a fresh machine needs: `make demo` runs the pipeline on the embedded default,
# `make test` runs lint and the whole test suite. Both create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Reinstall whenever pyproject.toml changes. `make demo` installs what the pipeline needs; `make stack`
# adds moto for the local stack's S3, `make test` the dev extras (pytest, ruff, import-linter, ...).
HASH       := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_STAMP := $(VENV)/.installed-demo-$(HASH)
STACK_STAMP := $(VENV)/.installed-stack-$(HASH)
DEV_STAMP  := $(VENV)/.installed-dev-$(HASH)
WORKDIR ?= work/local
ARGS    ?=

.PHONY: demo test lint bench stack mutation clean

# img2dataset 1.47 requires the Python 3.6 `dataclasses` backport; on 3.11 its dataclasses.py in site-packages
# shadows the stdlib module wherever site-packages comes first on sys.path, as in Prefect's ephemeral API
# server (uvicorn --app-dir site-packages), which then dies at start and `ldm run` with it: uninstall it.
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e .
	$(BIN)/python -m pip uninstall -y -q dataclasses
	rm -f $(VENV)/.installed-demo-*
	touch $@

$(STACK_STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install -e '.[stack]'
	$(BIN)/python -m pip uninstall -y -q dataclasses
	rm -f $(VENV)/.installed-stack-*
	touch $@

$(DEV_STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install -e '.[dev]'
	$(BIN)/python -m pip uninstall -y -q dataclasses
	rm -f $(VENV)/.installed-dev-*
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/ldm run --profile local --workdir $(WORKDIR) $(ARGS)

stack: $(STACK_STAMP)
	$(BIN)/ldm stack up

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# CI (.ci/run) runs this target: on a green run pytest's summary is its last line.
test: lint
	$(BIN)/python -m pytest -q -ra

bench: $(DEMO_STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/filter.py --workdir $(WORKDIR)
	$(BIN)/python bench/precompute.py --workdir $(WORKDIR)
	$(BIN)/python bench/vae_encode.py --workdir $(WORKDIR)
	$(BIN)/python bench/train_step.py --workdir $(WORKDIR)
	$(BIN)/python bench/sampling.py

# Mutation testing of the URL guard, manifest/identity, config validation and diffusion math (docs/TESTING.md).
# Not part of `make test`: it reruns their unit tests once per mutant. No PYTHONPATH: mutmut imports mutants/.
mutation: $(DEV_STAMP)
	rm -rf mutants
	env -u PYTHONPATH $(BIN)/mutmut run --max-children $${MUTMUT_CHILDREN:-2}
	env -u PYTHONPATH $(BIN)/mutmut results > mutation-results.txt || true
	$(BIN)/python tests/mutation_scores.py

clean:
	rm -rf work .pytest_cache mutants mutation-results.txt
