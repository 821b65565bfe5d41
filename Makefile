# Two commands for a new user: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config.yaml

.PHONY: install run test lint audit bench bench-short soak soak-short clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

## make run: set up, write the demo backups (into a new root only), serve the embedded default
## on 127.0.0.1:8080 (GATEWAY_PORT=8081 make run for another port; a busy one stops both steps)
run: install
	$(BIN)/backup-gateway seed-demo --config $(CONFIG)
	$(BIN)/backup-gateway serve --config $(CONFIG)

## make test: set up and run the whole suite (a run that collects no test fails)
test: install
	@$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy gateway storage_backends bench tests

## make audit: known advisories against the installed set; fails on any not in audit-ignores.txt,
## and on a package it could not audit (--strict: an unreachable database is not a pass)
audit: install
	$(BIN)/pip install -q pip-audit
	$(BIN)/pip-audit --strict --progress-spinner off \
	  $$(grep -v '^#' audit-ignores.txt | awk 'NF {print "--ignore-vuln", $$1}')

## make bench: the standing benchmark (rows a-d, ratios, objects-gone check; wrk when present)
bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/run.py --sweep --memory
	$(BIN)/python bench/ingest.py

## make bench-short: a few seconds a row; fails only on errors, never on speed (CI)
bench-short: install
	$(BIN)/python bench/run.py --short
	$(BIN)/python bench/ingest.py --short

## make soak: 10 minutes of mixed traffic on local and S3; make soak-short: 30 s each (CI)
soak: install
	$(BIN)/python bench/soak.py

soak-short: install
	$(BIN)/python bench/soak.py --short

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
