PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Defaults: the embedded demo, so `make precompute`, `make train`, `make infer` run with no arguments.
MODEL  ?= demo/tiny-model
DATA   ?= demo/data
STORE  ?= demo/latents.zarr
OUT    ?= demo/output
PROMPT ?= yoda
DEVICE ?=
DEVICE_FLAG := $(if $(DEVICE),--device_target $(DEVICE),)

.PHONY: install demo precompute train infer test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

$(MODEL)/model_index.json: | $(STAMP)
	$(BIN)/t2i-tiny-model --output_dir $(MODEL) $(DEVICE_FLAG)

$(DATA)/metadata.jsonl: | $(STAMP)
	$(BIN)/t2i-demo-data --output_dir $(DATA)

precompute: $(STAMP) $(MODEL)/model_index.json $(DATA)/metadata.jsonl
	$(BIN)/t2i-precompute --pretrained_model_name_or_path $(MODEL) --train_data_dir $(DATA) \
		--output_dir $(STORE) --resolution 64 --center_crop --random_flip $(DEVICE_FLAG)

train: $(STAMP)
	$(BIN)/t2i-train --pretrained_model_name_or_path $(MODEL) --latent_store $(STORE) --output_dir $(OUT) \
		$(DEVICE_FLAG) $(TRAIN_ARGS)

infer: $(STAMP)
	$(BIN)/t2i-infer --prompt "$(PROMPT)" --model $(OUT) --output demo/$(subst $() ,_,$(PROMPT)).png --overwrite $(DEVICE_FLAG)

demo: $(STAMP)
	$(BIN)/python -m t2i.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15

bench: $(STAMP)
	$(BIN)/python -m t2i.bench

clean:
	rm -rf demo .pytest_cache
