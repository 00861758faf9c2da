# mailwall: `make run` starts the quick start on loopback, `make test` runs the tests.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV   := .venv
VPY    := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: run test unit bench fuzz soak install clean

$(VENV)/.installed: setup.cfg setup.py
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "mailwall needs Python 3.11 or newer ($(PYTHON))"; exit 1; }
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV) || \
	  { echo "cannot create $(VENV): on Debian install python3-venv"; exit 1; }
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

run: $(VENV)/.installed
	$(VPY) demo/run.py

test: $(VENV)/.installed
	$(VPY) -m pytest -q $(PYTEST_ARGS)

unit: $(VENV)/.installed
	$(VPY) -m pytest -q tests/unit

clean:
	rm -rf $(VENV) demo/run build *.egg-info .pytest_cache .hypothesis

# Benchmarks against the real peers (issue 6; needs root and the Debian peers, installs nothing)
bench: $(VENV)/.installed
	$(VPY) bench/run.py $(BENCH_ARGS)
