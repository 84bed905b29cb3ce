# Every target creates the virtual environment first (and re-installs when pyproject.toml changes).
# Variables map 1:1 to CLI flags: COMP, EXP, FOLD, GPUS, TRIALS, WORKERS, ENSEMBLE, FORCE, BUDGET.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
COMP   ?= synthetic-hands
EXP    ?= baseline
FOLD   ?= 0
GPUS   ?= 1
FORCE  ?=
# ENSEMBLE defaults to `blend` (set below with the ensemble variables), the recipe `make ensemble` writes.
ENSEMBLE_FLAG = $(if $(ENSEMBLE),--ensemble $(ENSEMBLE),)
FORCE_FLAG := $(if $(FORCE),--force,)

RESTART ?=
RESTART_FLAG := $(if $(RESTART),--restart,)
# CHECK=1 -> --check, DRY_RUN=1 -> --dry-run; COMP given on the command line -> --comp for train too.
CHECK ?=
DRY_RUN ?=
TRAIN_FLAGS = $(RESTART_FLAG) $(if $(CHECK),--check,) $(if $(DRY_RUN),--dry-run,) $(if $(BUDGET),--budget $(BUDGET),) \
	$(if $(filter command line environment,$(origin COMP)),--comp $(COMP),)
# GPUS > 1 launches torchrun DDP on this machine (one process per GPU). NODES > 1: the same command on
# every machine, NODE_RANK 0..NODES-1, all pointing at node 0 (MASTER_ADDR:MASTER_PORT); torchrun's
# static rendezvous (--standalone is for one machine only).
NODES       ?= 1
NODE_RANK   ?= 0
MASTER_ADDR ?=
MASTER_PORT ?= 29500
NPROC = $(if $(filter 0,$(GPUS)),1,$(GPUS))
RENDEZVOUS = --nnodes=$(NODES) --node_rank=$(NODE_RANK) --master_port=$(MASTER_PORT) \
	--master_addr=$(if $(MASTER_ADDR),$(MASTER_ADDR),$(error NODES=$(NODES) needs MASTER_ADDR=<node 0's address>))
LAUNCH = $(if $(filter-out 1,$(NODES)),$(VENV)/bin/torchrun $(RENDEZVOUS) --nproc_per_node=$(NPROC) -m competition,\
	$(if $(filter-out 0 1,$(GPUS)),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(GPUS) -m competition,\
	$(PY) -m competition))

.PHONY: venv constraints test-floors folds train train-all test lint docs bench clean-venv help
.PHONY: submit predict bundle export
.PHONY: tune tune-report runs wandb-sync
.PHONY: ensemble oof init pseudo

help:
	@echo "make init DATA=dir [NAME=..] [FORCE=1]  inspect a data folder -> configs/competitions/<name>.yaml + <name>-baseline"
	@echo "make folds [COMP=..] [FORCE=1]       write folds/<comp>.csv"
	@echo "make train FOLD=k [EXP=..] [GPUS=N] [CHECK=1] [DRY_RUN=1] [BUDGET=30m] [COMP=..]  train one fold of an experiment"
	@echo "                                     (CHECK=1: validate only; DRY_RUN=1: one real batch, writes nothing)"
	@echo "make train-all [EXP=..]              train every CV fold in turn"
	@echo "make train FOLD=all-data [EXP=..]    one model on every training image (no validation, no OOF) -> runs/<exp>/all-data/"
	@echo "make train ... NODES=N NODE_RANK=r MASTER_ADDR=host [MASTER_PORT=29500]  one node of an N-machine DDP run"
	@echo "make submit [ENSEMBLE=..]            TTA inference -> validated submissions/<time>-<name>.csv + ledger row"
	@echo "make predict [EXP=..]                the same for all folds of one experiment, without a recipe"
	@echo "make bundle [ENSEMBLE=..] OUT=dir [WHEELS=1] [WHEELS_TORCH=1] [WHEELS_PYTHON=3.11]"
	@echo "                                     offline inference folder for code competitions (WHEELS=1: + wheels/)"
	@echo "                                     RUNTIME=onnx: + onnx/, run with ONNX Runtime; prints a run-time estimate"
	@echo "make export [ENSEMBLE=..] [FORMAT=onnx|torchscript] [OUT=dir]  the recipe's models as checked ONNX/TorchScript"
	@echo "                                     files + export.json (default OUT: runs/_export/<recipe>-<format>/)"
	@echo "make tune [EXP=..] [TRIALS=N] [FOLD=k] [WORKERS=N] [STORAGE=url] [SPACE=..] [STUDY=..]  Optuna search"
	@echo "make tune-report [EXP=..]            trials table, importances and plots of a study"
	@echo "make oof [EXP=..] [TTA=\"identity hflip\"] [SCALES=\"1 1.25\"] [SUSPECTS=1] [WORKERS=N]"
	@echo "                                     an experiment's OOF score at the original sizes per class/fold/image;"
	@echo "                                     TTA= writes that TTA variant of every fold's OOF (a candidate member)"
	@echo "make ensemble [ENSEMBLE=blend] [EXPS=\"baseline unet3plus\"] [METHOD=caruana|optuna] [PER_CLASS=1] [FORCE_BLEND=1] [WORKERS=N]"
	@echo "                                     weights, thresholds, post-processing on the OOF at the original sizes -> ensembles/<name>.yaml"
	@echo "                                     FULL_DATA=1: members with a finished all-data run submit with that model"
	@echo "make pseudo [ENSEMBLE=..] [MIN_CONFIDENCE=c]  pseudo-labels of the test images, one set per fold -> runs/_pseudo/<name>/"
	@echo "make runs                            table of every finished run + runs/per_class_dice.png"
	@echo "make wandb-sync                      upload offline W&B runs (wandb/) once online"
	@echo "make test                             run the test suite"
	@echo "make lint                             ruff, and the import layers of pyproject.toml (import-linter)"
	@echo "make docs                             build the documentation site into site/ (strict: a broken link fails)"
	@echo "make constraints                      re-pin constraints.txt from .venv (after an intended upgrade)"
	@echo "make test-floors                      the suite's fast part on the oldest allowed versions (constraints-min.txt)"
	@echo "make bench                            run the benchmarks (ratios measured in the same run)"

venv: $(VENV)/.installed

# Everything a team member needs (every extra, the test and benchmark tools), at the versions in
# constraints.txt: a fresh clone gets the versions the README's numbers come from.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all,dev,docs,postgres]'
	@# The bench extra (benchmark peers), read from pyproject.toml, without dependencies: see its comment there.
	$(PY) -m pip install -q -c constraints.txt --no-deps $$($(PY) -c 'import re; line = re.search(r"(?m)^bench = \[(.*)\]", \
		open("pyproject.toml").read()).group(1); print(" ".join(re.findall(r"\"([^\"]+)\"", line)))')
	@# The nnunet extra (model.arch: nnunet) without dependencies as well: see its comment in pyproject.toml.
	$(PY) -m pip install -q -c constraints.txt --no-deps $$($(PY) -c 'import re; line = re.search(r"(?m)^nnunet = \[(.*)\]", \
		open("pyproject.toml").read()).group(1); print(" ".join(re.findall(r"\"([^\"]+)\"", line)))')
	touch $@

constraints: venv
	$(PY) -c 'from competition.installs import write_constraints; print(write_constraints(), "pins -> constraints.txt")'

# The floors: a separate venv with every direct dependency at its lower bound (constraints-min.txt).
FLOORS_VENV ?= /tmp/competition-floors-venv
FLOOR_TESTS ?= tests/test_config.py tests/test_rle.py tests/test_train.py tests/test_models.py tests/test_losses.py \
	tests/test_optim.py tests/test_dataset.py tests/test_metrics.py tests/test_folds.py tests/test_submit.py \
	tests/test_ensemble_search.py tests/test_ledger.py tests/test_runs.py tests/test_tune.py tests/test_installs.py
test-floors:
	test -x $(FLOORS_VENV)/bin/python || $(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install -q -c constraints-min.txt -e '.[all,dev]'
	$(FLOORS_VENV)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider $(FLOOR_TESTS)

folds: venv
	$(PY) -m competition folds --comp $(COMP) $(FORCE_FLAG)

train: venv
	$(LAUNCH) train --exp $(EXP) --fold $(FOLD) $(TRAIN_FLAGS)

train-all: venv
	$(LAUNCH) train --exp $(EXP) --fold all $(TRAIN_FLAGS)

submit: venv
	$(PY) -m competition submit $(ENSEMBLE_FLAG)

predict: venv
	$(PY) -m competition predict --exp $(EXP)

bundle: venv
	$(if $(OUT),,$(error OUT=<folder> is required: make bundle ENSEMBLE=name OUT=folder))
	$(PY) -m competition bundle $(ENSEMBLE) --out $(OUT) $(if $(WHEELS),--wheels,) \
		$(if $(WHEELS_TORCH),--wheels-torch,) $(if $(WHEELS_PYTHON),--wheels-python $(WHEELS_PYTHON),) \
		$(if $(RUNTIME),--runtime $(RUNTIME),)

# FORMAT -> --format (onnx, torchscript), OUT -> --out, ENSEMBLE -> --ensemble
FORMAT ?= onnx
export: venv
	$(PY) -m competition export $(ENSEMBLE_FLAG) --format $(FORMAT) $(if $(OUT),--out $(OUT),)

test: venv
	$(PY) -m pytest -q

# The layers contract in pyproject.toml ([tool.importlinter]) keeps imports flowing one way, and ruff
# the rest (unused names, import order, line length).
lint: venv
	$(PY) -m ruff check competition tests benchmarks
	$(VENV)/bin/lint-imports

# mkdocs.yml: strict, so a broken link or a page missing from the nav fails; the configuration
# reference is generated from the pydantic schema at build time (docs/hooks/reference.py).
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# BENCH="rle submit" runs only the benchmarks whose names contain those words.
bench: venv
	$(PY) -m benchmarks $(BENCH)

clean-venv:
	rm -rf $(VENV)

# Tuning: FOLD is passed only when given (make tune FOLD=1), else the search space's budget folds apply.
TUNE_FLAGS = $(if $(SPACE),--space $(SPACE),) $(if $(TRIALS),--trials $(TRIALS),) \
	$(if $(filter command line environment,$(origin FOLD)),--fold $(FOLD),) $(if $(WORKERS),--workers $(WORKERS),) \
	$(if $(STORAGE),--storage '$(STORAGE)',) $(if $(STUDY),--study $(STUDY),)

tune: venv
	$(PY) -m competition tune --exp $(EXP) $(TUNE_FLAGS)

tune-report: venv
	$(PY) -m competition tune --exp $(EXP) $(TUNE_FLAGS) --report

runs: venv
	$(PY) -m competition runs --plot

# One run at a time, oldest first: W&B credits an artifact version to the first run uploaded with its
# content, so training runs must reach the server before the ensembles and submissions that use them.
wandb-sync: venv
	@for d in $$(ls -d wandb/offline-run-* 2>/dev/null | sort); do $(VENV)/bin/wandb sync "$$d" || exit 1; done

# DATA=<data folder> -> competition init; NAME -> --name; FORCE=1 -> --force
init: venv
	$(if $(DATA),,$(error DATA=<folder> is required: make init DATA=data/<name> [NAME=name] [BUDGET=30m] [FORCE=1]))
	$(PY) -m competition init $(DATA) $(if $(NAME),--name $(NAME),) $(if $(BUDGET),--budget $(BUDGET),) \
		$(if $(filter-out 0 1,$(GPUS)),--gpus $(GPUS),) $(FORCE_FLAG)

# ENSEMBLE -> --ensemble (default: blend), MIN_CONFIDENCE -> --min-confidence
MIN_CONFIDENCE ?=
pseudo: venv
	$(PY) -m competition pseudo $(ENSEMBLE_FLAG) $(if $(MIN_CONFIDENCE),--min-confidence $(MIN_CONFIDENCE),)

# Ensembles: ENSEMBLE -> --name, EXPS -> the member experiments, METHOD -> --method, PER_CLASS=1 -> --per-class,
# FORCE_BLEND=1 -> --force-blend, FULL_DATA=1 -> --full-data. OOF: TTA -> --tta, SCALES -> --scales,
# SUSPECTS=1 -> --suspects.
ENSEMBLE ?= blend
EXPS     ?= baseline unet3plus
METHOD   ?= caruana
PER_CLASS ?=
SUSPECTS ?=
FORCE_BLEND ?=
FULL_DATA ?=
TTA ?=
SCALES ?=

ensemble: venv
	$(PY) -m competition ensemble --name $(ENSEMBLE) --method $(METHOD) $(if $(PER_CLASS),--per-class,) \
		$(if $(FORCE_BLEND),--force-blend,) $(if $(WORKERS),--workers $(WORKERS),) $(if $(FULL_DATA),--full-data,) $(EXPS)

oof: venv
	$(PY) -m competition oof $(EXP) $(if $(TTA),--tta $(TTA),) $(if $(SCALES),--scales $(SCALES),) $(if $(SUSPECTS),--suspects,) \
		$(if $(WORKERS),--workers $(WORKERS),)
