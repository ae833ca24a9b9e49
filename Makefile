# flowrl: the two set-up commands of the README.
#   make demo  - create/refresh .venv, install, train the embedded toy run end to end (~11 min)
#   make test  - install dev deps and run the whole suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# the toy world (issue 3): DiffusionNFT on the shipped toy SD3 pipeline, at most 570 s of training
# plus two held-out evaluations (~11 min on 2 cores). A 30-second smoke run of the loop instead:
# make demo DEMO_CONFIG=examples/toy/tiny_grpo.yaml
DEMO_CONFIG ?= examples/toy/nft_10min.yaml

.PHONY: demo test venv tools clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch: take the CPU build 2.13.0 when no torch is installed yet (pyproject keeps a range,
# so a CUDA build already in the environment is kept).
$(STAMP): $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP) tools

# promtool checks deploy/prometheus.yml and the Prometheus server scrapes a live run
# (tests/deploy/test_prometheus.py, tests/integration/test_prometheus_live.py; both marked
# integration). Both binaries ship in Debian's `prometheus` package; only they are unpacked
# into the venv, so no Prometheus service gets installed or started. Where apt cannot fetch the
# package, the tests fail and say how to get the binaries (never a silent skip).
PROM_TOOLS := promtool prometheus

tools: $(BIN)/python
	@missing=""; for t in $(PROM_TOOLS); do \
	  command -v $$t >/dev/null 2>&1 || [ -x $(BIN)/$$t ] || missing="$$missing $$t"; done; \
	[ -z "$$missing" ] || { \
	  tmp=$$(mktemp -d); \
	  ( cd $$tmp && { apt-get download prometheus || { apt-get update -qq && apt-get download prometheus; }; } \
	    && dpkg-deb -x prometheus_*.deb unpacked ) >/dev/null 2>&1 \
	    && ( for t in $$missing; do cp $$tmp/unpacked/usr/bin/$$t $(BIN)/$$t || exit 1; done ) \
	    || echo "make: could not unpack$$missing from Debian's prometheus package; the Prometheus tests will fail until they are installed" >&2; \
	  rm -rf $$tmp; }

demo: $(STAMP)
	$(BIN)/flowrl train $(DEMO_CONFIG)

test: $(STAMP) tools
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
