# fedbrats developer entry points. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedbrats-installed
DATA ?= data/phantoms
CASES ?= 16
SHAPE ?= 96
# The demo keeps each site's teacher outputs (teacher-cache): distillation steps cost about a
# supervised step instead of two, which brings the demo within 15 minutes on two cores (README).
DEMO_SETTINGS ?= --set teacher-cache=true

.PHONY: help venv synth demo test test-all lint docs-images brats2025 clean

help:
	@echo "make demo         set up .venv, generate the phantoms if absent, run the five-site simulation"
	@echo "make synth        set up .venv and write the five-population phantom data set to $(DATA)"
	@echo "make test         set up .venv and run the test suite"
	@echo "make test-all     also run the slow tests"
	@echo "make lint         ruff"
	@echo "make docs-images  regenerate docs/img/phantom-*.png"
	@echo "make brats2025    the official BraTS 2025 scorer in an environment of its own (.venv-brats2025)"

# torch 2.13.0 first: on a CPU-only host that pin takes the CPU wheel instead of the CUDA stack.
# pip's own output (and the build's warnings) go to $(VENV)/install.log; shown if it fails.
$(STAMP): pyproject.toml
	@echo "setting up $(VENV) (a few minutes the first time; log: $(VENV)/install.log)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@( $(PY) -m pip install -q --upgrade pip && \
	   $(PY) -m pip install -q torch==2.13.0 && \
	   $(PY) -m pip install -q -e ".[dev]" ) > $(VENV)/install.log 2>&1 || \
	 { tail -n 40 $(VENV)/install.log; echo "installing failed; log: $(VENV)/install.log"; exit 1; }
	@touch $(STAMP)

venv: $(STAMP)

synth: $(STAMP)
	$(VENV)/bin/fedbrats synth --out $(DATA) --cases $(CASES) --shape $(SHAPE)

demo: $(STAMP)
	$(VENV)/bin/fedbrats simulate --out runs/demo --data $(DATA) --synth --cases $(CASES) --preset cpu-demo $(DEMO_SETTINGS)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	FEDBRATS_SLOW=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

docs-images: $(STAMP)
	$(VENV)/bin/fedbrats synth --out build/docs-phantoms --cases 1 --min-cases 1 --shape 128 --seed 7
	$(VENV)/bin/fedbrats snapshot build/docs-phantoms --out docs/img

# The official BraTS 2025 scorer cannot share .venv (its panoptica needs rich<14, Flower rich>=14):
# `fedbrats evaluate --metrics brats2025` finds this environment beside the checkout.
brats2025: $(STAMP)
	$(PY) -m fedbrats.common.metrics.brats2025 .venv-brats2025

clean:
	rm -rf $(VENV) .venv-brats2025 build .pytest_cache
