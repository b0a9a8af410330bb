# Two commands a fresh machine needs: `make sweep` and `make test`. Both install first.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TORCH   := torch==2.14.1 torchvision==0.29.1
DATA_URL ?= https://github.com/alexeygrigorev/clothing-dataset-small.git
DATA_DIR ?= data/clothing-dataset-small
export CLOTHING_DATA_DIR ?= $(DATA_DIR)
MODEL   ?= model.pt

.PHONY: install test test-fast lint mutants sweep best ui data bench bench-scale bench-accuracy bench-profile bench-soak clean

install: $(STAMP)

# torch and torchvision are installed first and pinned, so that resolving the project's other
# dependencies can never pull another (multi-GB) torch build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,postgres,server]' $(TORCH)
	touch $@

# Everything, as CI runs it; test-fast leaves out the tests marked slow (processes of their own:
# a real make sweep, --jobs workers, several machines, models loaded in a fresh process; fuzzing).
# Two pytest workers: the suite waits on processes, databases and servers as much as it computes.
PYTEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist load

test-fast: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist load -m "not slow"

# Plants known bugs one at a time and runs the tests that must catch each (tests/mutants.py); slow,
# so not part of `make test` or CI.
mutants: install
	$(PY) tests/mutants.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# `run`'s defaults are the recommended recipe (docs/benchmarks.md): 256 px, dropout searched, 2 cached
# views per training image, then stage 2 fine-tunes the winner's last 3 blocks.
# SWEEP_OPTIONS='--config sweeps/thorough.yaml' fine-tunes 10 blocks (more accurate, slower);
# '--config sweeps/plain.yaml' runs the plain head-only sweep; '--config my.yaml' yours.
SWEEP_OPTIONS ?=

# With the default data folder missing, it first downloads the dataset; offline, the clone fails in one
# line and `sweep run` then says where the data goes.
sweep: install
	@if [ "$$CLOTHING_DATA_DIR" = "$(DATA_DIR)" ] && [ ! -d "$(DATA_DIR)/train" ]; then \
		echo "Downloading the clothing dataset into $(DATA_DIR) (make data)"; \
		git clone --quiet --depth 1 $(DATA_URL) $(DATA_DIR) || true; \
	fi
	$(PY) -m sweep run $(SWEEP_OPTIONS)
	$(PY) -m sweep best --export $(MODEL)

ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1

data:
	test -d $(DATA_DIR) || git clone --depth 1 $(DATA_URL) $(DATA_DIR)

bench: install
	$(PY) -m pip install --quiet -e '.[bench]' $(TORCH)
	$(PY) -m bench

# How extraction, the sweep, the cache and memory grow with 1x, 3x and 10x the training images (bench/scale.py).
bench-scale: install
	$(PY) -m bench.scale

# Each recipe's k-fold accuracy, compared with the default image by image, and the front of accuracy
# against cold time (bench/accuracy.py, docs/benchmarks.md): what its work folder lacks is run (about
# 1.5 hours from nothing on 2 cores), then the table and the picture.
ACCURACY_DIR ?= bench-accuracy
bench-accuracy: install
	$(PY) -m bench.accuracy --work-dir $(ACCURACY_DIR) --front docs/images/accuracy_front.png

# Where a cold `make sweep` spends its time, stage by stage (bench/profile.py); SWEEP_OPTIONS as for sweep,
# e.g. SWEEP_OPTIONS='--config sweeps/thorough.yaml'.
bench-profile: install
	$(PY) -m bench.profile $(SWEEP_OPTIONS)

# Many workers on one PostgreSQL study through SIGKILLs, a database restart and a tracking outage, at 1, 4,
# 8 and 16 processes (bench/soak.py; tests/test_soak.py runs it small).
bench-soak: install
	$(PY) -m bench.soak

clean:
	rm -rf mlruns model.pt
