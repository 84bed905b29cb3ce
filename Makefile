# Every target creates the virtual environment first (and re-installs when pyproject.toml changes).
# Variables map 1:1 to CLI flags: COMP, EXP, FOLD, GPUS, TRIALS, WORKERS, ENSEMBLE, FORCE.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
COMP   ?= synthetic-hands
EXP    ?= baseline
FOLD   ?= 0
GPUS   ?= 1
FORCE  ?=
FORCE_FLAG := $(if $(FORCE),--force,)

RESTART ?=
RESTART_FLAG := $(if $(RESTART),--restart,)
# GPUS > 1 launches torchrun DDP on this machine (one process per GPU).
LAUNCH := $(if $(filter-out 0 1,$(GPUS)),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(GPUS) -m competition,$(PY) -m competition)

.PHONY: venv folds train train-all test bench clean-venv help

help:
	@echo "make folds [COMP=..] [FORCE=1]       write folds/<comp>.csv"
	@echo "make train FOLD=k [EXP=..] [GPUS=N]  train one fold of an experiment"
	@echo "make train-all [EXP=..]              train every fold in turn"
	@echo "make test                             run the test suite"
	@echo "make bench                            run the benchmarks (ratios measured in the same run)"

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

folds: venv
	$(PY) -m competition folds --comp $(COMP) $(FORCE_FLAG)

train: venv
	$(LAUNCH) train --exp $(EXP) --fold $(FOLD) $(RESTART_FLAG)

train-all: venv
	$(LAUNCH) train --exp $(EXP) --fold all $(RESTART_FLAG)

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) -m benchmarks

clean-venv:
	rm -rf $(VENV)
