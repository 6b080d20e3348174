# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   -- set up .venv, then explain the bundled model into xnn-report/index.html
#   make test   -- set up .venv, then lint and run the whole test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_FLAGS ?= -q

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[test,bench,notebook]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xnn demo --out xnn-report --overwrite

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	@for f in bench/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) xnn-report .pytest_cache .ruff_cache
