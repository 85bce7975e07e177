# Two entry points (see README, Quick start):
#   make demo  -> create .venv, install, train the default synthetic config, evaluate, draw predictions
#   make test  -> create .venv, install, run the test suite
# EXTRAS picks the optional dependencies installed with the package; CI adds `convert` (torch and
# torchvision) so the torchvision parity tests run: make test EXTRAS=test,convert
PYTHON ?= python3
EXTRAS ?= test
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: venv demo test bench clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed-$(EXTRAS)

demo: venv
	$(PY) -m ssdjax.demo --workdir=$(WORKDIR)

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The interleaved suite against torchvision (needs torch: EXTRAS=test,convert); writes BENCHMARKS.md.
bench: venv
	$(PY) benchmarks/suite.py --write=BENCHMARKS.md

clean:
	rm -rf $(VENV) runs
