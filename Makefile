# Two commands do everything on a fresh machine:
#   make train   set up, then run the main job: shipped float model -> W2A2 QAT -> TFLite
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

# The main job (tfacd/quickstart.py, configs/quickstart.yaml): the shipped float checkpoint,
# a short W2A2 QAT, BatchNorm re-estimation, TFLite export, LiteRT evaluation and a summary.
# Offline it uses the embedded CIFAR-10 sample. Flags go in ARGS, e.g. ARGS="--epochs=2".
train: setup
	$(PY) -m tfacd.quickstart $(ARGS)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

bench: setup
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) *.egg-info
