# Bailan's everyday commands. `make run` and `make test` set everything up on
# first use; the other targets reuse the same virtual environment.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-install whenever the project's dependencies change.
STAMP := $(VENV)/.bailan-installed
# Without a GPU, this torch is installed before anything else: an unpinned
# torch would pull a multi-GB CUDA build that a CPU-only machine can't use.
CPU_TORCH ?= torch==2.13.0
# Where that CPU build comes from when this machine has none on disk: PyPI's
# Linux x86_64 torch is the CUDA build (several GB of NVIDIA libraries). Asked
# only when it answers within seconds (offline machines use their own wheels);
# empty: plain pip, as configured.
CPU_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

PYTEST_ARGS ?=
TRAIN_ARGS ?=

.PHONY: help venv install run test train bench lint

help:
	@echo "make run     start Redis (embedded valkey), the API, a worker and the webhook senders; Ctrl-C stops all"
	@echo "make test    run the test suite"
	@echo "make train   train the built-in model (two stages, then its preview decoder) into models/bailan-shapes"
	@echo "make bench   run the benchmarks in bench/"
	@echo "make lint    lint the Dockerfile and validate docker-compose.yml"
	@echo "make install create $(VENV) and install the project (done by the others on first use)"

venv install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "==> creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "==> GPU found: pip picks torch's default (CUDA) build"; \
	elif $(PY) -m pip show torch >/dev/null 2>&1; then \
		echo "==> no GPU; keeping the installed torch"; \
	else \
		index=""; \
		if [ -n "$(CPU_TORCH_INDEX)" ] && $(PY) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=5)" "$(CPU_TORCH_INDEX)" >/dev/null 2>&1; then \
			index="--index-url $(CPU_TORCH_INDEX)"; \
		fi; \
		echo "==> no GPU: installing $(CPU_TORCH) (CPU build$${index:+, from $(CPU_TORCH_INDEX)}) first; this takes a minute"; \
		$(PY) -m pip install --quiet --disable-pip-version-check $$index "$(CPU_TORCH)"; \
	fi
	@echo "==> installing bailan, its trainer's and test tools into $(VENV)"
	@# One venv serves run, test and train: the train extra is the trainer's
	@# (tqdm), which the service itself never imports.
	@# The setuptools notice about editable installs is noise here.
	@PYTHONWARNINGS=ignore::UserWarning $(PY) -m pip install --quiet --disable-pip-version-check -e '.[train,test]'
	@touch $@
	@echo "==> $(VENV) is ready"

run: $(STAMP)
	$(PY) -m bailan.launch

# The page tests' browser (tests/browser.py); BAILAN_TEST_CHROMIUM overrides it.
CHROMIUM := $(or $(BAILAN_TEST_CHROMIUM),/usr/bin/chromium)

test: $(STAMP)
	@test -x "$(CHROMIUM)" || echo "==> no Chromium at $(CHROMIUM): the page tests will fail. Install it (Debian, as root: apt-get install chromium) or set BAILAN_TEST_CHROMIUM; see README, Running the tests"
	$(PY) -m pytest $(PYTEST_ARGS)

# Two stages (world/train.py RECIPES); --resume makes a rerun continue
# whichever stage was stopped, and redo nothing that finished.
BASE_MODEL := checkpoints/bailan-shapes-base
train: $(STAMP)
	$(PY) -m world.train --recipe base --out $(BASE_MODEL) --ckpt-dir checkpoints/base --device auto --resume $(TRAIN_ARGS)
	$(PY) -m world.train --recipe zsnr --init-from $(BASE_MODEL) --out models/bailan-shapes --ckpt-dir checkpoints/zsnr --device auto --resume $(TRAIN_ARGS)
	$(PY) -m world.preview_train --model models/bailan-shapes --device auto

bench: $(STAMP)
	$(PY) bench/throughput.py
	$(PY) bench/prompt_following.py

lint: $(STAMP)
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
