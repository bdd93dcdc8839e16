# twostream: `make extract` then `make train` run the main job on the embedded demo data (no network, no GPU).
PY      ?= python3.11
VENV    ?= .venv
BIN      = $(VENV)/bin
TS       = $(BIN)/twostream
DATA    ?= data/demo
STORE   ?= data/demo-store
RUNS    ?= runs
FLOW    ?= dis
HEAD    ?= ts-lstm
WORKERS ?= 2
SPLITS  ?= 1 2 3
PROTO   ?= data/protocol
FT_ARGS ?=

.PHONY: install demo extract train predict protocol sweep report test test-slow test-demo test-all bench bench-gpu readme-numbers lint clean

$(BIN)/twostream: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,ray]'
	touch $@

install: $(BIN)/twostream

$(DATA)/ucfTrainTestlist/classInd.txt: | $(BIN)/twostream
	$(TS) demo-data $(DATA)

demo: $(DATA)/ucfTrainTestlist/classInd.txt

# Stage one on the demo data: RGB and flow streams, 25 frames per video (Ma et al.). Resumable: rerun to continue.
# FLOW=dis keeps the demo to minutes on 2 CPU cores; `make extract FLOW=tvl1` uses our TV-L1 (the papers' flow)
# into another store (STORE=data/demo-store-tvl1): a store holds one config.
extract: demo
	$(TS) extract $(DATA) --out $(STORE) --streams rgb,flow --flow $(FLOW) --workers $(WORKERS)
	$(TS) info $(STORE)

# Stage two on the cached features: the default head on split 1.
train: | $(BIN)/twostream
	$(TS) train $(STORE) --dataset $(DATA) --split 1 --head $(HEAD) --streams rgb,flow --out $(RUNS)

# Classify demo test videos with the newest run of HEAD that `make train` left (top 5 per video), then find where each
# action happens in a video of two demo clips in a row (timeline/*.png: the switch is at 1.92 s).
predict: | $(BIN)/twostream
	run=$$(ls -td $(RUNS)/$(HEAD)-*/ | head -1); test -n "$$run" || { echo "no run of $(HEAD) in $(RUNS): make train"; exit 2; }; \
	$(TS) predict $$run $(DATA)/CheckerDrift/v_CheckerDrift_g01_c01.avi $(DATA)/TextureLeft/v_TextureLeft_g01_c01.avi \
	  $(DATA)/BeachThenForest/v_BeachThenForest_g01_c01.avi && \
	$(BIN)/python -c "from pipeline.demo_data import write_sequence; write_sequence('timeline/two-actions.avi', \
	  ['StripeDrift', 'TextureUp'], seed=1)" && \
	$(TS) predict $$run timeline/two-actions.avi --timeline --timeline-dir timeline

# The three-split protocol (Ma et al. Sec. 3.1; UCF101/HMDB51's three splits), one command: per split, fine-tune the
# rgb and flow CNNs on that split's training videos, extract a store with them ($(PROTO)/store-N); then train HEAD on
# each stream of each split's own store, late-fuse the streams on the fusion fold, and write the mean +- std over
# SPLITS (runs/<head>-late-fusion-splits-*.md). Stage two refuses any other pairing of store and split. Resumable:
# rerun to continue. FT_ARGS goes to `twostream finetune` (e.g. FT_ARGS="--epochs 2 --input-size 112" for a quick look).
protocol: demo
	for s in $(SPLITS); do \
	  $(TS) finetune $(DATA) --stream rgb --split $$s --out $(PROTO)/ckpt-$$s --quiet $(FT_ARGS) && \
	  $(TS) finetune $(DATA) --stream flow --split $$s --flow $(FLOW) --out $(PROTO)/ckpt-$$s --quiet $(FT_ARGS) && \
	  $(TS) extract $(DATA) --out $(PROTO)/store-$$s --streams rgb,flow --flow $(FLOW) --workers $(WORKERS) \
	    --rgb-checkpoint $(PROTO)/ckpt-$$s/rgb.safetensors --flow-checkpoint $(PROTO)/ckpt-$$s/flow.safetensors \
	  || exit 1; \
	done
	$(TS) train '$(PROTO)/store-{split}' --dataset $(DATA) --splits "$$(echo $(SPLITS) | tr ' ' ',')" \
	  --head $(HEAD) --streams rgb,flow --late-fusion --out $(RUNS)

sweep: | $(BIN)/twostream
	$(TS) sweep $(STORE) --dataset $(DATA) examples/sweep-demo.yaml --out $(RUNS) --jobs 2
	$(TS) report $(RUNS) --out report

test: | $(BIN)/twostream
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: | $(BIN)/twostream
	$(BIN)/python -m pytest -q -m "slow and not demo"; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

# Every head on the whole demo with its default recipe (hours on 2 CPU cores, minutes on a GPU); not run by CI.
test-demo: | $(BIN)/twostream
	$(BIN)/python -m pytest -q -m demo

test-all: | $(BIN)/twostream
	$(BIN)/python -m pytest -q

bench: | $(BIN)/twostream
	$(BIN)/python bench/extract.py --per-video
	$(BIN)/python bench/flow.py --quick
	$(BIN)/python bench/train.py --quick

# Stage one on one GPU, under 5 minutes: decode, TV-L1 / Brox, CNN and end-to-end rates with peak memory, into
# bench/results/gpu.json and gpu.md (refuses without CUDA; `bench/gpu.py --device cpu --quick` is the CPU smoke run).
bench-gpu: | $(BIN)/twostream
	PYTHONPATH=. $(BIN)/python bench/gpu.py --device cuda --out bench/results/gpu

# The README's tables marked <!-- bench/results/NAME.md --> are these outputs (tests/test_readme_numbers.py checks it).
readme-numbers: | $(BIN)/twostream
	PYTHONPATH=. $(BIN)/python bench/faults.py --out bench/results/faults.md
	PYTHONPATH=. $(BIN)/python bench/scale.py --sizes 10000,100000,1000000 --out bench/results/scale.md
	PYTHONPATH=. $(BIN)/python bench/stream.py --out bench/results/stream.md
	PYTHONPATH=. $(BIN)/python bench/predict.py --flow dis,tvl1,tvl1-opencv --out bench/results/predict.md
	PYTHONPATH=. $(BIN)/python bench/extract.py --out bench/results/extract.md

lint: | $(BIN)/twostream
	$(BIN)/ruff check .

clean:
	rm -rf $(DATA) $(STORE) $(RUNS) report timeline
