# offshelf: `make benchmark` runs the default job end to end; `make test` runs the tests.
# Every target depends on `setup`, which creates .venv and is a no-op when it is up to date.

PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed

DATASET  ?= fashion-mnist
MODEL    ?= efficientnet_lite0
SEED     ?= 0
RECIPE   ?= plain
BASELINES ?= hog,surf_bow,sift_bow,vlad,fisher,color,raw
TRAIN    ?= head
BASELINES_PRESET ?= paper

# Every value reaches the command line as exactly one argument, whatever it holds (quotes,
# spaces, $, ;, non-ASCII letters): $(call q,NAME) single-quotes NAME's value as typed (make's
# `value`, so a $ in it is not expanded either), and $(call opt,--flag,NAME) adds the flag
# and the quoted value when NAME is set.
quote = '$(subst ','\'',$(1))'
q = $(call quote,$(value $(1)))
opt = $(if $(value $(2)),$(1) $(call q,$(2)))
# Not into the recipes' environment either: exporting expands a value (and runs any $(shell) in it).
unexport DATASET DATASETS DATA_DIR MODEL LAYER LAYERS POOLING VIEWS WEIGHTS DTYPE LIMIT FULL OVERWRITE RUNTIME ON_ERROR CROP RESIZE SEED \
	CHECKPOINT_SECONDS WORKERS RAY_ADDRESS SHIP_BYTES RECIPE CLASSIFIER NORMALIZATION FUSE MEMORY_BUDGET BASELINES BASELINES_PRESET CODEBOOK_SPLIT FEATURES REPEATS REGIMES SIZES PROTOCOL N TRAIN EPOCHS BATCHNORM FEATURES_DIR RESULTS_DIR REPORTS_DIR

# Where stores, results and reports go (default: features/, results/, reports/ here).
RESULT_DIRS = $(call opt,--results-dir,RESULTS_DIR) $(call opt,--reports-dir,REPORTS_DIR)
DATASET_ARGS = --dataset $(call q,DATASET) $(call opt,--crop,CROP) $(call opt,--features-dir,FEATURES_DIR)
DATA_ARGS = $(DATASET_ARGS) --seed $(call q,SEED) $(call opt,--resize,RESIZE) \
	$(call opt,--data-dir,DATA_DIR) $(call opt,--limit,LIMIT) $(if $(value FULL),--full) \
	$(if $(value OVERWRITE),--overwrite) $(call opt,--on-error,ON_ERROR) $(call opt,--checkpoint-seconds,CHECKPOINT_SECONDS)
# WORKERS=N: a local Ray cluster with N workers; RAY_ADDRESS=auto|HOST:PORT: an existing one
# (one worker per GPU where it has GPUs); SHIP_BYTES=1: send images' bytes to workers that cannot read the paths.
# make classify takes the cluster's two (CLUSTER_ARGS): each probe job a Ray task.
CLUSTER_ARGS = $(call opt,--workers,WORKERS) $(call opt,--ray-address,RAY_ADDRESS)
SCALE_ARGS = $(CLUSTER_ARGS) $(if $(value SHIP_BYTES),--ship-bytes)

.PHONY: setup data fetch extract layers baselines classify tsne report projector benchmark data-info finetune pretrain recipe rule-of-thumb browser test test-slow

setup: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The default dataset must be on disk: found, downloaded, or installed from Debian's package.
data: $(STAMP)
	@if [ $(call q,DATASET) = fashion-mnist ] && [ -z $(call q,DATA_DIR) ]; then $(PY) -m extract fetch --dataset fashion-mnist; fi

extract: setup
	$(PY) -m extract features $(DATA_ARGS) $(SCALE_ARGS) --model $(call q,MODEL) $(call opt,--layers,LAYERS) \
		$(call opt,--pooling,POOLING) $(call opt,--views,VIEWS) $(call opt,--weights,WEIGHTS) $(call opt,--dtype,DTYPE) \
		$(call opt,--runtime,RUNTIME)

layers: setup
	$(PY) -m extract layers --model $(call q,MODEL)

# Download a dataset's official archives (checksummed) into ~/.cache/offshelf/<name>, when online.
fetch: $(STAMP)
	$(PY) -m extract fetch --dataset $(call q,DATASET)

data-info: setup
	$(PY) -m extract data-info $(DATA_ARGS)

