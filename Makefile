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

.PHONY: install peer demo precompute train infer test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# PyTorch diffusers in a venv of its own, for the PyTorch-side tests and `make bench-peer`; torch==2.13.0 resolves to
# the CPU wheel (plain `torch` pulls CUDA). Rebuilt when this file changes, so a new pin takes effect.
PEER       := .venv-peer
PEER_STAMP := $(PEER)/.installed
PEER_PKGS  := torch==2.13.0 diffusers==0.39.0 transformers==4.57.1 safetensors peft==0.21.2

peer: $(PEER_STAMP)

$(PEER_STAMP): Makefile
	test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/pip install -q $(PEER_PKGS)
	touch $(PEER_STAMP)

# The demo's settings (32 px, 300 steps of 8, ...) are written once, in t2i/demo.py; each stage's flags come from
# `python -m t2i.demo --print-args STAGE`.
DEMO_ARGS = $(shell $(BIN)/python -m t2i.demo --print-args $(1))

$(MODEL)/model_index.json: | $(STAMP)
	$(BIN)/t2i-tiny-model --output_dir $(MODEL) $(call DEMO_ARGS,tiny-model) $(DEVICE_FLAG)

$(DATA)/metadata.jsonl: | $(STAMP)
	$(BIN)/t2i-demo-data --output_dir $(DATA) $(call DEMO_ARGS,data)

TRAIN_ARGS ?= $(call DEMO_ARGS,train)

precompute: $(STAMP) $(MODEL)/model_index.json $(DATA)/metadata.jsonl
	$(BIN)/t2i-precompute --pretrained_model_name_or_path $(MODEL) --train_data_dir $(DATA) \
		--output_dir $(STORE) $(call DEMO_ARGS,precompute) $(DEVICE_FLAG)

train: $(STAMP)
	$(BIN)/t2i-train --pretrained_model_name_or_path $(MODEL) --latent_store $(STORE) --output_dir $(OUT) \
		$(TRAIN_ARGS) $(DEVICE_FLAG)

infer: $(STAMP)
	$(BIN)/t2i-infer --prompt "$(PROMPT)" --model $(OUT) --output demo/$(subst $() ,_,$(PROMPT)).png --overwrite $(DEVICE_FLAG)

demo: $(STAMP)
	$(BIN)/python -m t2i.demo

# The output-folder tests load t2i-train's output in PyTorch diffusers too, so CI builds .venv-peer first.
# Two workers: most of a test's time is single-threaded graph compiling and Python, so the second core would idle.
# One test at a time to whichever worker is free, longest first (tests/conftest.py): no long test starts last.
test: $(STAMP) $(PEER_STAMP)
	$(BIN)/python -m pytest -q -x -n 2 --dist load --maxschedchunk 1 --durations=20

# The low end of pyproject.toml's mindspore range (mindone 0.5.0's tested 2.7.1) in a venv of its own, rebuilt when
# pyproject.toml changes. MS27_TESTS, a smaller set than `make test`'s, runs there: the stages end to end on the tiny
# model (the README's commands: precompute, train with fp16, checkpointing, EMA and validation, infer; and export),
# exact resume, the compiled step against PyNative, LoRA, one msrun case, the CPU ops, the optimizer and
# t2i.core.compat's checks. No .venv-peer: the PyTorch-side tests are `make test`'s.
MS27       := .venv-ms27
MS27_STAMP := $(MS27)/.installed
MS27_MS    := 2.7.1
MS27_TESTS := tests/test_readme.py::test_readme_commands_run \
	tests/test_distributed.py::test_two_workers_equal_one_worker_with_double_batch \
	tests/test_train.py::test_exact_resume tests/test_train.py::test_compiled_step_equals_pynative \
	tests/test_lora.py::test_only_the_adapter_trains_and_the_output_is_the_adapter \
	tests/test_interop.py::test_export_round_trips_through_mindones_single_file_converters \
	tests/test_cpu_ops.py tests/test_optim.py tests/test_runtime.py tests/test_compat.py

$(MS27_STAMP): pyproject.toml
	test -x $(MS27)/bin/python || $(PYTHON) -m venv $(MS27)
	$(MS27)/bin/pip install -q --upgrade pip
	$(MS27)/bin/pip install -q mindspore==$(MS27_MS) -e '.[test]'
	touch $(MS27_STAMP)

.PHONY: test-ms27
test-ms27: $(MS27_STAMP)
	$(MS27)/bin/python -c "import mindspore; assert mindspore.__version__ == '$(MS27_MS)', mindspore.__version__"
	$(MS27)/bin/python -m pytest -q -x -n 2 --dist load --maxschedchunk 1 --durations=10 $(MS27_TESTS)

# BENCH_ARGS=--sd15 adds the SD-1.5 geometry; with .venv-peer present, `make bench` also runs the PyTorch side.
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# The SD-1.5 geometry end to end (random weights, 4 images at 512 px, 3 train steps with a kill and resume, export,
# infer): each stage's time and peak RSS into bench/smoke-sd15.md. Needs about 20 GB of free memory and half an hour.
.PHONY: smoke-sd15
smoke-sd15: $(STAMP)
	$(BIN)/python -m bench.smoke

.PHONY: bench-peer
bench-peer: $(STAMP) $(PEER_STAMP)
	$(BIN)/python -m bench --prepare
	PYTHONPATH=$(CURDIR) $(PEER)/bin/python -m bench --peer $(BENCH_ARGS)

clean:
	rm -rf demo .pytest_cache
