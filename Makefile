# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   -- set up .venv, then explain the bundled model into xnn-report/index.html
#   make test   -- set up .venv, then lint and run the whole test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_FLAGS ?= -q

.PHONY: demo test lint bench venv clean chromium

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[test,bench,notebook]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xnn demo --out xnn-report --overwrite

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Headless Chromium for the report's browser test (Debian's package). Never fails the run:
# without apt-get or root the test skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  if command -v apt-get >/dev/null 2>&1 && { [ -z "$$SUDO" ] || sudo -n true 2>/dev/null; }; then \
	    echo "installing chromium for the browser test (apt-get)"; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null \
	      || echo "could not install chromium: the browser test will be skipped"; \
	  else \
	    echo "chromium is missing and apt-get (as root) is unavailable: the browser test will be skipped"; \
	  fi; }

test: $(STAMP) lint chromium
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	@for f in bench/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) xnn-report .pytest_cache .ruff_cache
