# Two commands do everything on a fresh machine (Python 3.11+):
#   make train   install into .venv and train the default model on the embedded corpus
#   make test    install into .venv (with the interop, eval, data, wandb and storage extras: transformers + torch,
#                lm-evaluation-harness, zstandard + pyarrow, wandb, s3fs + gcsfs + boto3)
#                and run the whole test suite
#                (what CI runs)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install train test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'

train: install
	$(BIN)/python -m gptjax.cli.train $(ARGS)

test: install
	$(BIN)/python -m pip install -q -e '.[dev,interop,eval,data,wandb,storage]'
	$(BIN)/python -m pytest -q $(ARGS)

bench: install
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/train_bench.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