baselines: setup
	$(PY) -m baselines $(DATA_ARGS) $(SCALE_ARGS) --baselines $(call q,BASELINES) --preset $(call q,BASELINES_PRESET) \
		$(call opt,--codebook-split,CODEBOOK_SPLIT)

classify: setup
	$(PY) -m classify probe $(DATASET_ARGS) $(RESULT_DIRS) --recipe $(call q,RECIPE) --seed $(call q,SEED) \
		$(call opt,--classifier,CLASSIFIER) $(call opt,--normalization,NORMALIZATION) $(call opt,--fuse,FUSE) \
		$(call opt,--features,FEATURES) $(call opt,--layers,LAYERS) $(call opt,--protocol,PROTOCOL) $(call opt,--repeats,REPEATS) \
		$(call opt,--memory-budget,MEMORY_BUDGET) $(CLUSTER_ARGS)

tsne: setup
	$(PY) -m classify tsne $(DATASET_ARGS) $(RESULT_DIRS) $(call opt,--data-dir,DATA_DIR) --seed $(call q,SEED) --model $(call q,MODEL) $(call opt,--n,N)

# report.md and index.html (the interactive page; thumbnails from the images, read once).
report: setup
	$(PY) -m classify report $(DATASET_ARGS) $(RESULT_DIRS) $(call opt,--data-dir,DATA_DIR)

# TensorBoard Embedding Projector files of one layer: FEATURES=<store> LAYER=<tap> [N=1000].
projector: setup
	$(PY) -m classify projector $(DATASET_ARGS) $(RESULT_DIRS) $(call opt,--data-dir,DATA_DIR) --features $(call q,FEATURES) \
		--layer $(call q,LAYER) --seed $(call q,SEED) $(call opt,--n,N)

# DATASETS="a b c": the whole benchmark for each, then reports/summary.md across them.
ifdef DATASETS
benchmark:
	for d in $(foreach d,$(value DATASETS),$(call quote,$(d))); do $(MAKE) --no-print-directory benchmark DATASET="$$d" DATASETS= || exit 1; done
	$(PY) -m classify summary --datasets $(call q,DATASETS) $(RESULT_DIRS)
else
benchmark: extract baselines classify tsne report
endif

# Transfer mechanics: TRAIN=head|top1|top2|all; the autoencoder recipe; rows land in results.csv.
finetune: setup
	$(PY) -m transfer finetune $(DATA_ARGS) $(call opt,--results-dir,RESULTS_DIR) --model $(call q,MODEL) --train $(call q,TRAIN) \
		$(call opt,--epochs,EPOCHS) $(call opt,--weights,WEIGHTS) $(call opt,--batchnorm,BATCHNORM)

pretrain: setup
	$(PY) -m transfer pretrain-cae $(DATA_ARGS) $(call opt,--results-dir,RESULTS_DIR) $(call opt,--pretrain-epochs,EPOCHS)

recipe: setup
	$(PY) -m transfer recipe $(DATA_ARGS) $(call opt,--results-dir,RESULTS_DIR) $(call opt,--epochs,EPOCHS)

# How many layers to train for how much data: REGIMES=probe,head,top1,top2[,all,scratch] SIZES=5,10,20 REPEATS=3
rule-of-thumb: setup
	$(PY) -m transfer rule-of-thumb $(DATA_ARGS) $(call opt,--results-dir,RESULTS_DIR) --model $(call q,MODEL) \
		$(call opt,--regimes,REGIMES) $(call opt,--sizes,SIZES) $(call opt,--repeats,REPEATS) $(call opt,--max-epochs,EPOCHS) $(call opt,--batchnorm,BATCHNORM)

# The browser tests drive Debian's Chromium: installed here when missing and apt-get can (root), a no-op
# otherwise (the tests then skip, saying how to install it).
BROWSER_PACKAGES := chromium chromium-driver
browser:
	@if command -v chromedriver >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BROWSER_PACKAGES) >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BROWSER_PACKAGES) >/dev/null 2>&1; } || \
		echo "could not install $(BROWSER_PACKAGES) with apt-get: the browser tests will skip"; \
	else echo "no chromium: the browser tests will skip (as root: apt-get install $(BROWSER_PACKAGES))"; fi

# `make test` leaves out the end-to-end runs marked slow (about 3/4 of the time); CI runs both.
test: setup browser
	$(PY) -m pytest -m "not slow"

test-slow: setup browser
	$(PY) -m pytest -m slow
