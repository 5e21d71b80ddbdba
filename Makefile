# nextscale — every target runs inside .venv, created by `make install` on first use.
# Stage targets take CONFIG=configs/<file>.yaml and ARGS="key.sub=value ..." and use the Ray cluster
# in RAY_ADDRESS when it is set, a local Ray instance otherwise.

PYTHON ?= python3
VENV ?= .venv
# torch is installed first so that pip does not pick an arbitrary build for torchvision/torch-fidelity
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
NS := $(BIN)/nextscale
STAMP := $(VENV)/.installed
export WANDB_DIR ?= $(CURDIR)/runs/wandb
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: docs install test demo demo-data tokenize train-tokenizer train-prior sample fid bench lint clean \
        submit-tokenize submit-train-prior submit-fid

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

demo: $(STAMP)
	$(NS) demo $(CONFIG) $(ARGS)

demo-data: $(STAMP)
	$(NS) make-demo-data data/demo

tokenize: $(STAMP)
	$(NS) tokenize $(or $(CONFIG),configs/tokenize_demo.yaml) $(ARGS)

train-tokenizer: $(STAMP)
	$(NS) train-tokenizer $(or $(CONFIG),configs/tokenizer_demo.yaml) $(ARGS)

train-prior: $(STAMP)
	$(NS) train-prior $(or $(CONFIG),configs/prior_demo.yaml) $(ARGS)

sample: $(STAMP)
	$(NS) sample $(or $(CONFIG),configs/sample_demo.yaml) $(ARGS)

fid: $(STAMP)
	$(NS) fid $(or $(CONFIG),configs/fid_demo.yaml) $(ARGS)

bench: $(STAMP)
	$(NS) bench $(CONFIG) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check nextscale tests

clean:
	rm -rf runs data/demo .pytest_cache

docs: $(STAMP)
	$(NS) config-docs > docs/configs.md

# run a stage on the Ray cluster whose dashboard is at RAY_ADDRESS (see docs/cluster.md)
submit-tokenize: $(STAMP)
	$(NS) submit tokenize $(or $(CONFIG),configs/tokenize_demo.yaml) $(ARGS)

submit-train-prior: $(STAMP)
	$(NS) submit train-prior $(or $(CONFIG),configs/prior_demo.yaml) $(ARGS)

submit-fid: $(STAMP)
	$(NS) submit fid $(or $(CONFIG),configs/fid_demo.yaml) $(ARGS)
