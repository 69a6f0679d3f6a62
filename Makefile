# Entry points for users and CI. The first target run on a fresh machine
# creates the virtual environment in $(VENV) and installs the package.

PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Folder with the publisher's raw files of the dataset being trained.
DATA ?=
# Where checkpoints and metrics.jsonl go; rerunning resumes from there.
WORKDIR ?= workdirs/$(DATASET)
# Extra flags, e.g. ARGS='--config.seed=1'; give such a run its own WORKDIR.
ARGS ?=
# SIGKILLs that `make chaos` sends to its training run.
KILLS ?= 10

INSTALLED := $(VENV)/.installed

.PHONY: install train-mnist train-cifar10 test bench chaos lint format \
  constraints clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

train-mnist: DATASET = mnist
train-mnist: $(INSTALLED)
	$(PY) -m pinet_jax.main --config experiments/mnist.py \
	  --workdir='$(WORKDIR)' --config.data_dir='$(DATA)' $(ARGS)

train-cifar10: DATASET = cifar10
train-cifar10: $(INSTALLED)
	$(PY) -m pinet_jax.main --config experiments/cifar10.py \
	  --workdir='$(WORKDIR)' --config.data_dir='$(DATA)' $(ARGS)

test: $(INSTALLED)
	$(PY) -m pytest -q --durations=15 $(ARGS)

# Speed of the train step against PyTorch (when installed), the input
# pipeline (when DATA is set) and XLA's matmul peak, as a markdown table.
bench: $(INSTALLED)
	$(PY) -m pinet_jax.bench --data_dir='$(DATA)' $(ARGS)

# Kill a short MNIST run with SIGKILL $(KILLS) times, resume it each time and
# compare it bit for bit with an uninterrupted run; prints one summary line.
chaos: $(INSTALLED)
	$(PY) -m pinet_jax.chaos --data_dir='$(DATA)' --kills=$(KILLS) $(ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

constraints: $(INSTALLED)
	head -n 3 constraints.txt > constraints.txt.new
	$(PY) -m pip freeze --exclude-editable >> constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
