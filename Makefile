# Two entry points: `make up` runs a local cluster on :4437 (`make up PORT=8080` elsewhere),
# `make test` runs every test
# (unit, end-to-end, and the official conformance suite at 1 and 4 shards).
# Needs only python3 (with venv), node and npm; everything else is installed here.

PYTHON ?= python3
PORT ?= 4437
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
NODE_MODULES := conformance/node_modules/.package-lock.json

.PHONY: up test install lint clean

up: $(INSTALLED)
	exec $(VENV)/bin/ds-cluster up --port $(PORT)

# Two pytest workers (pytest-xdist): most end-to-end tests wait on processes and sockets,
# so two of them share the cores well (every test binds its own free ports and temp dirs).
# A test that fails is run once more (reported as R, and as "rerun" in the summary): the
# end-to-end tests start whole clusters on a 2-core machine, where a timing bound can be
# missed once; a real fault fails both runs.
test: $(INSTALLED) $(NODE_MODULES) lint
	$(PY) -m pytest -q -n 2 --reruns 1 --reruns-delay 2

install: $(INSTALLED) $(NODE_MODULES)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependencies change; the editable install follows the sources.
$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

$(NODE_MODULES): conformance/package.json conformance/package-lock.json
	cd conformance && npm ci --no-audit --no-fund
	touch $@

clean:
	rm -rf $(VENV) conformance/node_modules .pytest_cache .mypy_cache
