# Two commands do all the set-up (each builds the virtual environment first if it is missing):
#   make demo   run the main job on the embedded default (the shipped Fashion-MNIST test split and ViT, CPU, minutes)
#   make test   run the test suite
# Neither needs a dataset package or the network once the environment is built: the data is in bench/assets/.
# The environment lives outside the checkout so clones share it; VENV=... puts it elsewhere.
VENV ?= $(HOME)/.cache/tokenbench/venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokenbench-$(shell cksum requirements.txt | cut -d' ' -f1)

.PHONY: demo test env clean-env
demo: $(STAMP)
	$(PY) run_all.py --methods idle,evit --ratios 0.5,0.7

# Tests run on up to 4 processes (pytest-xdist): most are CPU-bound and independent; the SLURM tests share
# one process (xdist_group), since the localhost cluster has one node.
test: $(STAMP)
	$(PY) -m pytest -n auto --maxprocesses 4 --dist loadgroup

env: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.tokenbench-*
	touch $@

clean-env:
	rm -rf $(VENV)
