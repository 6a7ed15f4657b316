# offshelf: `make benchmark` runs the default job end to end; `make test` runs the tests.
# Every target depends on `setup`, which creates .venv and is a no-op when it is up to date.

PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed

DATASET  ?= fashion-mnist
MODEL    ?= efficientnet_lite0
SEED     ?= 0
CLASSIFIER ?= logreg
BASELINES ?= hog,surf_bow,sift_bow,vlad,fisher,color,raw
BASELINES_PRESET ?= paper

DATASET_ARGS = --dataset '$(DATASET)' $(if $(CROP),--crop $(CROP))
DATA_ARGS = $(DATASET_ARGS) --seed $(SEED) \
	$(if $(DATA_DIR),--data-dir '$(DATA_DIR)') $(if $(LIMIT),--limit $(LIMIT)) $(if $(FULL),--full) \
	$(if $(OVERWRITE),--overwrite) $(if $(ON_ERROR),--on-error $(ON_ERROR))

.PHONY: setup data fetch extract layers baselines classify tsne report benchmark data-info finetune pretrain recipe test

setup: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The default dataset must be on disk: found, downloaded, or installed from Debian's package.
data: $(STAMP)
	@if [ '$(DATASET)' = fashion-mnist ] && [ -z '$(DATA_DIR)' ]; then $(PY) -m extract fetch --dataset fashion-mnist; fi

extract: setup
	$(PY) -m extract features $(DATA_ARGS) --model $(MODEL) $(if $(LAYERS),--layers '$(LAYERS)') \
		$(if $(POOLING),--pooling $(POOLING)) $(if $(WEIGHTS),--weights '$(WEIGHTS)')

layers: setup
	$(PY) -m extract layers --model $(MODEL)

# Download a dataset's official archives (checksummed) into ~/.cache/offshelf/<name>, when online.
fetch: $(STAMP)
	$(PY) -m extract fetch --dataset '$(DATASET)'

data-info: setup
	$(PY) -m extract data-info $(DATA_ARGS)

baselines: setup
	$(PY) -m baselines $(DATA_ARGS) --baselines $(BASELINES) --preset $(BASELINES_PRESET) \
		$(if $(CODEBOOK_SPLIT),--codebook-split '$(CODEBOOK_SPLIT)')

classify: setup
	$(PY) -m classify probe $(DATASET_ARGS) --classifier $(CLASSIFIER) --seed $(SEED) \
		$(if $(FEATURES),--features '$(FEATURES)') $(if $(LAYERS),--layers '$(LAYERS)') $(if $(PROTOCOL),--protocol '$(PROTOCOL)')

tsne: setup
	$(PY) -m classify tsne $(DATASET_ARGS) --seed $(SEED) --model $(MODEL) $(if $(N),--n $(N))

report: setup
	$(PY) -m classify report $(DATASET_ARGS)

# DATASETS="a b c": the whole benchmark for each, then reports/summary.md across them.
ifdef DATASETS
benchmark:
	for d in $(DATASETS); do $(MAKE) --no-print-directory benchmark DATASET=$$d DATASETS= || exit 1; done
	$(PY) -m classify summary --datasets '$(DATASETS)'
else
benchmark: extract baselines classify tsne report
endif

# Transfer mechanics: TRAIN=head|top1|top2|all; the autoencoder recipe; rows land in results.csv.
finetune: setup
	$(PY) -m transfer finetune $(DATA_ARGS) --model $(MODEL) --train $(or $(TRAIN),head) \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(WEIGHTS),--weights '$(WEIGHTS)')

pretrain: setup
	$(PY) -m transfer pretrain-cae $(DATA_ARGS) $(if $(EPOCHS),--pretrain-epochs $(EPOCHS))

recipe: setup
	$(PY) -m transfer recipe $(DATA_ARGS) $(if $(EPOCHS),--epochs $(EPOCHS))

test: setup
	$(PY) -m pytest
