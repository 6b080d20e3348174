# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   -- set up .venv, then explain the bundled model into xnn-report/index.html
#   make test   -- set up .venv, then lint and run the whole test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_FLAGS ?= -q

.PHONY: demo test lint bench venv clean sysdeps docs

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[test,bench,notebook,imagenet,cam,quantus,docs]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xnn demo --out xnn-report --overwrite

# The documentation site: docs/_build/html/index.html. Any warning (a broken cross-reference,
# a failing gallery example) fails the build. -E rereads every page: the API pages follow the
# package's __all__ lists, and a stale environment would keep pages of moved names.
docs: $(STAMP)
	$(PY) -m sphinx -b html -W --keep-going -n -q -j 2 -E docs docs/_build/html

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Debian packages the tests use when they can: headless Chromium for the report's browser
# test, and dataset-fashion-mnist (the real training split, for the training-reproducibility
# test). Never fails the run: without apt-get or root those tests skip and say why.
SYSPKGS_MISSING = $(strip $(if $(shell command -v chromium),,chromium) \
  $(if $(wildcard /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz),,dataset-fashion-mnist))

sysdeps:
	@if [ -n "$(SYSPKGS_MISSING)" ]; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  if command -v apt-get >/dev/null 2>&1 && { [ -z "$$SUDO" ] || sudo -n true 2>/dev/null; }; then \
	    echo "installing $(SYSPKGS_MISSING) (apt-get)"; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(SYSPKGS_MISSING) >/dev/null \
	      || echo "could not install $(SYSPKGS_MISSING): the tests that need them will be skipped"; \
	  else \
	    echo "$(SYSPKGS_MISSING) missing and apt-get (as root) unavailable: those tests will be skipped"; \
	  fi; fi

test: $(STAMP) lint sysdeps docs
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	@for f in bench/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) xnn-report .pytest_cache .ruff_cache docs/_build docs/api docs/auto_examples
