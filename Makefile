# Two commands do everything on a fresh machine:
#   make train   set up, then run the default short training job
#   make test    set up, then run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup train test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip check
	touch $@

# The main job: a short float run (configs/quickstart.yaml). Offline, CIFAR-10 cannot be
# downloaded and it says how to use a folder instead, e.g.
#   make train ARGS="--dataset=../shared/data/cifar10-jpeg"
train: setup
	$(PY) train_main.py --config=configs/quickstart.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

bench: setup
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) *.egg-info
